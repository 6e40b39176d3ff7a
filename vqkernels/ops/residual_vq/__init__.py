"""residual_vq: all Q stages of a residual quantizer in one pass per block of rows (no N x K matrix).

Public entry point: :func:`residual_vq` (spec: reference.py). For every row, stage q searches the
residual left by the stages before it in codebook q (nearest_code's l2 search: exact, the lowest
index among equal scores), subtracts the chosen code and goes on; the residual of a block of rows
stays in cache (registers on the GPU) across the stages, so x is read once, not Q times.

Registered with ``torch.library`` as ``vqkernels::residual_vq`` (custom_op + register_fake + register_autograd)
and ``vqkernels::residual_vq_backward``: the gradient of x is straight-through (or the rotation trick) for
``quantized`` plus the gradient of each stage's squared error, all stages fused in one pass as well.
The backend is chosen in :func:`residual_vq` and travels into the op as a string.

Backends: ``torch`` (reference.py), ``cpu`` (C++, csrc/cpu/residual_vq.cpp), ``triton`` (triton.py),
``cuda`` (CUDA C++, csrc/cuda/residual_vq_kernels.cu; the ``cpu`` and ``cuda`` backends call the same
``torch.ops.vqkernels_C`` ops, which route by device). Kernels take float32 (the torch reference float64 too).
"""
from __future__ import annotations

import torch

from ... import _backend
from .._checks import MAX_CODES, check_tensor, check_same_device, check_same_dtype
from .._custom_op import custom_op
from .reference import residual_vq_backward_reference, residual_vq_reference

OP = "residual_vq"
KERNEL_DTYPES = (torch.float32,)
REFERENCE_DTYPES = (torch.float32, torch.float64)
_C_KERNELS = ("residual_vq_fwd", "residual_vq_bwd")


def _code_limit(codebooks, **_):
    K = codebooks.shape[1]
    return [f"K={K} codes is more than {MAX_CODES}"] if K > MAX_CODES else []


TRITON_MAX_D = 512  # triton.py keeps a block's residual in registers (its MAX_D)


def _triton_limit(x, codebooks, **args):
    D = x.shape[1]
    r = [f"D={D} is more than the triton kernel's {TRITON_MAX_D}"] if D > TRITON_MAX_D else []
    return r + _code_limit(codebooks)


def _probe(device: str, dtype: torch.dtype) -> dict:
    return dict(x=torch.empty(16, 64, device=device, dtype=dtype),
                codebooks=torch.empty(2, 32, 64, device=device, dtype=dtype))


_backend.declare(
    OP, primary="x", probe=_probe,
    torch=_backend.Capability(dtypes=REFERENCE_DTYPES),
    cpu=_backend.Capability(devices=("cpu",), dtypes=KERNEL_DTYPES, needs="_C.cpu", kernels=_C_KERNELS,
                            limit=_code_limit),
    triton=_backend.Capability(dtypes=KERNEL_DTYPES, needs="triton", limit=_triton_limit),
    cuda=_backend.Capability(devices=("cuda",), dtypes=KERNEL_DTYPES, needs="_C.cuda", kernels=_C_KERNELS,
                             limit=_code_limit),
)


# ---------------------------------------------------------------------------------------------
# The implementations by backend: forward (x (N, D), codebooks (Q, K, D), need_stats) -> (indices (N, Q),
# quantized (N, D), sq_err (Q,), counts (Q, K) or (0,), sums (Q, K, D) or (0,)); backward (grad_quantized,
# grad_sq_err, x, codebooks, indices, rotation) -> grad_x. All tensors contiguous.

def _fwd_torch(x, cbs, need_stats):
    return residual_vq_reference(x, cbs, need_stats)


def _fwd_c(x, cbs, need_stats):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.residual_vq_fwd(x, cbs, need_stats))


def _fwd_triton(x, cbs, need_stats):
    from .triton import residual_vq_fwd_triton

    return residual_vq_fwd_triton(x, cbs, need_stats)


def _bwd_torch(g, ge, x, cbs, idx, rotation):
    return residual_vq_backward_reference(g, ge, x, cbs, idx, rotation)


def _bwd_c(g, ge, x, cbs, idx, rotation):
    _backend.c_extension()
    return torch.ops.vqkernels_C.residual_vq_bwd(g, ge, x, cbs, idx, rotation)


def _bwd_triton(g, ge, x, cbs, idx, rotation):
    from .triton import residual_vq_bwd_triton

    return residual_vq_bwd_triton(g, ge, x, cbs, idx, rotation)


_FWD = {"torch": _fwd_torch, "cpu": _fwd_c, "cuda": _fwd_c, "triton": _fwd_triton}
_BWD = {"torch": _bwd_torch, "cpu": _bwd_c, "cuda": _bwd_c, "triton": _bwd_triton}


@custom_op("vqkernels::residual_vq", mutates_args=())
def _residual_vq_op(
    x: torch.Tensor, codebooks: torch.Tensor, need_stats: bool, rotation: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (quantized, sq_err, indices, counts, sums): the differentiable outputs first (opcheck sums the outputs in
    order, and an integer first one would make that sum integer). ``rotation`` changes only the backward (the
    forward value of the rotation trick is the code itself)."""
    idx, quant, err, counts, sums = _FWD[backend](x.contiguous(), codebooks.contiguous(), need_stats)
    return quant, err, idx, counts, sums


@_residual_vq_op.register_fake
def _(x, codebooks, need_stats, rotation, backend):
    N, D = x.shape
    Q, K, _ = codebooks.shape
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((Q,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32),
            x.new_empty((N, Q), dtype=torch.int64), x.new_empty((Q, K) if need_stats else (0,), **f32),
            x.new_empty((Q, K, D) if need_stats else (0,), **f32))


@custom_op("vqkernels::residual_vq_backward", mutates_args=())
def _residual_vq_backward_op(
    grad_quantized: torch.Tensor, grad_sq_err: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor,
    indices: torch.Tensor, rotation: bool, backend: str,
) -> torch.Tensor:
    return _BWD[backend](grad_quantized.contiguous(), grad_sq_err.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous(), x.contiguous(),
                         codebooks.contiguous(), indices.contiguous(), rotation)


@_residual_vq_backward_op.register_fake
def _(grad_quantized, grad_sq_err, x, codebooks, indices, rotation, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, codebooks, need_stats, rotation, backend = inputs
    ctx.save_for_backward(x, codebooks, output[2])
    ctx.rotation, ctx.backend = rotation, backend
    ctx.mark_non_differentiable(output[2], output[3], output[4])


def _backward(ctx, grad_quantized, grad_sq_err, grad_idx, grad_counts, grad_sums):
    x, codebooks, indices = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(x)
    if grad_sq_err is None:
        grad_sq_err = x.new_zeros(codebooks.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    gx = _residual_vq_backward_op(grad_quantized, grad_sq_err, x, codebooks, indices, ctx.rotation, ctx.backend)
    return gx, None, None, None, None


_residual_vq_op.register_autograd(_backward, setup_context=_setup_context)


def check_residual_inputs(x, codebooks) -> None:
    check_tensor(x, "x", dims=2, layout="(N, D)", floating=True)
    check_tensor(codebooks, "codebooks", dims=3, layout="(Q, K, D)", floating=True)
    check_same_dtype(x, codebooks, ("x", "codebooks"))
    check_same_device(x, codebooks, ("x", "codebooks"))
    if x.shape[1] != codebooks.shape[2]:
        raise ValueError(f"the last dimension of x ({x.shape[1]}) must equal the code dimension D of codebooks "
                         f"({codebooks.shape[2]}); x has shape {tuple(x.shape)}, codebooks {tuple(codebooks.shape)}")
    if codebooks.shape[0] == 0:
        raise ValueError("codebooks must hold at least one stage, got Q=0")
    if codebooks.shape[1] == 0:
        raise ValueError("codebooks must hold at least one code per stage, got K=0")


def residual_vq(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    rotation_trick: bool = False,
    return_stats: bool = False,
    backend: str | None = None,
):
    """Residual vector quantization of every row of ``x`` through the stages of ``codebooks``.

    Args:
        x: (N, D) float32 (float64 on the ``torch`` backend).
        codebooks: (Q, K, D), same dtype and device; Q >= 1 stages of K >= 1 codes.
        rotation_trick: the gradient of ``quantized`` reaches each stage's residual by the rotation trick
            (vector-quantize-pytorch's rotate_to) instead of straight through; the values are the same.
        return_stats: also return per-stage code counts (Q, K) and sums of the stage's residuals (Q, K, D)
            (float32, no gradient): what an EMA codebook update needs, without a second pass.
        backend: ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (see ``vqkernels.use_backend``).

    Returns:
        ``(indices int64 (N, Q), quantized (N, D) = the chosen codes summed, sq_err (Q,))`` (float32; float64 for float64 x) and, with
        ``return_stats``, ``counts, sums``. ``quantized`` carries the straight-through (or rotation-trick)
        gradient of every stage to ``x`` and ``sq_err[q] = sum_n ||r_q - c_q||^2`` its exact gradient (the
        residuals subtract detached codes, as vector-quantize-pytorch's ResidualVQ). The codebooks get no gradient.
    """
    check_residual_inputs(x, codebooks)
    cbs = codebooks.detach()
    name = _backend.select(OP, backend, x=x, codebooks=cbs)
    quant, err, idx, counts, sums = _residual_vq_op(x, cbs, bool(return_stats), bool(rotation_trick), name)
    if return_stats:
        return idx, quant, err, counts, sums
    return idx, quant, err
