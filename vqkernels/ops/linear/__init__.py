"""Inference linear for a few rows: ``y = x @ weight^T + bias`` with the weight prepared once (decoding).

A decoding step multiplies a handful of rows (the batch) by every weight matrix of the model: the work is a
stream over the weights, and a general GEMM at M = 8 reads them at about half the machine's bandwidth. A
:class:`PackedLinear` picks its backend once, when it is built from a weight (``vqkernels._backend``, op
``"linear"``), and prepares the weight for it:

- ``torch``: reference.py (``F.linear`` on the weight itself, no copy): the spec, and what runs on a GPU (cuBLAS
  takes either layout at full speed), in any dtype, and wherever a gradient is needed.
- ``cpu``: float32, our C++ kernel (csrc/cpu/linear.cpp) over the weight packed into (ceil(N / 32), K, 32)
  column panels (:func:`pack_weight`, one copy of the weight), for calls of at most :data:`MAX_ROWS` rows;
  more rows (a prompt's prefill) and calls that need a gradient go to ``F.linear`` on the weight. Chosen
  first on CPUs with AVX-512; without it MKL's GEMM is ahead of the portable loop, so ``torch`` is.

The packed copy is a snapshot: a :class:`PackedLinear` built before the weight changes computes with the
old values (``vqkernels.nn.inference_weights`` builds them for the length of one ``with`` block).

Registered op: ``vqkernels::linear`` ``(x (M, K), weight, bias, out_features, backend) -> y (M, N)``, with a fake
implementation (``opcheck``, ``torch.compile(fullgraph=True)``); ``weight`` is what the backend was prepared with
(the weight itself for ``torch``, the packed panels for ``cpu``). Unlike the other ops, the backend is chosen once,
when the :class:`PackedLinear` is built, not per call, and an eager call goes to the backend's implementation
directly, without the op's Python dispatch: a decoding step makes a few calls per layer on a few rows, where the
dispatch (``_backend.select`` and a custom op's call, tens of microseconds each on these CPUs) would cost as much
as the kernel. Under ``torch.compile`` the call is the registered op, so a graph holds it.
"""
from __future__ import annotations

import torch

from ... import _backend
from .._custom_op import custom_op
from .reference import linear_reference

OP = "linear"
PANEL = 32  # output columns per packed panel (csrc/cpu/linear.cpp kPanel)
# Rows up to which the cpu kernel runs; above, F.linear (MKL) is as fast or faster (measured on a 2-core Xeon
# SPR, 1 and 2 threads, weights 512x1536 .. 2048x512: the kernel streams the weight once per 8 rows from
# cache, MKL's blocked GEMM pulls ahead as the rows grow).
MAX_ROWS = 32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) (``nn.Linear``'s (out, in)) -> (ceil(N / 32), K, 32) contiguous column panels, zero past N:
    ``packed[p, k, j] = weight[32 p + j, k]``."""
    N, K = weight.shape
    P = -(-N // PANEL)
    w = weight.detach()
    if P * PANEL != N:
        w = torch.cat((w, w.new_zeros(P * PANEL - N, K)))
    return w.view(P, PANEL, K).transpose(1, 2).contiguous()


def unpack_weight(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of :func:`pack_weight`: (P, K, 32) -> (out_features, K)."""
    P, K, _ = packed.shape
    return packed.transpose(1, 2).reshape(P * PANEL, K)[:out_features]


def _probe(device: str, dtype: torch.dtype) -> dict:
    return dict(weight=torch.randn(40, 24, device=device, dtype=dtype), bias=None)


def _priority(device: str, **_):
    if device == "cpu":
        return ("cpu", "torch") if _backend.cpu_has_avx512() else ("torch", "cpu")
    return ("torch",)


_backend.declare(
    OP, primary="weight", probe=_probe, priority=_priority,
    torch=_backend.Capability(),
    cpu=_backend.Capability(devices=("cpu",), dtypes=(torch.float32,), needs="_C.cpu", kernels=("linear_packed",)),
)


# ---------------------------------------------------------------------------------------------
# The implementations, by backend name: (x (M, K) contiguous, the weight as the backend prepared it, bias (N,) or
# None, out_features N) -> y (M, N).

def _linear_torch(x, weight, bias, out_features):
    return linear_reference(x, weight, bias)


def _linear_c(x, w_packed, bias, out_features):
    _backend.c_extension()  # (cached) loads _C, which registers torch.ops.vqkernels_C.linear_packed
    return torch.ops.vqkernels_C.linear_packed(x, w_packed, bias, out_features)


_IMPLS = {"torch": _linear_torch, "cpu": _linear_c}


@custom_op("vqkernels::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int,
               backend: str) -> torch.Tensor:
    return _IMPLS[backend](x, weight, bias, out_features)


@_linear_op.register_fake
def _(x, weight, bias, out_features, backend):
    return x.new_empty((x.shape[0], out_features))


class PackedLinear:
    """``F.linear(x, weight, bias)`` for inference, on the backend chosen for ``weight`` when it is built.

    Args:
        weight: (out_features, in_features), ``nn.Linear``'s layout. Kept by reference (the fallback path
            multiplies by it); the cpu backend also keeps a packed copy.
        bias: (out_features,) or None.
        backend: None / "auto" (or ``VQKERNELS_BACKEND``), "torch" or "cpu".

    ``__call__(x (..., in_features)) -> (..., out_features)`` in weight's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        N, K = weight.shape
        if N < 1 or K < 1:
            raise ValueError(f"weight must have at least one row and column, got {tuple(weight.shape)}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
                raise ValueError(f"bias must be None or a ({N},) tensor, got "
                                 f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
            if bias.dtype != weight.dtype or bias.device != weight.device:
                raise TypeError(f"bias must match weight's dtype and device ({weight.dtype}, {weight.device}), "
                                f"got {bias.dtype}, {bias.device}")
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = N, K
        self.backend = _backend.select(OP, backend, weight=weight, bias=bias)
        self._packed = None
        self._bias_packed = None
        if self.backend == "cpu":
            _backend.c_extension()
            with torch.no_grad():
                self._packed = pack_weight(weight)
                self._bias_packed = None if bias is None else bias.detach().contiguous()

    def __repr__(self) -> str:
        return f"PackedLinear(in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, backend={self.backend!r})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be a tensor (..., in_features = {self.in_features}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype != self.weight.dtype or x.device != self.weight.device:
            raise TypeError(f"x must match the weight's dtype and device ({self.weight.dtype}, "
                            f"{self.weight.device}), got {x.dtype}, {x.device}")
        rows = x.numel() // self.in_features
        if (self._packed is None or rows > MAX_ROWS
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return linear_reference(x, self.weight, self.bias)  # the torch backend: F.linear, autograd included
        x2 = x.reshape(rows, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if torch.compiler.is_compiling():
            y = _linear_op(x2, self._packed, self._bias_packed, self.out_features, self.backend)
        else:  # eager: the implementation itself, without the op's dispatch (see the module's docstring)
            y = _IMPLS[self.backend](x2, self._packed, self._bias_packed, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


__all__ = ["PackedLinear", "pack_weight", "unpack_weight", "MAX_ROWS"]
