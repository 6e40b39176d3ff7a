"""Providers and sizes for benchmarking a quantizer *training step*: forward + backward (+ the EMA update).

One call of a provider is what one training step costs the quantizer layer, without the optimizer:
``module.train()``, gradients cleared (set to None, as ``zero_grad`` does), the forward on the encoder
output ``z`` (a leaf that requires grad), then one backward through both outputs a trainer uses, the
straight-through ``z_q`` (with a fixed upstream gradient, as the decoder would give) and the VQ loss:
``torch.autograd.backward([z_q, loss], [g, None])``. The EMA variants update their codebook inside
the forward (training mode), so it is timed too. Every provider starts from the same codebook (the
suite's standard-normal ``cb``) and the same inputs.

Providers (kinds as in :mod:`benchmarks.suites.nearest_code`):
    ours       vqkernels        vqkernels.VectorQuantizer(K, D, beta=0.25), z (B, C, H, W); the usual backend
               vqkernels-ema    vqkernels.VectorQuantize(dim=D, codebook_size=K, decay=0.99, rotation_trick=False),
                                z (B, T, D): the EMA codebook, next to vqtorch-ema
    reference  vqkernels-torch  vqkernels.VectorQuantizer(..., backend="torch"): the same module on the PyTorch reference
    peer       taming           taming.modules.vqvae.quantize.VectorQuantizer2(K, D, beta=0.25): full N x K distances
               vqtorch          vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K, learnable_codebook=True,
                                ema_update=False, rotation_trick=False, commitment_weight=0.25): its gradient-trained
                                codebook with the straight-through estimator, the variant to compare with taming
               vqtorch-ema      vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K, decay=0.99,
                                rotation_trick=False): its default EMA codebook (commitment weight 1)

Correctness: each provider runs one more step, on a fresh module with the initial codebook, after the
timing; its indices are compared with taming's on the same weights and inputs (``index_match_vs_taming``,
the fraction of equal indices; taming's own indices are cached for the other providers, and when taming
cannot run they come from its formula evaluated on row chunks) and its loss value is recorded. The losses
are defined differently by the three modules (taming: (1 + beta) mse; vqtorch learnable: 0.25 mse;
vqtorch EMA: 1.0 mse), so each of ours is compared with its twin: ``loss_rel_diff`` (vqkernels and
vqkernels-torch vs taming, vqkernels-ema vs vqtorch-ema).

Sizes (tokens = B*H*W, K codes, D dims), tokens laid out as 16 x 16 grids (256 px images, f = 16):
taming's ImageNet VQGAN (1024 codes of 256), LlamaGen's tokenizer (16384 codes of 8), and a large one.
"""
from __future__ import annotations

import torch

from ..harness.common import device_reasons, fmt_mem, fmt_time, importable_reasons
from ..harness.protocol import Case, Metric, NamedSize, Provider
from .nearest_code import NKDSuite, Size
from .nearest_code import flops as _search_flops

OP = "quantizer"
REFERENCE_PROVIDER = "taming"  # the indices every provider is compared with; its own output feeds the cache

# The peers each of ours is compared with (speed-up and memory columns), and each of ours' twin (same loss).
PEERS = ("taming", "vqtorch", "vqtorch-ema")
TWINS = {"vqkernels": "taming", "vqkernels-torch": "taming", "vqkernels-ema": "vqtorch-ema"}
# The comparisons the summary lines state (ours, peer): the same kind of codebook on both sides.
PAIRS = (("vqkernels", "taming"), ("vqkernels", "vqtorch"), ("vqkernels-ema", "vqtorch-ema"))

# The modules all hold a float32 codebook; a bf16/fp16 step is an autocast question, not this suite's.
DTYPES = {"fp32": torch.float32}


SIZES = {
    "taming": NamedSize(Size(12288, 1024, 256),
                        "taming-transformers ImageNet VQGAN: 48 images of 16x16 tokens, 1024 codes of 256"),
    "llamagen": NamedSize(Size(32768, 16384, 8), "LlamaGen tokenizer: 128 images of 16x16 tokens, 16384 codes of 8"),
    "large": NamedSize(Size(131072, 16384, 32), "large, GPU (taming holds 3 N x K fp32 matrices: 26 GB)"),
    # --quick: tiny, one odd shape
    "quick-a": NamedSize(Size(768, 256, 32), "smoke"),
    "quick-b": NamedSize(Size(1000, 300, 8), "smoke, odd shape"),
}

CPU_PROVIDERS = ("vqkernels", "vqkernels-torch", "taming", "vqtorch", "vqkernels-ema", "vqtorch-ema")
CUDA_PROVIDERS = CPU_PROVIDERS


def default_cases(device: str, quick: bool = False, large: bool = False) -> list[Case]:
    S = {n: s.size for n, s in SIZES.items()}
    provs = CUDA_PROVIDERS if device == "cuda" else CPU_PROVIDERS
    if quick:
        return [Case(S["quick-a"], "fp32", provs), Case(S["quick-b"], "fp32", provs)]
    names = ["taming", "llamagen"] + (["large"] if device == "cuda" or large else [])
    return [Case(S[n], "fp32", provs) for n in names]


def flops(N: int, K: int, D: int) -> float:
    """The search's GEMM (2*N*K*D), the same count as nearest_code's: the step's dominant work for the peers."""
    return _search_flops(N, K, D)


def grid(N: int) -> tuple[int, int, int]:
    """(B, H, W) with B*H*W = N: 16 x 16 token grids when N allows, else the largest smaller square grid."""
    for h in (16, 8, 4, 2, 1):
        if N % (h * h) == 0:
            return N // (h * h), h, h
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# The step

class _Step:
    """One training step of ``module`` on a fixed input: clear the gradients, forward, backward.

    ``forward(module, z) -> (z_q, loss, indices)``; ``z`` is a leaf that requires grad, ``g`` the upstream
    gradient of ``z_q``. A call returns (indices as (N,), the loss detached)."""

    def __init__(self, module, forward, z, g):
        self.module, self.forward, self.z, self.g = module, forward, z, g
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self):
        self.z.grad = None
        for p in self.params:
            p.grad = None
        z_q, loss, idx = self.forward(self.module, self.z)
        torch.autograd.backward([z_q, loss], [self.g, None])
        return idx.reshape(-1), loss.detach()


def _image_layout(x: torch.Tensor):
    """x (N, D) -> z (B, D, H, W) contiguous, token n = (b, h, w) in row-major order (taming flattens so)."""
    N, D = x.shape
    B, H, W = grid(N)
    return x.reshape(B, H, W, D).permute(0, 3, 1, 2).contiguous()


def _seq_layout(x: torch.Tensor):
    """x (N, D) -> z (B, T, D), T = H*W of the same grid."""
    N, D = x.shape
    B, H, W = grid(N)
    return x.reshape(B, H * W, D).clone()


def _step(module, forward, z, seed: int = 12345):
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(device=z.device, dtype=z.dtype)
    return _Step(module.to(z.device).train(), forward, z.detach().requires_grad_(), g)


def _taming_forward(m, z):
    z_q, loss, (_, _, idx) = m(z)
    return z_q, loss, idx


def _vq_forward(m, z):
    q, idx, loss = m(z)
    return q, loss, idx


def _taming_build(inputs, case):
    from taming.modules.vqvae.quantize import VectorQuantizer2

    x, cb = inputs
    K, D = cb.shape
    m = VectorQuantizer2(K, D, beta=0.25)
    with torch.no_grad():
        m.embedding.weight.copy_(cb)
    return _step(m, _taming_forward, _image_layout(x))


def _vqkernels_build(backend):
    def build(inputs, case):
        import vqkernels

        x, cb = inputs
        K, D = cb.shape
        m = vqkernels.VectorQuantizer(K, D, beta=0.25, backend=backend)
        with torch.no_grad():
            m.embedding.weight.copy_(cb)
        return _step(m, _taming_forward, _image_layout(x))

    return build


def _vq_module_build(cls_path, **options):
    def build(inputs, case):
        import importlib

        x, cb = inputs
        mod_name, cls_name = cls_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod_name), cls_name)
        K, D = cb.shape
        m = cls(dim=D, codebook_size=K, **options)
        with torch.no_grad():  # the same codebook; the EMA sums start as the codes (cluster sizes 1), as built
            m._codebook.embed.copy_(cb[None])
            m._codebook.embed_avg.copy_(cb[None])
        return _step(m, _vq_forward, _seq_layout(x))

    return build


def _import_reasons(module: str):
    def reasons(case, device):  # a peer not installed: its rows are skipped with this reason
        return importable_reasons(module) or device_reasons(device)

    return reasons


def _ours_reasons(case, device):
    return device_reasons(device)


VQTORCH_LEARNABLE = dict(learnable_codebook=True, ema_update=False, rotation_trick=False, commitment_weight=0.25)
EMA = dict(decay=0.99, rotation_trick=False)

PROVIDERS: dict[str, Provider] = {
    "vqkernels": Provider(
        "vqkernels", "ours", "vqkernels.VectorQuantizer(K, D, beta=0.25): taming's module on the fused ops, "
        "the usual backend", _vqkernels_build(None), _ours_reasons),
    "vqkernels-torch": Provider(
        "vqkernels-torch", "reference", "vqkernels.VectorQuantizer(..., backend='torch'): the PyTorch reference ops",
        _vqkernels_build("torch"), _ours_reasons),
    "taming": Provider(
        "taming", "peer", "taming VectorQuantizer2(K, D, beta=0.25): full N x K distances + argmin",
        _taming_build, _import_reasons("taming.modules.vqvae.quantize"), extra={"nk_matrices": 3.0}),
    "vqtorch": Provider(
        "vqtorch", "peer", "vector-quantize-pytorch VectorQuantize, learnable codebook (ema_update=False), "
        "straight-through, commitment 0.25", _vq_module_build("vector_quantize_pytorch.VectorQuantize",
                                                             **VQTORCH_LEARNABLE),
        _import_reasons("vector_quantize_pytorch"), extra={"nk_matrices": 6.0, "nk_elem_bytes": 4}),
    "vqkernels-ema": Provider(
        "vqkernels-ema", "ours", "vqkernels.VectorQuantize(dim=D, codebook_size=K, decay=0.99, rotation_trick=False): "
        "EMA codebook", _vq_module_build("vqkernels.VectorQuantize", **EMA), _ours_reasons),
    "vqtorch-ema": Provider(
        "vqtorch-ema", "peer", "vector-quantize-pytorch VectorQuantize(decay=0.99, rotation_trick=False): "
        "EMA codebook (one-hot statistics)", _vq_module_build("vector_quantize_pytorch.VectorQuantize", **EMA),
        _import_reasons("vector_quantize_pytorch"), extra={"nk_matrices": 6.0, "nk_elem_bytes": 4}),
}


# ---------------------------------------------------------------------------------------------
# Correctness: indices vs taming's, and the loss

def reference_indices(x: torch.Tensor, cb: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """taming's indices when taming itself did not run: its formula, argmin of
    ``sum(z^2) + sum(e^2) - 2 z e^T``, on row chunks (no N x K matrix)."""
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    e2 = torch.sum(cb ** 2, dim=1)
    for n0 in range(0, x.shape[0], rows):
        z = x[n0:n0 + rows]
        d = torch.sum(z ** 2, dim=1, keepdim=True) + e2 - 2 * torch.einsum("bd,dn->bn", z, cb.t())
        out[n0:n0 + rows] = torch.argmin(d, dim=1)
    return out


def check_call(prov: Provider, inputs, case):
    """The step on the initial codebook (a fresh module: the EMA variants moved theirs while being timed):
    (indices (N,), {"loss": value})."""
    idx, loss = prov.build(inputs, case)()
    return idx, {"loss": float(loss)}


def correct_fraction(x, cb, idx, ref_idx) -> float:
    """Fraction of indices equal to taming's."""
    idx, ref_idx = idx.reshape(-1).to(ref_idx.device), ref_idx.reshape(-1)
    if idx.numel() != ref_idx.numel():
        return 0.0
    return float((idx == ref_idx).double().mean()) if idx.numel() else 1.0


# ---------------------------------------------------------------------------------------------
# Ratios, CSV columns, table

def add_ratios(rows) -> None:
    """Per row: tokens/s, the speed-up vs each peer (peer time / this time) and this peak memory as a
    fraction of the peer's, and the loss vs its twin's."""
    groups = {}
    for r in rows:
        groups.setdefault((r["threads"], r["N"], r["K"], r["D"], r["dtype"]), {})[r["provider"]] = r
    for group in groups.values():
        for r in group.values():
            ok = r["status"] == "ok"
            for p in PEERS:
                peer = group.get(p)
                both = ok and peer is not None and peer["status"] == "ok"
                r[f"speedup_vs_{p}"] = peer["time_s"] / r["time_s"] if both else None
                r[f"mem_frac_of_{p}"] = (r["peak_mem_bytes"] / peer["peak_mem_bytes"]
                                         if both and peer["peak_mem_bytes"] else None)
            twin = group.get(TWINS.get(r["provider"], ""))
            if ok and twin is not None and twin.get("loss") is not None and r.get("loss") is not None:
                r["loss_twin"] = twin["provider"]
                r["loss_rel_diff"] = abs(r["loss"] - twin["loss"]) / max(abs(twin["loss"]), 1e-30)


def format_table(rows, meta) -> str:
    lines = [f"quantizer training step (forward + backward, + EMA update): {meta['device_name']} ({meta['device']}), "
             f"{meta['usable_cores']} cores usable; torch {meta['torch']}; git {meta['git_sha'][:12]}; {meta['date_utc']}"]
    groups = {}
    for r in rows:
        groups.setdefault((r["threads"], r["N"], r["K"], r["D"], r["dtype"]), []).append(r)
    hdr = (f"  {'provider':<16}{'kind':<10}{'time':>10}{'tokens/s':>11}{'peak mem':>11}{'idx=taming':>11}"
           f"{'loss':>10}" + "".join(f"{'vs ' + p:>15}" for p in PEERS))
    for (t, N, K, D, dt), group in groups.items():
        lines += ["", f"tokens={N} K={K} D={D} {dt}, {t} thread(s)", hdr]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"  {r['provider']:<16}{r['kind']:<10}{r['status']}: {r['reason'][:100]}")
                continue
            cf = r.get("index_match_vs_taming")
            sp = [r.get(f"speedup_vs_{p}") for p in PEERS]
            lines.append(
                f"  {r['provider']:<16}{r['kind']:<10}{fmt_time(r['time_s']):>10}"
                f"{r['tokens_per_s'] / 1e6:>9.3g} M{fmt_mem(r['peak_mem_bytes']):>11}"
                f"{('n/a' if cf is None else f'{cf:.4f}'):>11}"
                f"{('-' if r.get('loss') is None else format(r['loss'], '.4g')):>10}"
                + "".join(f"{('-' if s is None else f'{s:.3g}x'):>15}" for s in sp))
        by = {r["provider"]: r for r in group}
        for ours, peer in PAIRS:
            a, b = by.get(ours), by.get(peer)
            if a and b and a["status"] == "ok" and b["status"] == "ok":
                frac = a.get(f"mem_frac_of_{peer}")
                lines.append(f"  -> {ours} vs {peer}: {b['time_s'] / a['time_s']:.3g}x faster, peak memory "
                             f"{fmt_mem(a['peak_mem_bytes'])} vs {fmt_mem(b['peak_mem_bytes'])}"
                             + ("" if frac is None else f" ({frac:.3g} of it)"))
            if a and a["status"] == "ok" and a.get("loss_rel_diff") is not None and peer == TWINS.get(ours):
                lines.append(f"     loss {a['loss']:.6g} vs {peer}'s {b['loss']:.6g} "
                             f"(relative difference {a['loss_rel_diff']:.2g})")
    lines += ["", "vs PEER = PEER's time / this time (> 1: faster). idx=taming: fraction of indices equal to taming's "
              "on the same codebook and input."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The suite

class QuantizerSuite(NKDSuite):
    op = OP
    title = "quantizer training step"
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    metrics = (Metric("tokens_per_s", "tokens/s", lambda c: float(c.size.N)),)
    providers = PROVIDERS
    cpu_providers = CPU_PROVIDERS
    cuda_providers = CUDA_PROVIDERS
    check_columns = ("index_match_vs_taming", "loss", "loss_twin", "loss_rel_diff")
    ratio_columns = tuple(f"speedup_vs_{p}" for p in PEERS) + tuple(f"mem_frac_of_{p}" for p in PEERS)
    reference_provider = REFERENCE_PROVIDER

    def default_cases(self, device, quick=False, large=False):
        return default_cases(device, quick, large)

    def reference(self, inputs, case):
        return reference_indices(*inputs)

    def answer(self, provider, inputs, case, fn, out):
        return check_call(provider, inputs, case)

    def compare(self, inputs, case, answer, ref):
        return {"index_match_vs_taming": correct_fraction(*inputs, answer, ref)}

    def add_ratios(self, rows):
        add_ratios(rows)

    def progress_line(self, r):
        if r["status"] != "ok":
            return f"{r['status']}: {r['reason'][:110]}"
        return f"{fmt_time(r['time_s'])}, {r['tokens_per_s'] / 1e6:.3g} M tokens/s, {r['peak_mem_mb']:.1f} MB"

    def format_table(self, rows, meta):
        return format_table(rows, meta)


SUITE = QuantizerSuite()
