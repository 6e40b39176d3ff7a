"""Scaled dot-product attention: full and causal, grouped heads, fused backward, and cached decoding.

Public entry points (exported by ``vqkernels``):

- :func:`attention` ``(q, k, v, *, causal=False, scale=None) -> out`` and :func:`causal_attention` (``causal=True``).
- :func:`attention_with_lse`: the same, also returning the row log-sum-exp.
- :func:`attention_with_kv_cache` ``(q, k_cache, v_cache, cache_seqlens) -> out``: decoding over a preallocated cache.

The function (reference.py is the spec): q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh) with H % Hkv == 0 (query head h
reads kv head h // (H / Hkv)); ``out = softmax(scale * q k^T [+ causal mask]) v`` in q's dtype, with
``scale = Dh ** -0.5`` by default and the causal mask aligned to the bottom right (query i sees keys
j <= i + Tk - Tq, as flash-attn). A query that sees no key (causal, Tq > Tk) outputs 0, has lse -inf and
gets zero gradients. lse (B, H, Tq) is float32 (float64 for float64 inputs), natural log.

Registered ops (``torch.library``; fake implementations, so ``opcheck`` and ``torch.compile(fullgraph=True)``
work): ``vqkernels::attention_fwd`` -> (out, lse), ``vqkernels::attention_bwd`` -> (dq, dk, dv) (the autograd
formula of attention_fwd calls it), ``vqkernels::attention_with_kv_cache`` -> out (no autograd). Outputs are
contiguous, except on ``cpu``: out laid out as ``empty_like(q)``, the gradients (B, T, H, Dh) buffers
viewed (B, H, T, Dh) (what PyTorch's kernel writes; no copy). The backend is resolved in the public wrapper (``vqkernels._backend.select``) and travels into the
op as a string.

Backends:
- ``torch``: reference.py, any device and dtype (float64 too), any Dh, chunked over queries.
- ``cpu``: float32 on a CPU with AVX-512, and bfloat16 on one with AMX-BF16 where MKL's bfloat16 GEMM is in the
  process (and _C built): our C++ flash attention, forward and backward (csrc/cpu/attention_flash.cpp; 1.3-2x
  PyTorch's kernel at the benchmark sizes, see :func:`_cpu_flash`).
  Otherwise forward and backward through PyTorch's own CPU flash-attention kernel
  (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward), which is top-left causal: this
  module makes it compute our function (rows that see no key are cut off, bottom-right masks for Tq < Tk
  are passed as an additive mask; grouped heads go in unexpanded, the kernel supports them). Its float16 /
  bfloat16 backward runs in float32 (PyTorch's half-precision backward misses the 2x accuracy rule on dv).
  Decoding through our C++ kernel (csrc/cpu/attention.cpp): no mask tensor, no copy of the cache, grouped
  heads without expanding, reads only [0, len_b).
- ``triton``: triton.py (forward, backward, decoding); Dh in [8, 256].
- ``cuda``: CUDA C++ (csrc/cuda/attention*.cu) through ``torch.ops.vqkernels_C``; Dh in [8, 256], Dh % 8 == 0.
- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (flash, cuDNN or memory-efficient, as torch picks) made to
  compute this function (sdpa.py); float32/float16/bfloat16, any device. On CUDA tensors ``auto`` tries cuda,
  triton, then sdpa, then the reference: where our kernels cannot run or failed their self-check, a fast kernel
  that PyTorch ships still serves. Its backward is PyTorch's autograd (not the registered ops); its lse (only
  :func:`attention_with_lse` asks for it) comes from the reference's chunked pass.

Inputs may have any strides: a kernel reads them in place when their last dimension is unit-stride (e.g. a
fused qkv projection (B, T, 3, H, Dh) permuted to (B, H, T, Dh)); otherwise they are copied first.
"""
from __future__ import annotations

import math
import os

import torch

from ... import _backend
from .._custom_op import custom_op
from .._launch import triton_module
from .._launch import unit_last as _unit_last
from .reference import (
    attention_bwd_reference,
    attention_decode_reference,
    attention_fwd_reference,
    compute_dtype,
)

OP = "attention"  # forward and backward (one table entry: both run on one backend)
OP_DECODE = "attention_with_kv_cache"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
GPU_HEAD_DIMS = (8, 256)


# ---------------------------------------------------------------------------------------------
# What each backend can take (declared as data; see vqkernels/_backend.py). The limits take the op's
# named arguments: attention (q, k, v, causal, scale), attention_with_kv_cache (q, k_cache, v_cache,
# cache_seqlens, scale).

@_backend._constant_under_compile
def _triton_module_error() -> str | None:
    """Why ``vqkernels.ops.attention.triton`` does not import (None: it does). Cached."""
    try:
        from . import triton  # noqa: F401
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _head_dim_reasons(Dh: int, lo: int, hi: int, multiple: int = 1) -> list[str]:
    r = []
    if not lo <= Dh <= hi:
        r.append(f"head dim {Dh} is not in [{lo}, {hi}]")
    elif Dh % multiple:
        r.append(f"head dim {Dh} is not a multiple of {multiple}")
    return r


def _triton_limit(q, **_) -> list[str]:
    r = _head_dim_reasons(q.shape[-1], *GPU_HEAD_DIMS)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        r.append("bfloat16 tl.dot is wrong under the Triton interpreter (bfloat16 Triton runs on a GPU)")
    if not r:
        err = _triton_module_error()
        if err is not None:
            r.append(f"vqkernels.ops.attention.triton does not import ({err})")
    return r


def _cuda_limit(q, **_) -> list[str]:
    return _head_dim_reasons(q.shape[-1], *GPU_HEAD_DIMS, multiple=8)


def _probe(device: str, dtype: torch.dtype) -> dict:
    q = torch.randn(1, 2, 3, 64, device=device, dtype=dtype)
    k = torch.randn(1, 1, 3, 64, device=device, dtype=dtype)
    return dict(q=q, k=k, v=k.clone(), causal=True, scale=0.125)


def _probe_decode(device: str, dtype: torch.dtype) -> dict:
    q = torch.randn(1, 2, 1, 64, device=device, dtype=dtype)
    kc = torch.randn(1, 1, 8, 64, device=device, dtype=dtype)
    lens = torch.full((1,), 5, dtype=torch.int32, device=device)
    return dict(q=q, k_cache=kc, v_cache=kc.clone(), cache_seqlens=lens, scale=0.125)


_backend.declare(
    OP, primary="q", probe=_probe,
    torch=_backend.Capability(dtypes=REFERENCE_DTYPES),
    cpu=_backend.Capability(devices=("cpu",), dtypes=REFERENCE_DTYPES),
    triton=_backend.Capability(dtypes=KERNEL_DTYPES, needs="triton", limit=_triton_limit),
    cuda=_backend.Capability(devices=("cuda",), dtypes=KERNEL_DTYPES, needs="_C.cuda",
                             kernels=("attention_fwd", "attention_bwd"), limit=_cuda_limit),
    sdpa=_backend.Capability(dtypes=KERNEL_DTYPES),
)
_backend.declare(
    OP_DECODE, primary="q", probe=_probe_decode,
    torch=_backend.Capability(dtypes=REFERENCE_DTYPES),
    cpu=_backend.Capability(devices=("cpu",), dtypes=KERNEL_DTYPES, needs="_C.cpu", kernels=("attention_decode",)),
    triton=_backend.Capability(dtypes=KERNEL_DTYPES, needs="triton", limit=_triton_limit),
    cuda=_backend.Capability(devices=("cuda",), dtypes=KERNEL_DTYPES, needs="_C.cuda",
                             kernels=("attention_decode",), limit=_cuda_limit),
    sdpa=_backend.Capability(dtypes=KERNEL_DTYPES),
)


# ---------------------------------------------------------------------------------------------
# The implementations by backend name. Outputs are contiguous (cpu: see _cpu_fwd_layout; the fakes say the same).

_triton = triton_module(__name__)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype)


def _cpu_causal_mask(Tq: int, Tk: int, dtype, device) -> torch.Tensor:
    """Additive bottom-right causal mask (Tq, Tk) for PyTorch's CPU flash kernel (which only knows top-left)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return torch.zeros((Tq, Tk), dtype=dtype, device=device).masked_fill_(j > i + (Tk - Tq), float("-inf"))


def _cpu_plan(Tq: int, Tk: int, causal: bool):
    """How PyTorch's CPU flash kernel computes our function: (first live query row, is_causal, needs a mask).

    Causal with Tq > Tk: rows [0, Tq - Tk) see no key (output 0, lse -inf); the rest is a square causal
    problem, where top-left and bottom-right alignment agree. Causal with Tq < Tk: an additive mask."""
    if not causal:
        return 0, False, False
    if Tq >= Tk:
        return Tq - Tk, True, False
    return 0, False, True


# PyTorch's CPU flash kernel returns out laid out as torch.empty_like(q), lse as a (B, Tq, H) buffer viewed
# (B, H, Tq), and the gradients as (B, T, H, Dh) buffers viewed (B, H, T, Dh). The cpu backend keeps the
# layouts of out and the gradients (the fakes promise them): copying them into contiguous tensors cost ~7%
# of a causal forward + backward at (8, 8, 256, 64) (measured), and a (B, T, H, Dh) layout is what the
# output projection reads anyway.

def _bthd(shape, dtype, device) -> torch.Tensor:
    """An output (B, H, T, D) laid out as (B, T, H, D) (poisoned under VQKERNELS_POISON_OUTPUTS=1)."""
    B, H, T = shape[:3]
    return _backend.new_output((B, T, H) + tuple(shape[3:]), dtype, device).transpose(1, 2)


def _cpu_fwd_layout(q: torch.Tensor):
    B, H, Tq, _ = q.shape
    out = torch.empty_like(q)
    if _backend.poison_outputs():
        out.fill_(float("nan"))
    # (lse is made contiguous: it is small, and Inductor mis-tracked a strided lse saved for the backward.)
    return out, _backend.new_output((B, H, Tq), _lse_dtype(q.dtype), q.device)


def _into(layout: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t in the layout of ``layout`` (t itself when it already has it)."""
    if t.stride() == layout.stride():
        return t
    layout.copy_(t)
    return layout


def _cpu_flash(q: torch.Tensor) -> bool:
    """Whether the cpu backend runs our C++ flash attention (csrc/cpu/attention_flash.cpp) rather than PyTorch's
    kernel; from the dtype and the build alone (never from values), the same answer in forward and backward.

    float32 on a CPU with AVX-512: its GEMMs (MKL) are bigger than PyTorch's tiles and its softmax passes are
    AVX-512. Measured causal forward + backward (medians, one process, Xeon Sapphire Rapids, shared and noisy):
    one thread (8, 8, 256, 64) 38 ms against PyTorch's 55 (minGPT 73), (4, 16, 1024, 64) 344 against 512 (minGPT
    1831); two threads 19.5 against 29 (minGPT 60) and 188 against 297 (minGPT 1097).
    bfloat16 where MKL's bfloat16 GEMM runs on AMX tiles (:func:`vqkernels._backend.cpu_has_bf16_gemm`): the
    kernel's GEMMs take bfloat16 operands; the backward only (:func:`_cpu_flash_fwd`): PyTorch's bfloat16 forward
    (oneDNN brgemm on AMX) is faster than ours (4.3 against 5.9 ms at (8, 8, 256, 64), one thread), our
    backward much faster than its (fwd + bwd 15.4 against 40.9 ms; benchmarks/results/2026-11-26-*). Elsewhere bfloat16
    and float16 stay on PyTorch's kernel: ours would widen them to float32, no faster than PyTorch's bfloat16
    forward + float32 backward (413 against 433 ms at (4, 16, 1024, 64), one thread; 43 against 43 at
    (8, 8, 256, 64)); a CPU with avx512_bf16 but no AMX (Zen 4) is unmeasured. Without AVX-512 (portable loops,
    unmeasured) PyTorch's kernel stays too."""
    if os.environ.get("VQKERNELS_CPU_NO_FLASH", "0") not in ("", "0"):
        return False
    if q.dtype == torch.float32:
        return _backend.has_cpu_kernels() and _backend.cpu_has_avx512()
    return q.dtype == torch.bfloat16 and _backend.has_cpu_kernels() and _backend.cpu_has_bf16_gemm()


def _cpu_flash_fwd(q: torch.Tensor) -> bool:
    """Whether the cpu forward runs our kernel: as :func:`_cpu_flash`, float32 only (see there)."""
    return q.dtype == torch.float32 and _cpu_flash(q)


def _cpu_fwd(q, k, v, causal, scale):
    if _cpu_flash_fwd(q):
        return torch.ops.vqkernels_C.attention_fwd(q, k, v, causal, scale)
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    r0, is_causal, masked = _cpu_plan(Tq, Tk, causal)
    mask = _cpu_causal_mask(Tq, Tk, q.dtype, q.device) if masked else None
    o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[:, :, r0:], k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    out, lse = _cpu_fwd_layout(q)
    if r0 == 0:
        return _into(out, o), _into(lse, l.to(lse.dtype))
    out[:, :, :r0] = 0
    lse[:, :, :r0] = float("-inf")
    out[:, :, r0:] = o
    lse[:, :, r0:] = l
    return out, lse


def _cpu_bwd(grad_out, q, k, v, out, lse, causal, scale):
    if _cpu_flash(q):
        return torch.ops.vqkernels_C.attention_bwd(grad_out, q, k, v, out, lse, causal, scale)
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    r0, is_causal, masked = _cpu_plan(Tq, Tk, causal)
    # float16/bfloat16: the backward runs in float32. PyTorch's half-precision backward misses the accuracy
    # rule (dv error up to ~2.5x an explicit half-precision computation's, measured at T = 129); in float32 it
    # is as accurate as the reference. Cost, measured on one thread: none at (8, 8, 256, 64), ~1.4x SDPA's
    # bfloat16 forward + backward at (4, 16, 1024, 64), where PyTorch's bfloat16 kernel is much faster.
    wide = q.dtype in (torch.float16, torch.bfloat16)
    cast = (lambda t: t.float()) if wide else (lambda t: t)
    mask = _cpu_causal_mask(Tq, Tk, torch.float32 if wide else q.dtype, q.device) if masked else None
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        cast(grad_out[:, :, r0:]), cast(q[:, :, r0:]), cast(k), cast(v), cast(out[:, :, r0:]), lse[:, :, r0:], 0.0,
        is_causal, attn_mask=mask, scale=scale)
    gq = _bthd(q.shape, q.dtype, q.device)
    if r0 > 0:
        gq[:, :, :r0] = 0
        gq[:, :, r0:] = dq
    else:
        gq = _into(gq, dq.to(q.dtype))
    return (gq, _into(_bthd(k.shape, k.dtype, k.device), dk.to(k.dtype)),
            _into(_bthd(v.shape, v.dtype, v.device), dv.to(v.dtype)))


def _fwd(backend, q, k, v, causal, scale):
    if backend == "torch" or q.numel() == 0:  # (an empty problem: no kernel needs to see it)
        return attention_fwd_reference(q, k, v, causal, scale)
    if backend == "cpu":
        return _cpu_fwd(q, k, v, causal, scale)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if backend == "triton":
        out, lse = _triton().attention_fwd_triton(q, k, v, causal, scale)
    elif backend == "cuda":
        _backend.c_extension()
        out, lse = torch.ops.vqkernels_C.attention_fwd(q, k, v, causal, scale)
    else:
        raise RuntimeError(f"attention has no {backend} implementation")
    return out.contiguous(), lse.contiguous()


def _bwd(backend, grad_out, q, k, v, out, lse, causal, scale):
    if backend == "torch" or q.numel() == 0:
        return attention_bwd_reference(grad_out, q, k, v, out, lse, causal, scale)
    if backend == "cpu":
        return _cpu_bwd(grad_out, q, k, v, out, lse, causal, scale)
    grad_out, q, k, v, out = (_unit_last(t) for t in (grad_out, q, k, v, out))
    if backend == "triton":
        dq, dk, dv = _triton().attention_bwd_triton(grad_out, q, k, v, out, lse, causal, scale)
    elif backend == "cuda":
        _backend.c_extension()
        dq, dk, dv = torch.ops.vqkernels_C.attention_bwd(grad_out, q, k, v, out, lse, causal, scale)
    else:
        raise RuntimeError(f"attention has no {backend} implementation")
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _decode(backend, q, k_cache, v_cache, cache_seqlens, scale):
    if backend == "torch":
        return attention_decode_reference(q, k_cache, v_cache, cache_seqlens, scale)
    q, k_cache, v_cache = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    if backend in ("cpu", "cuda"):
        _backend.c_extension()
        out = torch.ops.vqkernels_C.attention_decode(q, k_cache, v_cache, cache_seqlens, scale)
    elif backend == "triton":
        out = _triton().attention_decode_triton(q, k_cache, v_cache, cache_seqlens, scale)
    else:
        raise RuntimeError(f"attention_with_kv_cache has no {backend} implementation")
    return out.contiguous()


def _host_checks_seqlens(backend: str) -> bool:
    """Whether the op layer checks cache_seqlens' values here. Not on ``cpu`` (the C++ kernel checks them as
    it reads them). On CUDA tensors (``cuda``, ``triton``) the check runs on the device without a host sync
    (see :func:`_check_seqlen_values`), so a decoding step overlaps with the host and can be graph-captured."""
    return backend != "cpu"


def _sync_checks() -> bool:
    return os.environ.get("VQKERNELS_SYNC_INDEX_CHECK", "0") not in ("", "0")


def _check_seqlen_values(cache_seqlens: torch.Tensor, Tq: int, Tmax: int) -> None:
    """Tq <= cache_seqlens[b] <= Tmax for every b.

    On the CPU (and on CUDA under VQKERNELS_SYNC_INDEX_CHECK=1) the values are read back and a bad one raises
    ValueError. On CUDA the check is a device-side assert queued before the kernels (as torch's own index ops
    report a bad index on CUDA): no host sync, and a kernel never runs on a bad length."""
    if cache_seqlens.numel() == 0:
        return
    msg = (f"cache_seqlens must be in [Tq, Tmax] = [{Tq}, {Tmax}] (each sequence's valid cache length, "
           f"the {Tq} new tokens included)")
    if cache_seqlens.device.type == "cuda" and (torch.cuda.is_current_stream_capturing() or not _sync_checks()):
        torch._assert_async(((cache_seqlens >= Tq) & (cache_seqlens <= Tmax)).all(), msg)
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < Tq or hi > Tmax:
        raise ValueError(f"{msg}, got {lo if lo < Tq else hi}")


# ---------------------------------------------------------------------------------------------
# The registered ops.

@custom_op("vqkernels::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Tq, Dh), k, v (B, Hkv, Tk, Dh) any strides -> (out (B, H, Tq, Dh) q's dtype, lse (B, H, Tq) float32)."""
    return _fwd(backend, q, k, v, causal, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, scale, backend):
    B, H, Tq, Dh = q.shape
    if backend == "cpu" and q.numel():
        return _cpu_fwd_layout(q)
    return q.new_empty((B, H, Tq, Dh)), q.new_empty((B, H, Tq), dtype=_lse_dtype(q.dtype))


@custom_op("vqkernels::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, causal: bool, scale: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq (B, H, Tq, Dh), dk, dv (B, Hkv, Tk, Dh)) contiguous; dk/dv summed over the grouped query heads."""
    return _bwd(backend, grad_out, q, k, v, out, lse, causal, scale)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale, backend):
    if backend == "cpu" and q.numel():
        return _bthd(q.shape, q.dtype, q.device), _bthd(k.shape, k.dtype, k.device), _bthd(v.shape, v.dtype, v.device)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@custom_op("vqkernels::attention_with_kv_cache", mutates_args=())
def _attention_kv_cache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """q (B, H, Tq, Dh), k_cache, v_cache (B, Hkv, Tmax, Dh), cache_seqlens int32 (B,) -> out (B, H, Tq, Dh).

    Inference only: it has no autograd formula (a gradient through it raises)."""
    if _host_checks_seqlens(backend):
        _check_seqlen_values(cache_seqlens, q.shape[2], k_cache.shape[2])
    return _decode(backend, q, k_cache, v_cache, cache_seqlens, scale)


@_attention_kv_cache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, backend):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------
# Argument checks (static: ranks, shapes, dtypes, devices; cache_seqlens' values are checked inside the op).

def _check_tensor(t, name: str, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {shape_doc}, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {t.dtype}")


def _check_qkv(q, k, v, kname: str = "k", vname: str = "v", tname: str = "Tk") -> None:
    _check_tensor(q, "q", "(B, H, Tq, Dh)")
    _check_tensor(k, kname, f"(B, Hkv, {tname}, Dh)")
    _check_tensor(v, vname, f"(B, Hkv, {tname}, Dh)")
    for name, t in ((kname, k), (vname, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must share a dtype, got q {q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {name} must be on one device, got q on {q.device} and {name} on {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"{kname} and {vname} must have one shape (B, Hkv, {tname}, Dh), "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, Tq, Dh = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{kname} must have q's batch size B = {B}, got {kname} of shape {tuple(k.shape)}")
    if Dh < 1:
        raise ValueError(f"the head dim Dh (q.shape[-1]) must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[-1] != Dh:
        raise ValueError(f"{kname} must have q's head dim Dh = {Dh}, got {kname} of shape {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"q's head count H = {H} must be a multiple of {kname}'s head count Hkv = {Hkv} "
                         f"(grouped heads), got q {tuple(q.shape)} and {kname} {tuple(k.shape)}")


def _resolve_scale(scale, Dh: int) -> float:
    if scale is None:
        return Dh ** -0.5
    if isinstance(scale, torch.Tensor) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return s


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return causal


# ---------------------------------------------------------------------------------------------
# The public API.

def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       scale: float | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` that also returns the row log-sum-exp (B, H, Tq) (float32; float64 for float64 inputs;
    -inf for a query that sees no key). The lse carries no gradient."""
    return _attention(q, k, v, causal, scale, backend, with_lse=True)


def _attention(q, k, v, causal, scale, backend, with_lse: bool):
    _check_qkv(q, k, v)
    causal = _check_causal(causal)
    if k.shape[2] == 0:
        raise ValueError(f"k and v must hold at least one key (Tk >= 1), got k of shape {tuple(k.shape)}")
    scale = _resolve_scale(scale, q.shape[-1])
    name = _backend.select(OP, backend, q=q, k=k, v=v, causal=causal, scale=scale)
    if name == "sdpa":
        from .sdpa import attention_sdpa

        out = attention_sdpa(q, k, v, causal, scale)
        if not with_lse:
            return out, None
        with torch.no_grad():
            return out, attention_fwd_reference(q.detach(), k.detach(), v.detach(), causal, scale)[1]
    return _attention_fwd_op(q, k, v, causal, scale, name)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention, forward and backward fused (no Tq x Tk matrix kept for the backward).

    Args:
        q: (B, H, Tq, Dh) float32, float16 or bfloat16 (float64 on ``torch`` and ``cpu``); any strides.
        k, v: (B, Hkv, Tk, Dh), q's dtype and device, H divisible by Hkv (grouped / multi-query heads), Tk >= 1.
        causal: mask keys after each query, aligned to the bottom right: query i sees keys j <= i + Tk - Tq
            (a query that sees no key outputs 0 and gets no gradient).
        scale: the factor on q k^T, a positive finite float; default ``Dh ** -0.5``.
        backend: ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"auto"``/None (see :mod:`vqkernels._backend`).

    Returns: out (B, H, Tq, Dh) in q's dtype, contiguous. Gradients flow to q, k and v (dk/dv summed over the
    query heads sharing a kv head).
    """
    return _attention(q, k, v, causal, scale, backend, with_lse=False)[0]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """:func:`attention` with ``causal=True`` (bottom-right aligned)."""
    return attention(q, k, v, causal=True, scale=scale, backend=backend)


def attention_with_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, *, scale: float | None = None,
                            backend: str | None = None) -> torch.Tensor:
    """Causal attention of the last Tq positions of each sequence over a preallocated KV cache (decoding).

    Args:
        q: (B, H, Tq, Dh), the queries of each sequence's last Tq positions (Tq = 1 is the fast path).
        k_cache, v_cache: (B, Hkv, Tmax, Dh), q's dtype and device, H divisible by Hkv. Only read: the caller
            writes the new keys/values at positions [len_b - Tq, len_b) before the call.
        cache_seqlens: int32 (B,) on q's device, the valid length of each sequence, the Tq new tokens included
            (Tq <= len_b <= Tmax, else ``ValueError``; sequences may differ in length). On ``cuda`` the values
            are not read back (no host sync; the kernel clamps them to the cache) unless
            VQKERNELS_SYNC_INDEX_CHECK=1.
        scale: as :func:`attention`.

    Query t of sequence b sits at position len_b - Tq + t and attends to cache positions [0, len_b - Tq + t];
    nothing at or past len_b is read. Returns out (B, H, Tq, Dh) in q's dtype. Inference only: no autograd.
    """
    _check_qkv(q, k_cache, v_cache, "k_cache", "v_cache", "Tmax")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    B, _, Tq, Dh = q.shape
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on q's device ({q.device}), got {cache_seqlens.device}")
    Tmax = k_cache.shape[2]
    if Tq > Tmax:
        raise ValueError(f"q has Tq = {Tq} queries but the cache holds only Tmax = {Tmax} positions")
    if Tq == 0:
        raise ValueError(f"q must hold at least one query (Tq >= 1), got q of shape {tuple(q.shape)}")
    scale = _resolve_scale(scale, Dh)
    name = _backend.select(OP_DECODE, backend, q=q, k_cache=k_cache, v_cache=v_cache,
                           cache_seqlens=cache_seqlens, scale=scale)
    if name == "sdpa":
        from .sdpa import attention_decode_sdpa

        _check_seqlen_values(cache_seqlens, Tq, Tmax)
        return attention_decode_sdpa(q, k_cache, v_cache, cache_seqlens, scale)
    return _attention_kv_cache_op(q, k_cache, v_cache, cache_seqlens, scale, name)


__all__ = ["attention", "causal_attention", "attention_with_lse", "attention_with_kv_cache"]
