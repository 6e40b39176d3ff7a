"""The fused VQ loss and its companions: straight-through gather + loss, EMA codebook statistics, code usage.

Public entry points (exported by ``vqkernels``):

- :func:`vq_loss` ``(z, codebook, indices) -> (z_q, loss)``: the chosen codes with the straight-through
  gradient and taming-transformers' VQ loss, backward fused (no one-hot, no N x K buffer).
- :func:`vector_quantize` ``(z, codebook) -> (z_q, loss, indices)``: :func:`vqkernels.nearest_code` + :func:`vq_loss`.
- :func:`code_stats` ``(z, indices, num_codes) -> (counts, sums)``: per-code counts and sums of the assigned vectors.
- :func:`ema_update_from_stats_` and :func:`ema_update_`: vector-quantize-pytorch's EMA codebook step, in place.
- :func:`code_usage` ``(indices, num_codes) -> (counts, perplexity)``.

Every op is a ``torch.library`` custom op (``vqkernels::vq_loss``, ``vqkernels::vq_loss_backward``,
``vqkernels::code_stats``, ``vqkernels::code_usage``, ``vqkernels::ema_update_``,
``vqkernels::ema_update_from_stats_``) with a fake (meta) implementation, so it passes
``torch.library.opcheck`` and runs under ``torch.compile(fullgraph=True)``. ``vq_loss``'s autograd
formula (``register_autograd``) calls the registered ``vq_loss_backward`` op. The backend is resolved in the
public wrapper (``vqkernels._backend.select``) and travels into the op as a string argument.

Backends: ``torch`` (reference.py: the spec), ``cpu`` (C++, csrc/cpu/vq_loss.cpp: deterministic, bit-identical
for any thread count), ``triton`` (triton.py) and ``cuda`` (CUDA C++, csrc/cuda/vq_loss_kernels.cu, through the
same ``torch.ops.vqkernels_C`` ops as ``cpu``, which route by device). On ``triton`` and ``cuda`` the codebook
gradient and the per-code sums are float32 atomic adds, so their last bits may differ from run to run (the
loss, z_q, grad_z and the counts are deterministic). Indices outside [0, K) raise ``IndexError`` on every
backend (the GPU backends read the indices' min/max back to the host for it: one sync per op call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _backend
from ..nearest_code import METRICS, nearest_code, normalize
from .reference import (
    check_index_range,
    code_stats_reference,
    code_usage_reference,
    ema_update_from_stats_reference,
    vq_loss_bwd_reference,
    vq_loss_fwd_reference,
)

OP_LOSS = "vq_loss"  # the loss forward and backward (one table entry: both run on one backend)
OP_STATS = "code_stats"  # counts and sums per code (EMA statistics)
OP_USAGE = "code_usage"  # histogram of indices + perplexity
OP_FUSED = "vector_quantize_fused"  # search + gather + loss in one forward pass (cpu only; others compose)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
MAX_CODES = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# What each backend can take. Arguments:
#   vq_loss:    (z (B, T, D), codebook (K, D), indices (B, T))
#   code_stats: (z (B, T, D), indices (B, T), num_codes)
#   code_usage: (indices (N,), num_codes)

def _dtype_reason(t, allowed):
    return _dtype_reason_of(t.dtype, allowed)


def _dtype_reason_of(dtype, allowed):
    if dtype not in allowed:
        return [f"dtype {dtype} is not one of {', '.join(str(d) for d in allowed)}"]
    return []


def _c_op_reasons(device: torch.device, op_name: str) -> list[str]:
    r = []
    if device.type != "cpu":
        r.append(f"the cpu kernel takes CPU tensors, got {device.type}")
    if not _backend.has_cpu_kernels():
        err = _backend.c_extension_error()
        r.append("vqkernels._C was not built" + (f" ({err})" if err else ""))
    elif not hasattr(torch.ops.vqkernels_C, op_name):
        r.append(f"this build of vqkernels._C has no {op_name} kernel (rebuild the package)")
    return r


def _triton_reasons(device: torch.device, dtype: torch.dtype | None) -> list[str]:
    r = _backend.triton_device_reasons(device)
    if dtype is not None:
        if dtype not in KERNEL_DTYPES:
            r.append(f"dtype {dtype} is not one of {', '.join(str(d) for d in KERNEL_DTYPES)}")
        elif device.type == "cpu" and dtype != torch.float32:
            r.append("the Triton interpreter runs the vq_loss kernels in float32 only (fp16/bf16 run on a GPU)")
    return r


_CUDA_OPS = ("vq_loss_fwd", "vq_loss_bwd", "code_stats", "code_usage")


@_backend._constant_under_compile
def _vq_loss_cuda_kernels_missing() -> tuple[str, ...]:
    """The vq_loss ops this build of vqkernels._C has no CUDA kernel for (loads _C; cached)."""
    _backend.c_extension()
    return tuple(op for op in _CUDA_OPS
                 if not (hasattr(torch.ops.vqkernels_C, op)  # (an unknown op name raises in the query)
                         and torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels_C::{op}", "CUDA")))


def _cuda_reasons(device: torch.device, dtype: torch.dtype | None) -> list[str]:
    r = []
    if device.type != "cuda":
        r.append(f"the cuda kernel takes CUDA tensors, got {device.type}")
    if not _backend.has_cuda_kernels():
        err = _backend.c_extension_error()
        r.append("vqkernels._C was built without CUDA kernels" if err is None
                 else f"vqkernels._C was not built ({err})")
    else:
        missing = _vq_loss_cuda_kernels_missing()
        if missing:
            r.append(f"this build of vqkernels._C has no CUDA kernel for {', '.join(missing)} (rebuild the package)")
    if dtype is not None:
        r += _dtype_reason_of(dtype, KERNEL_DTYPES)
    return r


@_backend.register(OP_LOSS, "torch")
def _loss_torch_reasons(z, codebook, indices):
    return _dtype_reason(z, REFERENCE_DTYPES)


@_backend.register(OP_LOSS, "cpu")
def _loss_cpu_reasons(z, codebook, indices):
    return _c_op_reasons(z.device, "vq_loss_fwd") + _dtype_reason(z, KERNEL_DTYPES)


@_backend.register(OP_LOSS, "triton")
def _loss_triton_reasons(z, codebook, indices):
    return _triton_reasons(z.device, z.dtype)


@_backend.register(OP_LOSS, "cuda")
def _loss_cuda_reasons(z, codebook, indices):
    return _cuda_reasons(z.device, z.dtype)


@_backend._constant_under_compile
def _cpu_avx512() -> bool:
    """Whether the C++ CPU kernels run their AVX-512 paths here (loads _C; cached)."""
    mod = _backend.c_extension()
    return bool(getattr(mod, "cpu_features", lambda: {})().get("avx512", False))


@_backend.register(OP_FUSED, "cpu")
def _fused_cpu_reasons(z, codebook):
    r = _c_op_reasons(z.device, "vector_quantize_fwd")
    if z.dtype != torch.float32:
        r.append(f"the fused forward is float32 only, got {z.dtype}")
    if not r and not _cpu_avx512():
        r.append("the fused forward needs a CPU with AVX-512")
    return r


@_backend.register(OP_STATS, "torch")
def _stats_torch_reasons(z, indices, num_codes):
    return _dtype_reason(z, REFERENCE_DTYPES)


@_backend.register(OP_STATS, "cpu")
def _stats_cpu_reasons(z, indices, num_codes):
    return _c_op_reasons(z.device, "code_stats") + _dtype_reason(z, KERNEL_DTYPES)


@_backend.register(OP_STATS, "triton")
def _stats_triton_reasons(z, indices, num_codes):
    return _triton_reasons(z.device, z.dtype)


@_backend.register(OP_STATS, "cuda")
def _stats_cuda_reasons(z, indices, num_codes):
    return _cuda_reasons(z.device, z.dtype)


@_backend.register(OP_USAGE, "torch")
def _usage_torch_reasons(indices, num_codes):
    return []


@_backend.register(OP_USAGE, "cpu")
def _usage_cpu_reasons(indices, num_codes):
    return _c_op_reasons(indices.device, "code_usage")


@_backend.register(OP_USAGE, "triton")
def _usage_triton_reasons(indices, num_codes):
    return _triton_reasons(indices.device, None)


@_backend.register(OP_USAGE, "cuda")
def _usage_cuda_reasons(indices, num_codes):
    return _cuda_reasons(indices.device, None)


# ---------------------------------------------------------------------------------------------
# The implementations by backend name. z and grad_zq arrive as (B, T, D) views of the caller's
# tensor, any strides (see _as_btd); indices as (B, T). The C++ kernels (cpu and cuda: the same
# torch.ops.vqkernels_C ops, which route by device) read and write that layout in place (z_q and grad_z
# come back in z's layout, as torch.empty_like(z) gives it); the reference and Triton work on a
# contiguous (N, D) copy and write the result into that layout.

_C_BACKENDS = ("cpu", "cuda")  # the torch.ops.vqkernels_C ops; the dispatcher picks the kernel by device


def _triton():
    from . import triton as tr

    return tr


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _like(z: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``flat`` (N, D) laid out as ``torch.empty_like(z)`` (what the fake implementation promises)."""
    if z.is_contiguous():
        return flat.view(z.shape)
    out = torch.empty_like(z)
    if out.is_contiguous():  # z was not dense: empty_like gives a contiguous tensor
        return flat.view(z.shape)
    out.copy_(flat.view(z.shape))
    return out


def _fwd(backend, z, codebook, indices, scale):
    codebook = codebook.contiguous()
    if backend in _C_BACKENDS:
        _backend.c_extension()
        return tuple(torch.ops.vqkernels_C.vq_loss_fwd(z, codebook, indices, scale))
    z2, i2 = _flat(z), indices.reshape(-1).contiguous()
    if backend == "torch":
        zq, loss = vq_loss_fwd_reference(z2, codebook, i2, scale)
    elif backend == "triton":
        zq, loss = _triton().vq_loss_fwd_triton(z2, codebook, i2, scale)
    else:
        raise RuntimeError(f"vq_loss has no {backend} implementation")
    return _like(z, zq), loss


def _bwd(backend, grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook, need_z, need_cb):
    codebook = codebook.contiguous()
    if backend in _C_BACKENDS:
        _backend.c_extension()
        return tuple(torch.ops.vqkernels_C.vq_loss_bwd(
            grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook, need_z, need_cb))
    args = (_flat(grad_zq), grad_loss, _flat(z), codebook, indices.reshape(-1).contiguous(), w_commit, w_codebook,
            need_z, need_cb)
    if backend == "torch":
        gz, gcb = vq_loss_bwd_reference(*args)
    elif backend == "triton":
        gz, gcb = _triton().vq_loss_bwd_triton(*args)
    else:
        raise RuntimeError(f"vq_loss has no {backend} implementation")
    return (_like(z, gz) if need_z else gz), gcb


def _stats(backend, z, indices, num_codes):
    if backend in _C_BACKENDS:
        _backend.c_extension()
        return tuple(torch.ops.vqkernels_C.code_stats(z, indices, num_codes))
    z2, i2 = _flat(z), indices.reshape(-1).contiguous()
    if backend == "torch":
        return code_stats_reference(z2, i2, num_codes)
    if backend == "triton":
        return _triton().code_stats_triton(z2, i2, num_codes)
    raise RuntimeError(f"code_stats has no {backend} implementation")


def _usage(backend, indices, num_codes):
    indices = indices.contiguous()
    if backend == "torch":
        return code_usage_reference(indices, num_codes)
    if backend in _C_BACKENDS:
        _backend.c_extension()
        return tuple(torch.ops.vqkernels_C.code_usage(indices, num_codes))
    if backend == "triton":
        return _triton().code_usage_triton(indices, num_codes)
    raise RuntimeError(f"code_usage has no {backend} implementation")


def _as_btd(t: torch.Tensor) -> torch.Tensor:
    """A (B, T, D) view of ``t`` (..., D) without a copy where its strides allow (e.g. a channel-first
    feature map permuted to (B, H, W, C) becomes (B, H*W, C)); otherwise a contiguous (1, N, D) copy.
    Rows are numbered in t's logical (row-major) order either way."""
    D = t.shape[-1]
    lead, strides = list(t.shape[:-1]), list(t.stride()[:-1])

    def mergeable(sz, st):
        dims = [(a, b) for a, b in zip(sz, st) if a != 1]
        return all(dims[j][1] == dims[j + 1][1] * dims[j + 1][0] for j in range(len(dims) - 1))

    def prod(xs):
        p = 1
        for x in xs:
            p *= x
        return p

    for i in range(len(lead) + 1):
        if mergeable(lead[:i], strides[:i]) and mergeable(lead[i:], strides[i:]):
            return t.view(prod(lead[:i]), prod(lead[i:]), D)
    return t.contiguous().view(1, -1, D)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The registered ops.

@torch.library.custom_op("vqkernels::vq_loss", mutates_args=())
def _vq_loss_op(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, w_commit: float, w_codebook: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, T, D) any strides, codebook (K, D), indices int64 (B, T) -> (z_q like z, loss 0-d float32).

    z_q has z's shape and dtype and the layout ``torch.empty_like(z)`` gives; the loss is float64 for float64 z.
    """
    D = z.shape[-1]
    N = z.numel() // D if D else 0
    scale = (w_commit + w_codebook) / (N * D) if N * D else 0.0
    z_q, loss = _fwd(backend, z, codebook, indices, scale)
    return z_q, loss


@_vq_loss_op.register_fake
def _(z, codebook, indices, w_commit, w_codebook, backend):
    return torch.empty_like(z), z.new_empty((), dtype=_stats_dtype(z.dtype))


@torch.library.custom_op("vqkernels::vq_loss_backward", mutates_args=())
def _vq_loss_backward_op(
    grad_zq: torch.Tensor, grad_loss: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
    w_commit: float, w_codebook: float, need_grad_z: bool, need_grad_codebook: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_z like z or (0,), grad_codebook (K, D) or (0,)): a gradient not asked for comes back empty."""
    gz, gcb = _bwd(backend, grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook,
                   need_grad_z, need_grad_codebook)
    return gz, gcb


@_vq_loss_backward_op.register_fake
def _(grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook, need_grad_z, need_grad_codebook, backend):
    gz = torch.empty_like(z) if need_grad_z else z.new_empty((0,))
    gcb = codebook.new_empty(codebook.shape if need_grad_codebook else (0,))
    return gz, gcb


def _vq_loss_setup_context(ctx, inputs, output):
    z, codebook, indices, w_commit, w_codebook, backend = inputs
    ctx.save_for_backward(z, codebook, indices)
    ctx.w = (w_commit, w_codebook)
    ctx.backend = backend


def _vq_loss_backward(ctx, grad_zq, grad_loss):
    z, codebook, indices = ctx.saved_tensors
    need_z, need_cb = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_z or need_cb):
        return None, None, None, None, None, None
    gz, gcb = _vq_loss_backward_op(grad_zq, grad_loss, z, codebook, indices, ctx.w[0], ctx.w[1],
                                   need_z, need_cb, ctx.backend)
    return (gz if need_z else None), (gcb if need_cb else None), None, None, None, None


_vq_loss_op.register_autograd(_vq_loss_backward, setup_context=_vq_loss_setup_context)


@torch.library.custom_op("vqkernels::vector_quantize", mutates_args=())
def _vector_quantize_op(
    z: torch.Tensor, codebook: torch.Tensor, metric: int, w_commit: float, w_codebook: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward: z (B, T, D) float32 any strides, codebook (K, D) -> (z_q like z, loss 0-d, indices (B, T)).

    Only ``cpu`` has it (csrc/cpu/vq_fused.cpp); the backward is vq_loss's."""
    if backend != "cpu":
        raise RuntimeError(f"vector_quantize has no fused {backend} forward")
    D = z.shape[-1]
    N = z.numel() // D if D else 0
    scale = (w_commit + w_codebook) / (N * D) if N * D else 0.0
    _backend.c_extension()
    z_q, loss, idx = torch.ops.vqkernels_C.vector_quantize_fwd(z, codebook.contiguous(), metric, scale)
    return z_q, loss, idx


@_vector_quantize_op.register_fake
def _(z, codebook, metric, w_commit, w_codebook, backend):
    return torch.empty_like(z), z.new_empty((), dtype=torch.float32), z.new_empty(z.shape[:-1], dtype=torch.int64)


def _vector_quantize_setup_context(ctx, inputs, output):
    z, codebook, metric, w_commit, w_codebook, backend = inputs
    ctx.save_for_backward(z, codebook, output[2])
    ctx.w = (w_commit, w_codebook)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[2])


def _vector_quantize_backward(ctx, grad_zq, grad_loss, grad_idx):
    z, codebook, indices = ctx.saved_tensors
    need_z, need_cb = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_z or need_cb):
        return None, None, None, None, None, None
    if grad_zq is None:
        grad_zq = torch.zeros_like(z)
    if grad_loss is None:
        grad_loss = z.new_zeros((), dtype=torch.float32)
    gz, gcb = _vq_loss_backward_op(grad_zq, grad_loss, z, codebook, indices, ctx.w[0], ctx.w[1],
                                   need_z, need_cb, ctx.backend)
    return (gz if need_z else None), (gcb if need_cb else None), None, None, None, None


_vector_quantize_op.register_autograd(_vector_quantize_backward, setup_context=_vector_quantize_setup_context)


@torch.library.custom_op("vqkernels::code_stats", mutates_args=())
def _code_stats_op(z: torch.Tensor, indices: torch.Tensor, num_codes: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, T, D) any strides, indices (B, T) -> (counts (K,), sums (K, D)), float32 (float64 for float64 z)."""
    counts, sums = _stats(backend, z, indices, num_codes)
    return counts, sums


@_code_stats_op.register_fake
def _(z, indices, num_codes, backend):
    dt = _stats_dtype(z.dtype)
    return z.new_empty((num_codes,), dtype=dt), z.new_empty((num_codes, z.shape[-1]), dtype=dt)


@torch.library.custom_op("vqkernels::code_usage", mutates_args=())
def _code_usage_op(indices: torch.Tensor, num_codes: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (N,) -> (counts int64 (K,), perplexity float32 0-d)."""
    counts, perplexity = _usage(backend, indices, num_codes)
    return counts, perplexity


@_code_usage_op.register_fake
def _(indices, num_codes, backend):
    return indices.new_empty((num_codes,), dtype=torch.int64), indices.new_empty((), dtype=torch.float32)


@torch.library.custom_op(
    "vqkernels::ema_update_from_stats_", mutates_args=("codebook", "cluster_size", "embed_sum"))
def _ema_update_from_stats_op(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor,
    counts: torch.Tensor, sums: torch.Tensor, decay: float, eps: float,
) -> None:
    ema_update_from_stats_reference(codebook, cluster_size, embed_sum, counts, sums, decay, eps)


@_ema_update_from_stats_op.register_fake
def _(codebook, cluster_size, embed_sum, counts, sums, decay, eps):
    return None


@torch.library.custom_op("vqkernels::ema_update_", mutates_args=("codebook", "cluster_size", "embed_sum"))
def _ema_update_op(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
    indices: torch.Tensor, decay: float, eps: float, backend: str,
) -> None:
    counts, sums = _stats(backend, z, indices, codebook.shape[0])
    ema_update_from_stats_reference(codebook, cluster_size, embed_sum, counts, sums, decay, eps)


@_ema_update_op.register_fake
def _(codebook, cluster_size, embed_sum, z, indices, decay, eps, backend):
    return None


# ---------------------------------------------------------------------------------------------
# Argument checks (static: shapes, dtypes, devices; the index range is checked inside the ops).

def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_indices(indices, lead, device, what="z.shape[:-1]"):
    _check_tensor(indices, "indices")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64 (torch.long), got {indices.dtype}")
    if tuple(indices.shape) != tuple(lead):
        raise ValueError(f"indices must have shape {what} = {tuple(lead)}, got {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"indices must be on the device of z ({device}), got {indices.device}")


def check_z_codebook(z: torch.Tensor, codebook: torch.Tensor) -> None:
    """Raise a clear error (naming the argument) for a z/codebook pair no backend should see."""
    _check_tensor(z, "z")
    _check_tensor(codebook, "codebook")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if z.dim() < 1:
        raise ValueError("z must have at least one dimension (..., D), got a 0-d tensor")
    if not z.dtype.is_floating_point:
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
    if not codebook.dtype.is_floating_point:
        raise TypeError(f"codebook must be a floating-point tensor, got {codebook.dtype}")
    if z.dtype != codebook.dtype:
        raise TypeError(f"z and codebook must share a dtype, got z {z.dtype} and codebook {codebook.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on one device, got z on {z.device} and codebook on {codebook.device}")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"the last dimension of z ({z.shape[-1]}) must equal the codebook's code dimension D "
            f"({codebook.shape[1]}); z has shape {tuple(z.shape)}, codebook {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code, got K=0")


def _check_num_codes(num_codes):
    if isinstance(num_codes, bool) or not isinstance(num_codes, int):
        raise TypeError(f"num_codes must be an int, got {type(num_codes).__name__}")
    if not 1 <= num_codes <= MAX_CODES:
        raise ValueError(f"num_codes must be in [1, {MAX_CODES}], got {num_codes}")


def _normalize(t: torch.Tensor) -> torch.Tensor:
    """Differentiable l2 normalisation of the last dim: float64 in float64, others as nearest_code's (in float32)."""
    if t.dtype == torch.float64:
        return F.normalize(t, dim=-1, eps=1e-12)
    return normalize(t)


def _weights(beta: float, legacy: bool) -> tuple[float, float]:
    """(weight of the commitment term (gradient to z), weight of the codebook term (gradient to the codes))."""
    beta = float(beta)
    return (1.0, beta) if legacy else (beta, 1.0)


# ---------------------------------------------------------------------------------------------
# The public API.

def vq_loss(
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    *,
    beta: float = 0.25,
    legacy: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen codes with a straight-through gradient, and the VQ loss, forward and backward fused.

    Args:
        z: (..., D) float32, float16 or bfloat16 (float64 on the ``torch`` backend); any strides.
        codebook: (K, D), same dtype and device as ``z``.
        indices: int64 of shape ``z.shape[:-1]``, values in [0, K) (else ``IndexError``).
        beta: the weight of one of the two terms, placed as taming-transformers' ``VectorQuantizer2``:
            ``legacy=True`` (its default): ``loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``;
            ``legacy=False``: ``loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)``.
        backend: ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"auto"``/None (see :mod:`vqkernels._backend`).

    Returns:
        ``z_q``: shape and dtype of ``z``, the value ``codebook[indices]``; its gradient passes to ``z``
        unchanged (straight-through) and nothing from it reaches the codebook.
        ``loss``: a float32 scalar (float64 for float64 input), accumulated in float32 for
        float16/bfloat16 inputs. Its gradient: to ``z`` ``w_commit * 2 (z - z_q) / numel``, to
        ``codebook[k]`` the sum over the rows that chose ``k`` of ``w_cb * 2 (z_q - z) / numel``.
    """
    check_z_codebook(z, codebook)
    _check_indices(indices, z.shape[:-1], z.device)
    w_commit, w_cb = _weights(beta, legacy)
    z3 = _as_btd(z)
    i3 = indices.reshape(z3.shape[:2])
    name = _backend.select(OP_LOSS, backend, z3, codebook, i3)
    z_q, loss = _vq_loss_op(z3, codebook, i3, w_commit, w_cb, name)
    return z_q.view(z.shape), loss


def vector_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float = 0.25,
    legacy: bool = True,
    metric: str = "l2",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-code search, gather, straight-through output and VQ loss: ``(z_q, loss, indices)``.

    ``metric="l2"``: :func:`vqkernels.nearest_code` then :func:`vq_loss` on ``z`` and ``codebook``; on the
    ``cpu`` backend (float32, AVX-512) both in one fused forward pass over ``z`` (search, gather, loss),
    reading a strided ``z`` (e.g. a channel-first map) in place.
    ``metric="cosine"``: ``z`` and ``codebook`` are l2-normalised first (differentiably, ``F.normalize``
    in float32, rounded back to the input dtype), and the search, ``z_q`` and the loss are all on the
    normalised vectors (as LlamaGen and ViT-VQGAN do): ``z_q`` is a unit vector and the gradients flow
    back through the normalisation to ``z`` and ``codebook``.

    ``indices`` (int64, shape ``z.shape[:-1]``) carry no gradient. ``backend`` applies to both the search
    and the loss; under ``auto`` each picks its own fastest backend.
    """
    check_z_codebook(z, codebook)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    if metric == "cosine":
        z, codebook = _normalize(z), _normalize(codebook)
    want = _backend.requested_backend(backend)
    if want in ("auto", "cpu") and z.shape[-1] > 0:
        z3 = _as_btd(z)
        if not _backend.not_supported_reasons(OP_FUSED, "cpu", z3, codebook):
            w_commit, w_cb = _weights(beta, legacy)
            z_q, loss, idx = _vector_quantize_op(z3, codebook, METRICS[metric], w_commit, w_cb, "cpu")
            return z_q.view(z.shape), loss, idx.view(z.shape[:-1])
    indices = nearest_code(z.detach(), codebook.detach(), metric=metric, backend=backend)
    z_q, loss = vq_loss(z, codebook, indices, beta=beta, legacy=legacy, backend=backend)
    return z_q, loss, indices


def code_stats(z: torch.Tensor, indices: torch.Tensor, num_codes: int, *, backend: str | None = None):
    """Per-code counts and sums of the vectors assigned to each code, by a fused scatter (no one-hot).

    Args: z (..., D) floating point; indices int64 of shape ``z.shape[:-1]`` in [0, num_codes).
    Returns: ``counts`` float32 (K,), ``sums`` float32 (K, D) (float64 for float64 z), accumulated in
    float32. No gradient flows. For distributed training all-reduce both (sum) across ranks, then call
    :func:`ema_update_from_stats_`.
    """
    _check_tensor(z, "z")
    if z.dim() < 1:
        raise ValueError("z must have at least one dimension (..., D), got a 0-d tensor")
    if not z.dtype.is_floating_point:
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
    _check_indices(indices, z.shape[:-1], z.device)
    _check_num_codes(num_codes)
    z3 = _as_btd(z.detach())
    i3 = indices.reshape(z3.shape[:2])
    name = _backend.select(OP_STATS, backend, z3, i3, num_codes)
    return _code_stats_op(z3, i3, num_codes, name)


def _check_ema_buffers(codebook, cluster_size, embed_sum):
    for t, n in ((codebook, "codebook"), (cluster_size, "cluster_size"), (embed_sum, "embed_sum")):
        _check_tensor(t, n)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{n} must be a floating-point tensor, got {t.dtype}")
        if t.device != codebook.device:
            raise ValueError(f"{n} must be on the codebook's device ({codebook.device}), got {t.device}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    K, D = codebook.shape
    if K == 0:
        raise ValueError("codebook must hold at least one code, got K=0")
    if tuple(cluster_size.shape) != (K,):
        raise ValueError(f"cluster_size must have shape (K,) = ({K},), got {tuple(cluster_size.shape)}")
    if tuple(embed_sum.shape) != (K, D):
        raise ValueError(f"embed_sum must have shape (K, D) = ({K}, {D}), got {tuple(embed_sum.shape)}")


def _check_decay(decay, eps):
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


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
    _check_decay(decay, eps)
    K, D = codebook.shape
    _check_tensor(counts, "counts")
    _check_tensor(sums, "sums")
    if tuple(counts.shape) != (K,) or tuple(sums.shape) != (K, D):
        raise ValueError(f"counts and sums must have shapes ({K},) and ({K}, {D}), got "
                         f"{tuple(counts.shape)} and {tuple(sums.shape)}")
    if counts.device != codebook.device or sums.device != codebook.device:
        raise ValueError(f"counts and sums must be on the codebook's device ({codebook.device})")
    with torch.no_grad():
        _ema_update_from_stats_op(codebook, cluster_size, embed_sum, counts, sums, float(decay), float(eps))


def ema_update_(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
    indices: torch.Tensor, *, decay: float, eps: float = 1e-5, backend: str | None = None,
) -> None:
    """One EMA codebook step in place: :func:`code_stats` of ``(z, indices)`` then :func:`ema_update_from_stats_`.

    z: (..., D) floating point (statistics accumulate in float32); indices: int64, shape ``z.shape[:-1]``.
    No gradient flows; the buffers are modified in place.
    """
    _check_ema_buffers(codebook, cluster_size, embed_sum)
    _check_decay(decay, eps)
    _check_tensor(z, "z")
    if z.dim() < 1 or not z.dtype.is_floating_point:
        raise TypeError(f"z must be a floating-point tensor with at least one dimension, got {z.dtype} {tuple(z.shape)}")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"the last dimension of z ({z.shape[-1]}) must equal the codebook's D ({codebook.shape[1]})")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on one device, got z on {z.device} and codebook on {codebook.device}")
    _check_indices(indices, z.shape[:-1], z.device)
    z3 = _as_btd(z.detach())
    i3 = indices.reshape(z3.shape[:2])
    name = _backend.select(OP_STATS, backend, z3, i3, codebook.shape[0])
    with torch.no_grad():
        _ema_update_op(codebook, cluster_size, embed_sum, z3, i3, float(decay), float(eps), name)


def code_usage(indices: torch.Tensor, num_codes: int, *, backend: str | None = None):
    """Histogram of code indices and taming's perplexity, by a fused count (no one-hot).

    Returns ``counts`` int64 (K,) and ``perplexity`` float32 0-d: ``exp(-sum p log(p + 1e-10))`` with
    ``p = counts / N`` (1.0 when there are no indices). Indices outside [0, num_codes) raise IndexError.
    """
    _check_tensor(indices, "indices")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64 (torch.long), got {indices.dtype}")
    _check_num_codes(num_codes)
    i2 = indices.reshape(-1)
    name = _backend.select(OP_USAGE, backend, i2, num_codes)
    return _code_usage_op(i2, num_codes, name)


__all__ = [
    "check_index_range", "code_stats", "code_usage", "ema_update_", "ema_update_from_stats_", "vector_quantize",
    "vq_loss",
]
