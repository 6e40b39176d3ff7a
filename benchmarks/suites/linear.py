"""Providers and sizes for benchmarking the few-row inference linear (``vqkernels.ops.linear.PackedLinear``).

A size is (rows, n_embd, n_layer): one call is every linear map of a GPT decoding step of that width and depth
for ``rows`` rows (the batch): per layer the q/k/v projection (3C x C), the output projection (C x C) and the
MLP (4C x C, C x 4C), then the head (C x vocab 1024), each with a bias but the head. The weights of all layers
are distinct tensors, so a call streams them all from memory as a decoding step does (the cpu size: ~100 MB).

Providers (each multiplies the same x by the same weights):
    cpu           ours: PackedLinear (packed once, outside the timing), the C++ few-row kernel
    torch         F.linear on nn.Linear's (out, in) weights: what a PyTorch model runs (the reference)
    addmm-t       torch.addmm on an (in, out) copy of each weight: Hugging Face GPT-2's Conv1D layout (and what
                  vqkernels did before PackedLinear)
    mkl-packed    torch.ops.mkl._mkl_linear on weights prepacked by MKL (what Inductor's CPU freezing emits),
                  when this torch has it

Metrics: GB/s of weights read (all weight bytes per call / time) and GFLOP/s (2 x rows x weights).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..harness.common import device_reasons
from ..harness.protocol import Case, Metric, NamedSize, Provider, Suite

OP = "linear"
VOCAB = 1024
DTYPES = {"fp32": torch.float32}


class Size(NamedTuple):
    rows: int
    n_embd: int
    n_layer: int


SIZES = {
    "cpu": NamedSize(Size(8, 512, 8), "a decoding step of the GPT benchmark (batch 8, width 512, 8 layers)"),
    "rows32": NamedSize(Size(32, 512, 8), "the same at 32 rows, the kernel's limit (MAX_ROWS)"),
    "quick": NamedSize(Size(3, 32, 2), "smoke"),
}
PROVIDER_NAMES = ("cpu", "torch", "addmm-t", "mkl-packed")


def shapes(size: Size) -> list[tuple[int, int, bool]]:
    """(out_features, in_features, has_bias) of every linear map of one call."""
    C = size.n_embd
    layer = [(3 * C, C, True), (C, C, True), (4 * C, C, True), (C, 4 * C, True)]
    return layer * size.n_layer + [(VOCAB, C, False)]


def weight_count(size: Size) -> int:
    return sum(n * k for n, k, _ in shapes(size))


class Inputs(NamedTuple):
    weights: list  # [(weight (N, K), bias (N,) or None)]
    xs: dict  # in_features -> x (rows, in_features)


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    ws = []
    for n, k, has_bias in shapes(case.size):
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, dt)
        b = torch.randn(n, generator=g).to(device, dt) if has_bias else None
        ws.append((w, b))
    xs = {k: torch.randn(case.size.rows, k, generator=g).to(device, dt) for k in {k for _, k, _ in shapes(case.size)}}
    return Inputs(ws, xs)


def _build(which: str):
    def build(inp: Inputs, case: Case):
        if which == "cpu":
            from vqkernels.ops.linear import PackedLinear

            maps = [(PackedLinear(w, b, backend="cpu"), w.shape[1]) for w, b in inp.weights]
            calls = [(lambda pl=pl, x=inp.xs[k]: pl(x)) for pl, k in maps]
        elif which == "torch":
            calls = [(lambda w=w, b=b, x=inp.xs[w.shape[1]]: F.linear(x, w, b)) for w, b in inp.weights]
        elif which == "addmm-t":
            prepared = [(w.t().contiguous(), b, inp.xs[w.shape[1]]) for w, b in inp.weights]
            calls = [(lambda wt=wt, b=b, x=x: torch.addmm(b, x, wt) if b is not None else torch.mm(x, wt))
                     for wt, b, x in prepared]
        elif which == "mkl-packed":
            rows = case.size.rows
            prepared = [(torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w, b, inp.xs[w.shape[1]])
                        for w, b in inp.weights]
            calls = [(lambda p=p, w=w, b=b, x=x: torch.ops.mkl._mkl_linear(x, p, w, b, rows))
                     for p, w, b, x in prepared]
        else:
            raise ValueError(which)

        def call():
            with torch.no_grad():
                return [f() for f in calls]

        return call

    return build


def _ours_reasons(case: Case, device: str):
    if device != "cpu":
        return ["the kernel is CPU only (on a GPU PackedLinear is F.linear)"]
    from vqkernels import _backend

    w = torch.zeros(1, 1, dtype=DTYPES[case.dtype])
    return _backend.not_supported_reasons("linear", "cpu", weight=w, bias=None)


def _cpu_only(case: Case, device: str):
    return device_reasons(device)


def _mkl_reasons(case: Case, device: str):
    if device != "cpu":
        return ["MKL's packed linear is a CPU op"]
    try:
        torch.ops.mkl._mkl_linear  # noqa: B018
        torch.ops.mkl._mkl_reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return ["this torch has no torch.ops.mkl._mkl_linear (built without MKL)"]
    return []


PROVIDERS = {
    "cpu": Provider("cpu", "ours", "PackedLinear: weights packed once into 32-column panels, the C++ few-row kernel",
                    _build("cpu"), _ours_reasons),
    "torch": Provider("torch", "reference", "F.linear on (out, in) weights, as nn.Linear", _build("torch"),
                      _cpu_only),
    "addmm-t": Provider("addmm-t", "peer", "torch.addmm on (in, out) weight copies (HF GPT-2's Conv1D layout)",
                        _build("addmm-t"), _cpu_only),
    "mkl-packed": Provider("mkl-packed", "peer", "torch.ops.mkl._mkl_linear on MKL-prepacked weights (Inductor's "
                           "CPU freezing)", _build("mkl-packed"), _mkl_reasons),
}


class LinearSuite(Suite):
    op = OP
    title = "the linear maps of a GPT decoding step (few rows, every weight streamed from memory)"
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    metrics = (
        Metric("gb_per_s", "GB/s", lambda c: 4.0 * weight_count(c.size), 1e9),
        Metric("gflops", "GFLOP/s", lambda c: 2.0 * c.size.rows * weight_count(c.size), 1e9),
    )
    providers = PROVIDERS
    cpu_providers = PROVIDER_NAMES
    cuda_providers = ("torch",)
    check_columns = ("max_rel_err",)
    reference_provider = None

    def label(self, size):
        return f"M{size.rows} C{size.n_embd} L{size.n_layer}"

    def default_cases(self, device, quick=False, large=False):
        if quick:
            return [Case(SIZES["quick"].size, "fp32", PROVIDER_NAMES)]
        if device == "cuda":
            return []  # nothing of ours runs there
        return [Case(SIZES["cpu"].size, "fp32", PROVIDER_NAMES), Case(SIZES["rows32"].size, "fp32", PROVIDER_NAMES)]

    def warmup_case(self, case):
        return self.with_size(case, n_layer=1)

    def make_inputs(self, case, device, seed=0):
        return make_inputs(case, device, seed)

    def estimate_bytes(self, provider, case):
        return 2 * 4 * weight_count(case.size)  # the weights, and a prepared copy

    def reference(self, inputs, case):
        return [F.linear(inputs.xs[w.shape[1]].double(), w.double(), None if b is None else b.double())
                for w, b in inputs.weights]

    def compare(self, inputs, case, answer, ref):
        worst = 0.0
        for y, r, (w, b) in zip(answer, ref, inputs.weights):
            x = inputs.xs[w.shape[1]].double()
            scale = F.linear(x.abs(), w.double().abs(), None if b is None else b.double().abs()) + 1e-30
            worst = max(worst, ((y.double() - r) / scale).abs().max().item())
        return {"max_rel_err": worst}


SUITE = LinearSuite()
