"""Providers and sizes for benchmarking a residual quantizer *training step* (forward + backward + EMA update).

One call is one training step of the quantizer layer, without the optimizer: gradients cleared, the forward on
the encoder output ``z`` (B, T, D) (a leaf that requires grad) in training mode (so the EMA codebooks update
inside it, as they do in training), then one backward through the quantized output (a fixed upstream gradient,
as the decoder would give) and the summed per-stage commitment losses. Every provider is built with the same
options (vector-quantize-pytorch's defaults: EMA decay 0.8, rotation trick, commitment weight 1) after
``torch.manual_seed(0)``, so both modules start from the same codebooks.

Providers:
    ours       vqkernels        vqkernels.ResidualVQ(dim, num_quantizers, codebook_size): the fused residual_vq op
                                (the usual backend: the C++ kernel on a CPU)
    reference  vqkernels-torch  the same module on the op's chunked PyTorch reference
    peer       vqtorch          vector_quantize_pytorch.ResidualVQ(...): Q VectorQuantize stages, each with its
                                N x K distance and one-hot matrices

Correctness: after the timing, each provider runs one step on a fresh module (seed 0, the same input) and its
indices (N, Q) are compared with the reference module's (``index_match``: the fraction equal; float32 near-ties
may differ, and a differing stage changes the residual of the stages after it).

Sizes (tokens, dim, quantizers, codebook_size): the issue's (16384, 256, 8 x 1024) and (16384, 128, 32 x 1024).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..harness.common import device_reasons, importable_reasons
from ..harness.protocol import Case, Metric, NamedSize, Provider, Suite

OP = "residual_vq"
DTYPES = {"fp32": torch.float32}
SEQ = 256  # tokens per sequence: z is (tokens / SEQ, SEQ, dim)


class Size(NamedTuple):
    tokens: int
    dim: int
    quantizers: int
    codes: int


SIZES = {
    "rvq8": NamedSize(Size(16384, 256, 8, 1024), "issue 26: 16384 tokens, dim 256, 8 quantizers of 1024 codes"),
    "rvq32": NamedSize(Size(16384, 128, 32, 1024), "issue 26: 16384 tokens, dim 128, 32 quantizers of 1024 codes"),
    "gpu": NamedSize(Size(262144, 256, 8, 1024), "issue 26's GPU size"),
    "quick": NamedSize(Size(512, 32, 3, 64), "smoke"),
}
PROVIDER_NAMES = ("vqkernels", "vqkernels-torch", "vqtorch")


def flops(size: Size) -> float:
    """The search's GEMMs: 2 * tokens * codes * dim per stage (the step's dominant work)."""
    return 2.0 * size.tokens * size.codes * size.dim * size.quantizers


class Inputs(NamedTuple):
    z: torch.Tensor  # (B, SEQ, dim)
    g: torch.Tensor  # upstream gradient of the quantized output


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    s = case.size
    gen = torch.Generator().manual_seed(seed)
    seq = SEQ if s.tokens % SEQ == 0 else s.tokens
    z = torch.randn(s.tokens // seq, seq, s.dim, generator=gen)
    g = torch.randn(z.shape, generator=gen)
    return Inputs(z.to(device), g.to(device))


def _module(which: str, size: Size, device: str):
    torch.manual_seed(0)
    kw = dict(dim=size.dim, num_quantizers=size.quantizers, codebook_size=size.codes)
    if which == "vqtorch":
        from vector_quantize_pytorch import ResidualVQ

        m = ResidualVQ(**kw)
    else:
        from vqkernels import ResidualVQ

        m = ResidualVQ(**kw, backend="torch" if which == "vqkernels-torch" else None)
    return m.to(device).train()


class _Step:
    def __init__(self, module, z, g):
        self.module, self.z, self.g = module, z.detach().clone().requires_grad_(), g

    def __call__(self):
        self.z.grad = None
        q, idx, losses = self.module(self.z)
        torch.autograd.backward([q, losses.sum()], [self.g, None])
        return idx.reshape(-1, idx.shape[-1])


def _build(which: str):
    def build(inp: Inputs, case: Case):
        return _Step(_module(which, case.size, inp.z.device.type), inp.z, inp.g)

    return build


def _peer_reasons(case, device):
    return importable_reasons("vector_quantize_pytorch") or device_reasons(device)


def _ours_reasons(case, device):
    return device_reasons(device)


PROVIDERS = {
    "vqkernels": Provider("vqkernels", "ours", "vqkernels.ResidualVQ: the fused residual_vq op (all stages per row "
                          "block, EMA statistics from the same pass, fused backward)", _build("vqkernels"),
                          _ours_reasons),
    "vqkernels-torch": Provider("vqkernels-torch", "reference", "vqkernels.ResidualVQ on the op's PyTorch reference",
                                _build("vqkernels-torch"), _ours_reasons),
    "vqtorch": Provider("vqtorch", "peer", "vector_quantize_pytorch.ResidualVQ: Q VectorQuantize stages",
                        _build("vqtorch"), _peer_reasons),
}


class ResidualVQSuite(Suite):
    op = OP
    title = "a ResidualVQ training step (forward + backward + EMA), tokens x dim x quantizers x codes"
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    metrics = (Metric("tokens_per_s", "tokens/s", lambda c: float(c.size.tokens)),
               Metric("gflops", "GFLOP/s", lambda c: flops(c.size), 1e9))
    providers = PROVIDERS
    cpu_providers = PROVIDER_NAMES
    cuda_providers = PROVIDER_NAMES
    check_columns = ("index_match",)

    def label(self, size):
        return f"{size.tokens}x{size.dim}x{size.quantizers}x{size.codes}"

    def default_cases(self, device, quick=False, large=False):
        if quick:
            return [Case(SIZES["quick"].size, "fp32", PROVIDER_NAMES)]
        names = ["rvq8", "rvq32"] + (["gpu"] if device == "cuda" or large else [])
        return [Case(SIZES[n].size, "fp32", PROVIDER_NAMES) for n in names]

    def warmup_case(self, case):
        return self.with_size(case, tokens=min(case.size.tokens, SEQ), codes=min(case.size.codes, 64))

    def make_inputs(self, case, device, seed=0):
        return make_inputs(case, device, seed)

    def estimate_bytes(self, provider, case):
        s = case.size
        if provider.name == "vqtorch":  # a few N x K float32 matrices per stage, alive together in the backward
            return 4 * s.tokens * s.codes * 4 * min(s.quantizers, 4) + 8 * s.tokens * s.dim * s.quantizers
        return 16 * s.tokens * s.dim + 8 * s.quantizers * s.codes * s.dim

    def reference(self, inputs, case):
        return _Step(_module("vqkernels-torch", case.size, inputs.z.device.type), inputs.z, inputs.g)()

    def answer(self, provider, inputs, case, fn, out):
        return _Step(_module(provider.name, case.size, inputs.z.device.type), inputs.z, inputs.g)(), {}

    def compare(self, inputs, case, answer, ref):
        return {"index_match": (answer.cpu() == ref.cpu()).double().mean().item()}

    def is_correct(self, row):
        v = row.get("index_match")
        return v is None or v >= 0.99


SUITE = ResidualVQSuite()
