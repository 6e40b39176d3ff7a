"""The fused VQ loss, and vector_quantize (search + gather + loss).

Public entry points (exported by ``vqkernels``):

- :func:`vq_loss` ``(z, codebook, indices) -> (z_q, loss)``: the chosen codes with the straight-through
  gradient and taming-transformers' VQ loss, backward fused (no one-hot, no N x K buffer).
- :func:`vector_quantize` ``(z, codebook) -> (z_q, loss, indices)``: :func:`vqkernels.nearest_code` + :func:`vq_loss`,
  or, where a backend has one, a fused forward doing both in one pass.

The codebook statistics (code_stats, ema_update_, ema_update_from_stats_, code_usage) are in ops/code_stats.

Each is a ``torch.library`` custom op with a fake (meta) implementation, so it passes
``torch.library.opcheck`` and runs under ``torch.compile(fullgraph=True)``: ``vqkernels::vq_loss`` with its
autograd formula (``register_autograd``) calling the registered ``vqkernels::vq_loss_backward``, and
``vqkernels::vector_quantize``, the fused forward (whose backward is vq_loss's). The backend is chosen in
the public wrapper (``vqkernels._backend.select``) and travels into the op as a string argument.

Backends of vq_loss: ``torch`` (reference.py: the spec), ``cpu`` (C++, csrc/cpu/vq_loss.cpp: deterministic,
bit-identical for any thread count), ``triton`` (triton.py) and ``cuda`` (CUDA C++, csrc/cuda/vq_loss_kernels.cu,
through the same ``torch.ops.vqkernels_C`` ops vq_loss_fwd / vq_loss_bwd as ``cpu``, which route by device).
On ``triton`` and ``cuda`` the codebook gradient is a float32 atomic add, so its last bits may differ from run
to run (the loss, z_q and grad_z are deterministic). Indices outside [0, K) are never dereferenced. On CPU
tensors they raise ``IndexError`` on every backend; on CUDA tensors ``cuda`` and ``triton`` check them on the
device without a host sync (a device-side assert, as torch's own index ops on CUDA; the error ends the CUDA
context), and ``VQKERNELS_SYNC_INDEX_CHECK=1`` makes them read the indices' min/max back and raise ``IndexError``
instead (one sync per op call: for debugging). The ``torch`` backend (the reference) raises ``IndexError`` on any
device, after reading them back.

The fused forward of vector_quantize: ``cpu`` only (C++ vector_quantize_fwd, csrc/cpu/vq_fused.cpp: float32
on a CPU with AVX-512). Where it cannot run, vector_quantize is composed (``fallback="compose"``):
nearest_code, then vq_loss, each choosing its own backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _backend
from .._checks import KERNEL_DTYPES, REFERENCE_DTYPES, check_choice, check_indices, check_vectors_and_codebook
from .._custom_op import custom_op
from .._launch import interpreter_float32_only, triton_module
from .._layout import acc_dtype, as_btd, flat_rows, like
from ..nearest_code import METRICS, nearest_code, normalize
from .reference import vq_loss_bwd_reference, vq_loss_fwd_reference

OP = "vq_loss"  # the loss forward and backward (one choice: both run on one backend)
OP_VQ = "vector_quantize"  # the fused forward: search + gather + loss in one pass


# ---------------------------------------------------------------------------------------------
# What each backend can take, over the ops' named arguments:
#   vq_loss: z (B, T, D), codebook (K, D), indices (B, T);   vector_quantize: z (B, T, D), codebook (K, D)

def _fused_limit(z, **_):
    if z.shape[-1] == 0:
        return ["the fused forward needs D >= 1"]
    return [] if _backend.cpu_has_avx512() else ["the fused forward needs a CPU with AVX-512"]


def _probe_loss(device: str, dtype: torch.dtype) -> dict:
    return dict(z=torch.empty(2, 8, 64, device=device, dtype=dtype),
                codebook=torch.empty(32, 64, device=device, dtype=dtype),
                indices=torch.zeros(2, 8, dtype=torch.int64, device=device))


def _probe_vq(device: str, dtype: torch.dtype) -> dict:
    return dict(z=torch.empty(2, 8, 64, device=device, dtype=dtype),
                codebook=torch.empty(32, 64, device=device, dtype=dtype))


_LOSS_KERNELS = ("vq_loss_fwd", "vq_loss_bwd")
_backend.declare(
    OP, primary="z", probe=_probe_loss,
    torch=_backend.Capability(dtypes=REFERENCE_DTYPES),
    cpu=_backend.Capability(devices=("cpu",), dtypes=KERNEL_DTYPES, needs="_C.cpu", kernels=_LOSS_KERNELS),
    triton=_backend.Capability(dtypes=KERNEL_DTYPES, needs="triton", limit=interpreter_float32_only),
    cuda=_backend.Capability(devices=("cuda",), dtypes=KERNEL_DTYPES, needs="_C.cuda", kernels=_LOSS_KERNELS),
)
_backend.declare(
    OP_VQ, primary="z", probe=_probe_vq, fallback="compose",
    cpu=_backend.Capability(devices=("cpu",), dtypes=(torch.float32,), needs="_C.cpu",
                            kernels=("vector_quantize_fwd",), limit=_fused_limit),
)


# ---------------------------------------------------------------------------------------------
# The implementations, by backend name. z and grad_zq arrive as (B, T, D) views of the caller's
# tensor, any strides (see _layout.as_btd); indices as (B, T). The C++ kernels (cpu and cuda: the same
# torch.ops.vqkernels_C ops, which route by device) read and write that layout in place (z_q and grad_z
# come back in z's layout, as torch.empty_like(z) gives it); the reference and Triton work on contiguous
# (N, D) rows and write the result into that layout.

_triton = triton_module(__name__)


def _fwd_c(z, codebook, indices, scale):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.vq_loss_fwd(z, codebook, indices, scale))


def _bwd_c(grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook, need_z, need_cb):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.vq_loss_bwd(
        grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook, need_z, need_cb))


def _fwd_rows(fwd):
    """A forward on (N, D) rows, run on (B, T, D) views: z_q comes back in z's layout."""
    def run(z, codebook, indices, scale):
        zq, loss = fwd(flat_rows(z), codebook, indices.reshape(-1).contiguous(), scale)
        return like(z, zq), loss
    return run


def _bwd_rows(bwd):
    def run(grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook, need_z, need_cb):
        gz, gcb = bwd(flat_rows(grad_zq), grad_loss, flat_rows(z), codebook, indices.reshape(-1).contiguous(),
                      w_commit, w_codebook, need_z, need_cb)
        return (like(z, gz) if need_z else gz), gcb
    return run


_FWD = {
    "torch": _fwd_rows(vq_loss_fwd_reference),
    "cpu": _fwd_c,
    "cuda": _fwd_c,
    "triton": _fwd_rows(lambda *a: _triton().vq_loss_fwd_triton(*a)),
}
_BWD = {
    "torch": _bwd_rows(vq_loss_bwd_reference),
    "cpu": _bwd_c,
    "cuda": _bwd_c,
    "triton": _bwd_rows(lambda *a: _triton().vq_loss_bwd_triton(*a)),
}


def _vector_quantize_c(z, codebook, metric, scale):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.vector_quantize_fwd(z, codebook, metric, scale))


_FUSED = {"cpu": _vector_quantize_c}


def _scale(z: torch.Tensor, w_commit: float, w_codebook: float) -> float:
    """The loss is (w_commit + w_codebook) * mean((z_q - z)^2): the factor on the sum of squares."""
    D = z.shape[-1]
    N = z.numel() // D if D else 0
    return (w_commit + w_codebook) / (N * D) if N * D else 0.0


# ---------------------------------------------------------------------------------------------
# The registered ops.

@custom_op("vqkernels::vq_loss", mutates_args=())
def _vq_loss_op(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, w_commit: float, w_codebook: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, T, D) any strides, codebook (K, D), indices int64 (B, T) -> (z_q like z, loss 0-d float32).

    z_q has z's shape and dtype and the layout ``torch.empty_like(z)`` gives; the loss is float64 for float64 z.
    """
    z_q, loss = _FWD[backend](z, codebook.contiguous(), indices, _scale(z, w_commit, w_codebook))
    return z_q, loss


@_vq_loss_op.register_fake
def _(z, codebook, indices, w_commit, w_codebook, backend):
    return torch.empty_like(z), z.new_empty((), dtype=acc_dtype(z.dtype))


@custom_op("vqkernels::vq_loss_backward", mutates_args=())
def _vq_loss_backward_op(
    grad_zq: torch.Tensor, grad_loss: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
    w_commit: float, w_codebook: float, need_grad_z: bool, need_grad_codebook: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_z like z or (0,), grad_codebook (K, D) or (0,)): a gradient not asked for comes back empty."""
    gz, gcb = _BWD[backend](grad_zq, grad_loss, z, codebook.contiguous(), indices, w_commit, w_codebook,
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


@custom_op("vqkernels::vector_quantize", mutates_args=())
def _vector_quantize_op(
    z: torch.Tensor, codebook: torch.Tensor, metric: int, w_commit: float, w_codebook: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward: z (B, T, D) float32 any strides, codebook (K, D) -> (z_q like z, loss 0-d, indices (B, T)).

    Only ``cpu`` has it (csrc/cpu/vq_fused.cpp); the backward is vq_loss's."""
    if backend not in _FUSED:
        raise RuntimeError(f"vector_quantize has no fused {backend} forward")
    z_q, loss, idx = _FUSED[backend](z, codebook.contiguous(), metric, _scale(z, w_commit, w_codebook))
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
        indices: int64 of shape ``z.shape[:-1]``, values in [0, K) (else ``IndexError``; on CUDA tensors a
            device-side error unless VQKERNELS_SYNC_INDEX_CHECK=1: see the module's docstring).
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
    check_vectors_and_codebook(z, codebook, "z")
    check_indices(indices, z.shape[:-1], z.device)
    w_commit, w_cb = _weights(beta, legacy)
    z3 = as_btd(z)
    i3 = indices.reshape(z3.shape[:2])
    name = _backend.select(OP, backend, z=z3, codebook=codebook, indices=i3)
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
    reading a strided ``z`` (e.g. a channel-first map) in place. Under ``auto`` the fused forward runs
    wherever it can; elsewhere (and for a named backend it cannot serve) the two ops are composed.
    ``metric="cosine"``: ``z`` and ``codebook`` are l2-normalised first (differentiably, ``F.normalize``
    in float32, rounded back to the input dtype), and the search, ``z_q`` and the loss are all on the
    normalised vectors (as LlamaGen and ViT-VQGAN do): ``z_q`` is a unit vector and the gradients flow
    back through the normalisation to ``z`` and ``codebook``.

    ``indices`` (int64, shape ``z.shape[:-1]``) carry no gradient. ``backend`` applies to both the search
    and the loss; under ``auto`` each picks its own fastest backend.
    """
    check_vectors_and_codebook(z, codebook, "z")
    check_choice(metric, "metric", METRICS)
    if metric == "cosine":
        z, codebook = _normalize(z), _normalize(codebook)
    name = _backend.select(OP_VQ, backend, z=z, codebook=codebook)
    if name != "compose":
        w_commit, w_cb = _weights(beta, legacy)
        z_q, loss, idx = _vector_quantize_op(as_btd(z), codebook, METRICS[metric], w_commit, w_cb, name)
        return z_q.view(z.shape), loss, idx.view(z.shape[:-1])
    indices = nearest_code(z.detach(), codebook.detach(), metric=metric, backend=backend)
    z_q, loss = vq_loss(z, codebook, indices, beta=beta, legacy=legacy, backend=backend)
    return z_q, loss, indices


__all__ = ["vector_quantize", "vq_loss"]
