"""Providers and sizes for benchmarking ``nearest_code``.

A *provider* is one way of answering "which code is nearest to each row of x": our backends, the
code paths of the libraries people use today (the peers), and a bare matmul of the same shape (the
floor: what the GEMM alone costs, not a search). A size is ``Size(N, K, D)``; ``SUITE.make_inputs(case, device)``
gives (x (N, D), codebook (K, D)) and ``PROVIDERS[name].build(inputs, case)`` a zero-argument callable whose
result is the int64 indices (N,) -- or, for a floor, the (N, K) matrix (see :mod:`benchmarks.harness.protocol`).

Kinds (the table's ratios use them):
    ours       vqkernels.nearest_code(backend=cpu|triton|cuda): the fused kernels
    reference  vqkernels.nearest_code(backend=torch): the chunked PyTorch reference
    peer       taming, vqtorch, faiss: what users run now
    floor      torch_mm (CPU), cublas_matmul (CUDA): a bare x @ cb.T of the same shape

Sizes come from real models: taming-transformers' ImageNet VQGAN (3072 tokens of a 16x16x12 batch,
1024 codes of 256), LlamaGen's tokenizer (16384 codes of 8), the CPU target size, and two large
ones for GPUs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..harness.common import (backend_reasons, device_reasons, fmt_time, group_rows, importable_reasons,
                              interpreter_reasons)
from ..harness.protocol import Case, Metric, NamedSize, Provider, Suite

OP = "nearest_code"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Sizes (N vectors, K codes, D dimensions), named after where they come from.

class Size(NamedTuple):
    N: int
    K: int
    D: int


SIZES = {
    "taming": NamedSize(Size(3072, 1024, 256), "taming-transformers ImageNet VQGAN (16x16 tokens x batch 12)"),
    "llamagen": NamedSize(Size(32768, 16384, 8), "LlamaGen tokenizer (16384 codes of 8)"),
    "cpu-target": NamedSize(Size(65536, 8192, 64), "the CPU kernel's target size"),
    "d256": NamedSize(Size(16384, 16384, 256), "large D, bf16 CPU size"),
    "large-d256": NamedSize(Size(262144, 16384, 256), "large, GPU (a full N x K fp32 matrix is 17 GB)"),
    "large-k100k": NamedSize(Size(65536, 100000, 8), "large K, GPU"),
    # --quick: tiny, odd shapes so a smoke run takes seconds and still exercises edge handling
    "quick-a": NamedSize(Size(512, 256, 32), "smoke"),
    "quick-b": NamedSize(Size(1000, 300, 8), "smoke, odd shape"),
}

CPU_PROVIDERS = ("cpu", "triton", "torch", "taming", "vqtorch", "faiss", "torch_mm")
CUDA_PROVIDERS = ("cuda", "triton", "torch", "taming", "vqtorch", "cublas_matmul")
# Low precision: our kernels, the reference (widens to fp32) and the floor; the peers' own
# low-precision paths are available with --providers (their correctness column shows the damage).
CPU_LOWP_PROVIDERS = ("cpu", "torch", "torch_mm")
CUDA_LOWP_PROVIDERS = ("cuda", "triton", "torch", "taming", "vqtorch", "cublas_matmul")


def default_cases(device: str, quick: bool = False, large: bool = False) -> list[Case]:
    """The suite's defaults for a device ("cpu" or "cuda")."""
    S = {n: s.size for n, s in SIZES.items()}
    if device == "cuda":
        if quick:
            return [Case(S["quick-a"], "fp32", CUDA_PROVIDERS), Case(S["quick-b"], "fp32", CUDA_PROVIDERS),
                    Case(S["quick-a"], "bf16", CUDA_LOWP_PROVIDERS)]
        sizes = [S["taming"], S["llamagen"], S["cpu-target"], S["large-d256"], S["large-k100k"]]
        return ([Case(s, "fp32", CUDA_PROVIDERS) for s in sizes]
                + [Case(s, "bf16", CUDA_LOWP_PROVIDERS) for s in sizes])
    if quick:
        return [Case(S["quick-a"], "fp32", CPU_PROVIDERS), Case(S["quick-b"], "fp32", CPU_PROVIDERS),
                Case(S["quick-a"], "bf16", CPU_LOWP_PROVIDERS)]
    cases = [Case(S[n], "fp32", CPU_PROVIDERS) for n in ("taming", "llamagen", "cpu-target")]
    cases += [Case(S[n], "bf16", CPU_LOWP_PROVIDERS) for n in ("cpu-target", "d256")]
    if large:
        cases += [Case(S[n], "fp32", CPU_PROVIDERS) for n in ("large-d256", "large-k100k")]
    return cases


def flops(N: int, K: int, D: int) -> float:
    """The multiply-adds of the x @ cb.T every provider does, counted as 2 FLOPs each."""
    return 2.0 * N * K * D


# ---------------------------------------------------------------------------------------------
# Providers. build(inputs, case) with inputs = (x (N, D), codebook (K, D)); reasons(case, device).

def make_inputs(N: int, K: int, D: int, dtype: str, device: str, seed: int = 0):
    """x (N, D) and codebook (K, D), standard normal, on ``device`` in ``dtype`` (the tests' factory)."""
    from vqkernels.testing import make_inputs as _make

    return _make(N, K, D, DTYPES[dtype], device, seed=seed)


def _probe(N, K, D, dtype, device):
    """Tensors shaped like the real inputs but costing nothing (the codebook is an expanded row)."""
    x = torch.empty(1, D, dtype=DTYPES[dtype], device=device)
    cb = torch.empty(1, D, dtype=DTYPES[dtype], device=device).expand(K, D)
    return x, cb


# --- ours and the reference: vqkernels.nearest_code(backend=...) -------------------------------

def _ours_reasons(backend: str):
    def reasons(case, device):
        r = device_reasons(device)
        if r:
            return r
        from vqkernels.ops import nearest_code as nc  # noqa: F401  (registers the op's capability table)

        N, K, D = case.size
        x, cb = _probe(N, K, D, case.dtype, device)
        r = backend_reasons(OP, backend, x=x, codebook=cb, metric=0, allow_tf32=False)
        return r or interpreter_reasons(backend, device)

    return reasons


def _ours_build(backend: str):
    def build(inputs, case):
        import vqkernels

        x, cb = inputs
        return lambda: vqkernels.nearest_code(x, cb, backend=backend)

    return build


# --- peers ----------------------------------------------------------------------------------

def _taming_build(inputs, case):
    # taming.modules.vqvae.quantize.VectorQuantizer2.forward: the full (N, K) distance matrix
    # ||x||^2 + ||c||^2 - 2 x c^T in the input dtype, then argmin over codes.
    x, cb = inputs

    def fn():
        d = (torch.sum(x ** 2, dim=1, keepdim=True) + torch.sum(cb ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", x, cb.t()))
        return torch.argmin(d, dim=1)

    return fn


def _vqtorch_build(inputs, case):
    # vector-quantize-pytorch EuclideanCodebook.forward: inputs cast to float32 (autocast off),
    # dist = -cdist(flatten, embed), then argmax over codes (= cdist + argmin). Recent versions
    # compute their cdist as sqrt(clamp(x2 + y2 - 2 x y^T)) with an einsum; torch.cdist is the same
    # matrix with one fewer (N, K) temporary.
    x, cb = inputs

    def fn():
        dist = -torch.cdist(x.float(), cb.float())
        return dist.argmax(dim=-1)

    return fn


def _any_dtype_reasons(case, device):
    return device_reasons(device)


def _faiss_reasons(case, device):
    r = importable_reasons("faiss")
    if r:
        return r
    if case.dtype != "fp32":
        r.append(f"faiss IndexFlatL2 takes float32 only, not {case.dtype}")
    if device != "cpu":
        r.append("faiss-cpu runs on CPU only (pass --device cpu)")
    return r


def _faiss_build(inputs, case):
    # faiss.IndexFlatL2: add the codebook, search k=1. Adding is part of the call, as our op takes
    # the codebook on every call too (it is a K x D copy: negligible next to the search).
    import faiss

    x, cb = inputs
    xn = x.contiguous().numpy()
    cbn = cb.contiguous().numpy()

    def fn():
        index = faiss.IndexFlatL2(cbn.shape[1])
        index.add(cbn)
        _, ind = index.search(xn, 1)
        return torch.from_numpy(ind[:, 0])  # int64 (faiss idx_t)

    return fn


# --- floors ---------------------------------------------------------------------------------

def _mm_build(inputs, case):
    # The GEMM every search above does, alone: the (N, K) matrix x @ cb.T, no reduction.
    x, cb = inputs
    cbt = cb.t()
    return lambda: torch.mm(x, cbt)


def _mm_reasons(want_device):
    def reasons(case, device):
        if device != want_device:
            return [f"the {want_device} matmul floor runs on {want_device} only"]
        return device_reasons(device)

    return reasons


PROVIDERS: dict[str, Provider] = {
    "cpu": Provider("cpu", "ours", "vqkernels C++ CPU kernel", _ours_build("cpu"), _ours_reasons("cpu")),
    "triton": Provider("triton", "ours", "vqkernels Triton kernel", _ours_build("triton"), _ours_reasons("triton")),
    "cuda": Provider("cuda", "ours", "vqkernels CUDA C++ kernel", _ours_build("cuda"), _ours_reasons("cuda")),
    "torch": Provider("torch", "reference", "vqkernels chunked PyTorch reference (4096-row tiles)",
                      _ours_build("torch"), _ours_reasons("torch")),
    "taming": Provider("taming", "peer", "taming-transformers: full N x K distance matrix + argmin",
                       _taming_build, _any_dtype_reasons, extra={"nk_matrices": 3.0}),
    "vqtorch": Provider("vqtorch", "peer", "vector-quantize-pytorch: -torch.cdist (fp32) + argmax",
                        _vqtorch_build, _any_dtype_reasons, extra={"nk_matrices": 2.0, "nk_elem_bytes": 4}),
    "faiss": Provider("faiss", "peer", "faiss.IndexFlatL2, add codebook + search k=1 (CPU, fp32)",
                      _faiss_build, _faiss_reasons),
    "torch_mm": Provider("torch_mm", "floor", "bare torch.mm(x, cb.T) on CPU: the GEMM alone",
                         _mm_build, _mm_reasons("cpu"), checked=False, extra={"nk_matrices": 1.0}),
    "cublas_matmul": Provider("cublas_matmul", "floor", "bare torch.mm(x, cb.T) on CUDA (cuBLAS): the GEMM alone",
                              _mm_build, _mm_reasons("cuda"), checked=False, extra={"nk_matrices": 1.0}),
}


def nk_bytes(provider: Provider, N: int, K: int, dtype: str) -> int:
    """Estimated bytes of the (N, K) matrices ``provider`` holds at its peak (0 for the fused ones):
    ``extra["nk_matrices"]`` of them, of ``extra["nk_elem_bytes"]`` (default: the input dtype's size)."""
    elem = provider.extra.get("nk_elem_bytes") or torch.empty((), dtype=DTYPES[dtype]).element_size()
    return int(provider.extra.get("nk_matrices", 0.0) * N * K * elem)


# ---------------------------------------------------------------------------------------------
# Correctness against the chunked torch reference.

def reference_indices(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """The chunked PyTorch reference's answer (the oracle for ``correct_fraction``)."""
    import vqkernels

    return vqkernels.nearest_code(x, cb, backend="torch")


def _chosen_dist64(x, cb, idx, rows=1 << 15):
    """Exact (float64) squared distance of each row to its chosen code, in row chunks (O(N*D))."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for n0 in range(0, x.shape[0], rows):
        xb = x[n0:n0 + rows].double()
        cbb = cb.index_select(0, idx[n0:n0 + rows]).double()
        out[n0:n0 + rows] = ((xb - cbb) ** 2).sum(1)
    return out


def correct_fraction(x: torch.Tensor, cb: torch.Tensor, idx: torch.Tensor, ref_idx: torch.Tensor) -> float:
    """Fraction of rows whose chosen code is as near as the reference's, within a float32 tolerance.

    Tie-aware: an index counts as right when the exact (float64, of the dtype-rounded inputs)
    distance of its code is at most the distance of the reference's code plus a tolerance that
    follows float32 accumulation (``vqkernels.testing``'s rule, bounded with Cauchy-Schwarz), not
    when it equals the reference's index. A provider that computes in bf16/fp16, or picks wrong
    codes, shows a fraction below 1.
    """
    from vqkernels.testing import ACC_EPS

    idx = idx.reshape(-1).to(device=x.device, dtype=torch.int64)
    ref_idx = ref_idx.reshape(-1).to(device=x.device, dtype=torch.int64)
    if idx.numel() != x.shape[0]:
        return 0.0
    if x.shape[0] == 0:
        return 1.0
    K = cb.shape[0]
    in_range = (idx >= 0) & (idx < K)
    idx_safe = torch.where(in_range, idx, torch.zeros_like(idx))
    d = _chosen_dist64(x, cb, idx_safe)
    d_ref = _chosen_dist64(x, cb, ref_idx)
    D = x.shape[1]
    xn = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    cmax = torch.linalg.vector_norm(cb, dim=1, dtype=torch.float64).max()
    tol = 8.0 * ACC_EPS["ieee"] * max(1.0, math.sqrt(D)) * (xn + cmax) ** 2 + 1e-30
    ok = in_range & (d <= d_ref + tol)
    return float(ok.double().mean())


# ---------------------------------------------------------------------------------------------
# The suite

class NKDSuite(Suite):
    """What the suites over N vectors of D against a codebook of K share (search, quantizer step): the inputs
    (standard normal), the warm-up case and the memory estimate."""

    def warmup_case(self, case):
        N, K, D = case.size
        return self.with_size(case, N=min(N, 64), K=min(K, 64))

    def make_inputs(self, case, device, seed=0):
        return make_inputs(*case.size, case.dtype, device, seed)

    def estimate_bytes(self, provider, case):
        N, K, _ = case.size
        return nk_bytes(provider, N, K, case.dtype)


class NearestCodeSuite(NKDSuite):
    op = OP
    title = "nearest_code"
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    metrics = (Metric("vectors_per_s", "vectors/s", lambda c: float(c.size.N)),
               Metric("gflops", "GFLOP/s", lambda c: flops(*c.size), 1e9))
    providers = PROVIDERS
    cpu_providers = CPU_PROVIDERS
    cuda_providers = CUDA_PROVIDERS
    check_columns = ("correct_frac",)
    reference_provider = "torch"

    def default_cases(self, device, quick=False, large=False):
        return default_cases(device, quick, large)

    def reference(self, inputs, case):
        return reference_indices(*inputs)

    def compare(self, inputs, case, answer, ref):
        return {"correct_frac": correct_fraction(*inputs, answer, ref)}

    def is_correct(self, row):
        return row.get("correct_frac") is None or row["correct_frac"] >= 0.999

    def progress_line(self, row):
        if row["status"] != "ok":
            return f"{row['status']}: {row['reason'][:110]}"
        return f"{fmt_time(row['time_s'])}, {row['gflops']:.0f} GFLOP/s, {row['peak_mem_mb']:.1f} MB"

    def format_table(self, rows, meta) -> str:
        """A readable table per case, with the speed-up against the best peer and the floor."""
        lines = [f"device: {meta['device_name']} ({meta['device']}), {meta['usable_cores']} cores usable; "
                 f"torch {meta['torch']}, triton {meta['triton']}, faiss {meta['faiss']}; "
                 f"git {meta['git_sha'][:12]}; {meta['date_utc']}"]
        hdr = f"  {'provider':<14}{'kind':<10}{'time':>10}{'vectors/s':>12}{'GFLOP/s':>9}{'peak mem':>11}" \
              f"{'correct':>9}{'vs best peer':>14}"
        for (t, N, K, D, dt, _), group in group_rows(rows, self.group_key).items():
            lines += ["", f"N={N} K={K} D={D} {dt}, {t} thread(s)", hdr]
            for r in group:
                if r["status"] != "ok":
                    lines.append(f"  {r['provider']:<14}{r['kind']:<10}{r['status']}: {r['reason'][:95]}")
                    continue
                cf = r.get("correct_frac")
                sp = r.get("speedup_vs_best_peer")
                lines.append(
                    f"  {r['provider']:<14}{r['kind']:<10}{fmt_time(r['time_s']):>10}"
                    f"{r['vectors_per_s'] / 1e6:>10.3g} M{r['gflops']:>9.1f}"
                    f"{r['peak_mem_mb']:>8.1f} MB{('n/a' if cf is None else f'{cf:.4f}'):>9}"
                    f"{('-' if sp is None else f'{sp:.3g}x'):>14}")
            best = self.best_peer(group)
            floor = next((r for r in group if r["kind"] == "floor" and r["status"] == "ok"), None)
            for r in group:
                if r["kind"] not in ("ours", "reference") or r["status"] != "ok":
                    continue
                parts = []
                if best:
                    parts.append(f"{r['provider']} vs {best['provider']}: {best['time_s'] / r['time_s']:.3g}x")
                if floor:
                    parts.append(f"{r['time_s'] / floor['time_s']:.3g}x the time of the bare matmul "
                                 f"({floor['provider']})")
                if parts:
                    lines.append("  -> " + "; ".join(parts))
        lines += ["", "vs best peer = time of the fastest correct peer / this time (> 1: faster than every peer)."]
        return "\n".join(lines)


SUITE = NearestCodeSuite()
