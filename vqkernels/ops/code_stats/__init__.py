"""Codebook statistics: per-code counts and sums (the EMA codebook update), and code usage.

Public entry points (exported by ``vqkernels``):

- :func:`code_stats` ``(z, indices, num_codes) -> (counts, sums)``: per-code counts and sums of the assigned vectors.
- :func:`ema_update_from_stats_` and :func:`ema_update_`: vector-quantize-pytorch's EMA codebook step, in place.
- :func:`code_usage` ``(indices, num_codes) -> (counts, perplexity)``.

Every op is a ``torch.library`` custom op (``vqkernels::code_stats``, ``vqkernels::code_usage``,
``vqkernels::ema_update_``, ``vqkernels::ema_update_from_stats_``) with a fake (meta) implementation,
so it passes ``torch.library.opcheck`` and runs under ``torch.compile(fullgraph=True)``. The backend is
chosen in the public wrapper (``vqkernels._backend.select``) and travels into the op as a string.

Backends: ``torch`` (reference.py: the spec), ``cpu`` and ``cuda`` (the ``torch.ops.vqkernels_C`` ops
code_stats / code_usage, csrc/cpu/code_stats.cpp and csrc/cuda/code_stats.cpp: one op each, routed by
device), ``triton`` (triton.py). ``ema_update_`` is code_stats on the chosen backend, then the EMA
mixing; ``ema_update_from_stats_`` is elementwise work on (K, D) buffers in PyTorch (no kernel of its
own). On ``triton`` and ``cuda`` the per-code sums are float32 atomic adds, so their last bits may
differ from run to run (the counts are exact). Indices outside [0, K) raise ``IndexError`` on every backend on
CPU tensors; on CUDA tensors ``cuda`` and ``triton`` check them on the device without a host sync (a device-side
assert), or, under ``VQKERNELS_SYNC_INDEX_CHECK=1``, raise ``IndexError`` after reading them back (as vq_loss).
"""
from __future__ import annotations

import torch

from ... import _backend
from .._checks import (
    KERNEL_DTYPES,
    REFERENCE_DTYPES,
    check_indices,
    check_num_codes,
    check_range,
    check_same_device,
    check_shape,
    check_tensor,
)
from .._custom_op import custom_op
from .._launch import interpreter_float32_only, triton_module
from .._layout import acc_dtype, as_btd, flat_rows
from .reference import code_stats_reference, code_usage_reference, ema_update_from_stats_reference

OP = "code_stats"  # counts and sums per code (the EMA statistics)
OP_USAGE = "code_usage"  # histogram of indices + perplexity


# ---------------------------------------------------------------------------------------------
# What each backend can take, over the ops' named arguments:
#   code_stats: z (B, T, D), indices (B, T), num_codes;   code_usage: indices (N,), num_codes

def _probe_stats(device: str, dtype: torch.dtype) -> dict:
    return dict(z=torch.empty(2, 8, 64, device=device, dtype=dtype),
                indices=torch.zeros(2, 8, dtype=torch.int64, device=device), num_codes=32)


def _probe_usage(device: str, dtype: torch.dtype):
    if dtype != torch.float32:  # indices only: the choice does not depend on a float dtype
        return None
    return dict(indices=torch.zeros(16, dtype=torch.int64, device=device), num_codes=32)


_backend.declare(
    OP, primary="z", probe=_probe_stats,
    torch=_backend.Capability(dtypes=REFERENCE_DTYPES),
    cpu=_backend.Capability(devices=("cpu",), dtypes=KERNEL_DTYPES, needs="_C.cpu", kernels=("code_stats",)),
    triton=_backend.Capability(dtypes=KERNEL_DTYPES, needs="triton", limit=interpreter_float32_only),
    cuda=_backend.Capability(devices=("cuda",), dtypes=KERNEL_DTYPES, needs="_C.cuda", kernels=("code_stats",)),
)
_backend.declare(
    OP_USAGE, primary="indices", probe=_probe_usage,
    torch=_backend.Capability(),
    cpu=_backend.Capability(devices=("cpu",), needs="_C.cpu", kernels=("code_usage",)),
    triton=_backend.Capability(needs="triton"),
    cuda=_backend.Capability(devices=("cuda",), needs="_C.cuda", kernels=("code_usage",)),
)


# ---------------------------------------------------------------------------------------------
# The implementations, by backend name. code_stats: z (B, T, D) any strides (see _layout.as_btd),
# indices (B, T) -> (counts (K,), sums (K, D)); the C++ kernels read z in place, the reference and
# Triton take contiguous (N, D) rows. code_usage: indices (N,) contiguous -> (counts, perplexity).

_triton = triton_module(__name__)


def _stats_c(z, indices, num_codes):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.code_stats(z, indices, num_codes))


def _usage_c(indices, num_codes):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.code_usage(indices, num_codes))


_STATS = {
    "torch": lambda z, i, k: code_stats_reference(flat_rows(z), i.reshape(-1).contiguous(), k),
    "cpu": _stats_c,
    "cuda": _stats_c,
    "triton": lambda z, i, k: _triton().code_stats_triton(flat_rows(z), i.reshape(-1).contiguous(), k),
}
_USAGE = {
    "torch": code_usage_reference,
    "cpu": _usage_c,
    "cuda": _usage_c,
    "triton": lambda i, k: _triton().code_usage_triton(i, k),
}


# ---------------------------------------------------------------------------------------------
# The registered ops.

@custom_op("vqkernels::code_stats", mutates_args=())
def _code_stats_op(
    z: torch.Tensor, indices: torch.Tensor, num_codes: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, T, D) any strides, indices (B, T) -> (counts (K,), sums (K, D)), float32 (float64 for float64 z)."""
    counts, sums = _STATS[backend](z, indices, num_codes)
    return counts, sums


@_code_stats_op.register_fake
def _(z, indices, num_codes, backend):
    dt = acc_dtype(z.dtype)
    return z.new_empty((num_codes,), dtype=dt), z.new_empty((num_codes, z.shape[-1]), dtype=dt)


@custom_op("vqkernels::code_usage", mutates_args=())
def _code_usage_op(indices: torch.Tensor, num_codes: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (N,) -> (counts int64 (K,), perplexity float32 0-d)."""
    counts, perplexity = _USAGE[backend](indices.contiguous(), num_codes)
    return counts, perplexity


@_code_usage_op.register_fake
def _(indices, num_codes, backend):
    return indices.new_empty((num_codes,), dtype=torch.int64), indices.new_empty((), dtype=torch.float32)


@custom_op("vqkernels::ema_update_from_stats_", mutates_args=("codebook", "cluster_size", "embed_sum"))
def _ema_update_from_stats_op(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor,
    counts: torch.Tensor, sums: torch.Tensor, decay: float, eps: float,
) -> None:
    ema_update_from_stats_reference(codebook, cluster_size, embed_sum, counts, sums, decay, eps)


@_ema_update_from_stats_op.register_fake
def _(codebook, cluster_size, embed_sum, counts, sums, decay, eps):
    return None


@custom_op("vqkernels::ema_update_", mutates_args=("codebook", "cluster_size", "embed_sum"))
def _ema_update_op(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
    indices: torch.Tensor, decay: float, eps: float, backend: str,
) -> None:
    counts, sums = _STATS[backend](z, indices, codebook.shape[0])
    ema_update_from_stats_reference(codebook, cluster_size, embed_sum, counts, sums, decay, eps)


@_ema_update_op.register_fake
def _(codebook, cluster_size, embed_sum, z, indices, decay, eps, backend):
    return None


# ---------------------------------------------------------------------------------------------
# Argument checks these ops share (the index range is checked inside the ops).

def _check_z(z) -> None:
    check_tensor(z, "z", min_dims=1, layout="(..., D)", floating=True)


def _check_ema_buffers(codebook, cluster_size, embed_sum) -> None:
    for t, n in ((codebook, "codebook"), (cluster_size, "cluster_size"), (embed_sum, "embed_sum")):
        check_tensor(t, n, floating=True)
        check_same_device(t, codebook, (n, "codebook"))
    check_tensor(codebook, "codebook", dims=2, layout="(K, D)")
    K, D = codebook.shape
    if K == 0:
        raise ValueError("codebook must hold at least one code, got K=0")
    check_shape(cluster_size, "cluster_size", (K,), "(K,)")
    check_shape(embed_sum, "embed_sum", (K, D), "(K, D)")


def _check_decay(decay, eps) -> tuple[float, float]:
    return check_range(decay, "decay", 0.0, 1.0), check_range(eps, "eps", 0.0)


# ---------------------------------------------------------------------------------------------
# The public API.

def code_stats(z: torch.Tensor, indices: torch.Tensor, num_codes: int, *, backend: str | None = None):
    """Per-code counts and sums of the vectors assigned to each code, by a fused scatter (no one-hot).

    Args: z (..., D) floating point; indices int64 of shape ``z.shape[:-1]`` in [0, num_codes).
    Returns: ``counts`` float32 (K,), ``sums`` float32 (K, D) (float64 for float64 z), accumulated in
    float32. No gradient flows. For distributed training all-reduce both (sum) across ranks, then call
    :func:`ema_update_from_stats_`.
    """
    _check_z(z)
    check_indices(indices, z.shape[:-1], z.device)
    check_num_codes(num_codes)
    z3 = as_btd(z.detach())
    i3 = indices.reshape(z3.shape[:2])
    name = _backend.select(OP, backend, z=z3, indices=i3, num_codes=num_codes)
    return _code_stats_op(z3, i3, num_codes, name)


def ema_update_from_stats_(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor,
    counts: torch.Tensor, sums: torch.Tensor, *, decay: float, eps: float = 1e-5,
) -> None:
    """vector-quantize-pytorch's EMA mixing and Laplace-smoothed codebook, in place, from (all-reduced) stats.

    In its order of operations (``EuclideanCodebook``: ``ema_inplace`` then ``update_ema``)::

        cluster_size.lerp_(counts, 1 - decay)         # = decay * cluster_size + (1 - decay) * counts
        embed_sum.lerp_(sums, 1 - decay)
        n = cluster_size.sum()
        smoothed = (cluster_size + eps) / (n + K * eps) * n
        codebook.copy_(embed_sum / smoothed[:, None])

    ``cluster_size`` (K,) and ``embed_sum`` (K, D) are the float32 EMA buffers (vector-quantize-pytorch's
    ``cluster_size`` and ``embed_avg``); ``counts`` (K,) and ``sums`` (K, D) come from :func:`code_stats`.
    """
    _check_ema_buffers(codebook, cluster_size, embed_sum)
    decay, eps = _check_decay(decay, eps)
    K, D = codebook.shape
    check_tensor(counts, "counts", device=codebook.device, device_of="the codebook")
    check_tensor(sums, "sums", device=codebook.device, device_of="the codebook")
    check_shape(counts, "counts", (K,), "(K,)")
    check_shape(sums, "sums", (K, D), "(K, D)")
    with torch.no_grad():
        _ema_update_from_stats_op(codebook, cluster_size, embed_sum, counts, sums, decay, eps)


def ema_update_(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
    indices: torch.Tensor, *, decay: float, eps: float = 1e-5, backend: str | None = None,
) -> None:
    """One EMA codebook step in place: :func:`code_stats` of ``(z, indices)`` then :func:`ema_update_from_stats_`.

    z: (..., D) floating point (statistics accumulate in float32); indices: int64, shape ``z.shape[:-1]``.
    No gradient flows; the buffers are modified in place.
    """
    _check_ema_buffers(codebook, cluster_size, embed_sum)
    decay, eps = _check_decay(decay, eps)
    _check_z(z)
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"the last dimension of z ({z.shape[-1]}) must equal the codebook's D ({codebook.shape[1]})")
    check_same_device(z, codebook, ("z", "codebook"))
    check_indices(indices, z.shape[:-1], z.device)
    z3 = as_btd(z.detach())
    i3 = indices.reshape(z3.shape[:2])
    name = _backend.select(OP, backend, z=z3, indices=i3, num_codes=codebook.shape[0])
    with torch.no_grad():
        _ema_update_op(codebook, cluster_size, embed_sum, z3, i3, decay, eps, name)


def code_usage(indices: torch.Tensor, num_codes: int, *, backend: str | None = None):
    """Histogram of code indices and taming's perplexity, by a fused count (no one-hot).

    Returns ``counts`` int64 (K,) and ``perplexity`` float32 0-d: ``exp(-sum p log(p + 1e-10))`` with
    ``p = counts / N`` (1.0 when there are no indices). Indices outside [0, num_codes) raise IndexError (on CUDA
    tensors: see the module's docstring).
    """
    check_tensor(indices, "indices", dtype=torch.int64)
    check_num_codes(num_codes)
    i2 = indices.reshape(-1)
    name = _backend.select(OP_USAGE, backend, indices=i2, num_codes=num_codes)
    return _code_usage_op(i2, num_codes, name)


__all__ = ["code_stats", "code_usage", "ema_update_", "ema_update_from_stats_"]
