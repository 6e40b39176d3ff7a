"""Lookup-free (LFQ) and finite scalar (FSQ) quantizer *training steps*: forward + backward, ours vs
vector-quantize-pytorch's modules.

One call: gradients cleared, the module's forward on ``x`` (1, N, d) (a leaf that requires grad), then one
backward through the quantized output (a fixed upstream gradient, as a decoder would give) and the aux loss
(LFQ: entropy loss weight 0.1, diversity gamma 1, ``inv_temperature`` 100: VQP's defaults).

Providers:
    ours       vqkernels         vqkernels.LFQ(dim=d), the whole batch in the entropies (no subsampling); usual backend
    reference  vqkernels-torch   the same on the PyTorch reference op (chunked, the same GEMM formulation)
    peer       vqtorch           vector_quantize_pytorch.LFQ(dim=d): the N x 2^d softmax (frac_per_sample_entropy 1,
                                 its default)
    peer       vqtorch-frac0.25  the same with frac_per_sample_entropy=0.25: the subsampling VQP offers to save memory
    ours       vqkernels-fsq     vqkernels.FSQ([8, 8, 8, 5, 5, 5]) (64000 codes; d must be 6)
    peer       vqtorch-fsq       vector_quantize_pytorch.FSQ([8, 8, 8, 5, 5, 5])

Check: the aux loss (``aux_loss``) of each LFQ provider's step on the same input, so rows can be compared: ours
and VQP's differ only by VQP's 1e-5 clamp in the per-sample entropy (see vqkernels/ops/lfq_entropy), the
subsampled peer by its sampling.

Sizes (N tokens, d bits): the issue's (8192, 16), where VQP 1.32 took 36.8 s and 14.3 GB on 2 cores; (8192, 18)
(2^18 codes, Open-MAGVIT2's size), where VQP needs ~57 GB (ours only); (8192, 14); FSQ at (8192, 6).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..harness.common import device_reasons, fmt_mem, fmt_time, importable_reasons
from ..harness.protocol import Case, Metric, NamedSize, Provider, Suite

OP = "lfq"
FSQ_LEVELS = [8, 8, 8, 5, 5, 5]


class Size(NamedTuple):
    N: int
    d: int


SIZES = {
    "d16": NamedSize(Size(8192, 16), "the issue's size: 8192 tokens, 2^16 codes (VQP: 36.8 s, 14.3 GB)"),
    "d18": NamedSize(Size(8192, 18), "Open-MAGVIT2's 2^18 codes (VQP: ~57 GB, does not fit 24 GB)"),
    "d14": NamedSize(Size(8192, 14), "2^14 codes"),
    "fsq": NamedSize(Size(8192, 6), "FSQ [8, 8, 8, 5, 5, 5]: 64000 codes"),
    "quick-a": NamedSize(Size(256, 8), "smoke"),
    "quick-b": NamedSize(Size(300, 6), "smoke, FSQ"),
}
DTYPES = {"fp32": torch.float32}
LFQ_PROVIDERS = ("vqkernels", "vqkernels-torch", "vqtorch", "vqtorch-frac0.25")
FSQ_PROVIDERS = ("vqkernels-fsq", "vqtorch-fsq")
CPU_PROVIDERS = LFQ_PROVIDERS + FSQ_PROVIDERS
CUDA_PROVIDERS = CPU_PROVIDERS


def default_cases(device: str, quick: bool = False, large: bool = False) -> list[Case]:
    S = {n: s.size for n, s in SIZES.items()}
    names = ["quick-a", "quick-b"] if quick else ["d14", "d16", "d18", "fsq"]
    return [Case(S[n], "fp32", CPU_PROVIDERS if device == "cpu" else CUDA_PROVIDERS) for n in names]


class _Step:
    def __init__(self, module, x, g, lfq: bool):
        self.module, self.x, self.g, self.lfq = module, x, g, lfq
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self):
        self.x.grad = None
        for p in self.params:
            p.grad = None
        if self.lfq:
            q, idx, aux = self.module(self.x)
            torch.autograd.backward([q, aux], [self.g, None])
            return idx, aux.detach()
        out, idx = self.module(self.x)
        out.backward(self.g)
        return idx, None


def _build(make_module, lfq: bool):
    def build(inputs, case):
        x, = inputs
        m = make_module(case).to(x.device).train()
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(12345)).to(x.device)
        return _Step(m, x.detach().clone().requires_grad_(), g, lfq)

    return build


def _ours_lfq(backend=None):
    def make(case):
        import vqkernels

        return vqkernels.LFQ(dim=case.size.d, backend=backend)

    return make


def _vqp_lfq(**kw):
    def make(case):
        from vector_quantize_pytorch import LFQ

        return LFQ(dim=case.size.d, **kw)

    return make


def _ours_fsq(case):
    import vqkernels

    return vqkernels.FSQ(FSQ_LEVELS)


def _vqp_fsq(case):
    from vector_quantize_pytorch import FSQ

    return FSQ(FSQ_LEVELS)


def _reasons(module: str | None, fsq: bool):
    def reasons(case, device):
        r = (importable_reasons(module) if module else []) + device_reasons(device)
        if fsq and case.size.d != len(FSQ_LEVELS):
            r.append(f"the FSQ providers run at d = {len(FSQ_LEVELS)} (levels {FSQ_LEVELS})")
        if not fsq and case.size.d == len(FSQ_LEVELS) and case.size.N >= 4096:
            r.append("the d = 6 size is FSQ's")
        return r

    return reasons


PROVIDERS: dict[str, Provider] = {
    "vqkernels": Provider("vqkernels", "ours", "vqkernels.LFQ(dim=d): exact entropies of the whole batch",
                          _build(_ours_lfq(), True), _reasons(None, False)),
    "vqkernels-torch": Provider("vqkernels-torch", "reference", "vqkernels.LFQ(dim=d, backend='torch')",
                                _build(_ours_lfq("torch"), True), _reasons(None, False)),
    "vqtorch": Provider("vqtorch", "peer", "vector_quantize_pytorch.LFQ(dim=d): N x 2^d softmax",
                        _build(_vqp_lfq(), True), _reasons("vector_quantize_pytorch", False),
                        extra={"nk_bytes_factor": 7.0}),
    "vqtorch-frac0.25": Provider("vqtorch-frac0.25", "peer",
                                 "vector_quantize_pytorch.LFQ(dim=d, frac_per_sample_entropy=0.25)",
                                 _build(_vqp_lfq(frac_per_sample_entropy=0.25), True),
                                 _reasons("vector_quantize_pytorch", False), extra={"nk_bytes_factor": 1.75}),
    "vqkernels-fsq": Provider("vqkernels-fsq", "ours", f"vqkernels.FSQ({FSQ_LEVELS})", _build(_ours_fsq, False),
                              _reasons(None, True)),
    "vqtorch-fsq": Provider("vqtorch-fsq", "peer", f"vector_quantize_pytorch.FSQ({FSQ_LEVELS})",
                            _build(_vqp_fsq, False), _reasons("vector_quantize_pytorch", True)),
}
PAIRS = (("vqkernels", "vqtorch"), ("vqkernels", "vqtorch-frac0.25"), ("vqkernels-fsq", "vqtorch-fsq"))


class LFQSuite(Suite):
    op = OP
    title = "LFQ / FSQ training step"
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    metrics = (Metric("tokens_per_s", "tokens/s", lambda c: float(c.size.N)),)
    providers = PROVIDERS
    cpu_providers = CPU_PROVIDERS
    cuda_providers = CUDA_PROVIDERS
    check_columns = ("aux_loss",)
    ratio_columns = ("speedup_vs_peer", "mem_frac_of_peer")

    def default_cases(self, device, quick=False, large=False):
        return default_cases(device, quick, large)

    def warmup_case(self, case):
        return self.with_size(case, N=min(case.size.N, 64), d=min(case.size.d, 6))

    def make_inputs(self, case, device, seed=0):
        N, d = case.size
        return (torch.randn(1, N, d, generator=torch.Generator().manual_seed(seed)).to(device),)

    def estimate_bytes(self, provider, case):
        N, d = case.size
        return int(provider.extra.get("nk_bytes_factor", 0.0) * N * (2 ** d) * 4)

    def answer(self, provider, inputs, case, fn, out):
        idx, aux = out
        return idx, ({} if aux is None else {"aux_loss": float(aux)})

    def add_ratios(self, rows):
        by = {}
        for r in rows:
            by.setdefault((r["threads"], r["N"], r["d"]), {})[r["provider"]] = r
        for group in by.values():
            for ours, peer in PAIRS:
                a, b = group.get(ours), group.get(peer)
                if a and b and a["status"] == "ok" and b["status"] == "ok" and peer in ("vqtorch", "vqtorch-fsq"):
                    a["speedup_vs_peer"] = b["time_s"] / a["time_s"]
                    a["mem_frac_of_peer"] = (a["peak_mem_bytes"] / b["peak_mem_bytes"]
                                             if b["peak_mem_bytes"] else None)

    def progress_line(self, r):
        if r["status"] != "ok":
            return f"{r['status']}: {r['reason'][:110]}"
        return f"{fmt_time(r['time_s'])}, {r['peak_mem_mb']:.1f} MB"

    def format_table(self, rows, meta):
        lines = [f"{self.title}: {meta['device_name']} ({meta['device']}), {meta['usable_cores']} cores usable; "
                 f"torch {meta['torch']}; git {meta['git_sha'][:12]}; {meta['date_utc']}"]
        groups = {}
        for r in rows:
            groups.setdefault((r["threads"], r["N"], r["d"]), []).append(r)
        for (t, N, d), group in groups.items():
            lines += ["", f"N={N} d={d} fp32, {t} thread(s)",
                      f"  {'provider':<18}{'kind':<10}{'time':>10}{'peak mem':>11}{'aux loss':>12}"]
            for r in group:
                if r["status"] != "ok":
                    lines.append(f"  {r['provider']:<18}{r['kind']:<10}{r['status']}: {r['reason'][:90]}")
                    continue
                aux = r.get("aux_loss")
                lines.append(f"  {r['provider']:<18}{r['kind']:<10}{fmt_time(r['time_s']):>10}"
                             f"{fmt_mem(r['peak_mem_bytes']):>11}{'-' if aux is None else format(aux, '.6g'):>12}")
            by = {r["provider"]: r for r in group}
            for ours, peer in PAIRS:
                a, b = by.get(ours), by.get(peer)
                if a and b and a["status"] == "ok" and b["status"] == "ok":
                    lines.append(f"  -> {ours} vs {peer}: {b['time_s'] / a['time_s']:.3g}x faster, peak memory "
                                 f"{fmt_mem(a['peak_mem_bytes'])} vs {fmt_mem(b['peak_mem_bytes'])}")
        return "\n".join(lines)


SUITE = LFQSuite()
