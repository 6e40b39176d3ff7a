"""nearest_code: for each vector, the index of the nearest code in a codebook, fused (no N x K buffer).

Public entry point: :func:`nearest_code`. The op is registered with ``torch.library`` as
``vqkernels::nearest_code`` (custom_op + register_fake), so it passes ``torch.library.opcheck`` and
runs under ``torch.compile(fullgraph=True)``. The backend is resolved before the op is called
(``vqkernels._backend.select``) and travels as a string argument, so a compiled graph keeps it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _backend
from .reference import nearest_code_reference

OP = "nearest_code"
METRICS = {"l2": 0, "cosine": 1}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
MAX_CODES = 2**31 - 1  # kernels keep code indices in int32 registers


# ---------------------------------------------------------------------------------------------
# What each backend can take. Arguments: x (N, D), codebook (K, D), metric id, allow_tf32.

def _dtype_reason(x, allowed):
    if x.dtype not in allowed:
        return [f"dtype {x.dtype} is not one of {', '.join(str(d) for d in allowed)}"]
    return []


@_backend.register(OP, "torch")
def _torch_reasons(x, codebook, metric, allow_tf32):
    return _dtype_reason(x, REFERENCE_DTYPES)


@_backend.register(OP, "cpu")
def _cpu_reasons(x, codebook, metric, allow_tf32):
    r = []
    if x.device.type != "cpu":
        r.append(f"the cpu kernel takes CPU tensors, got {x.device.type}")
    if not _backend.has_cpu_kernels():
        err = _backend.c_extension_error()
        r.append("vqkernels._C was not built" + (f" ({err})" if err else ""))
    r += _dtype_reason(x, KERNEL_DTYPES)
    if codebook.shape[0] > MAX_CODES:
        r.append(f"K={codebook.shape[0]} codes is more than {MAX_CODES}")
    return r


@_backend.register(OP, "triton")
def _triton_reasons(x, codebook, metric, allow_tf32):
    r = _backend.triton_device_reasons(x.device)
    r += _dtype_reason(x, KERNEL_DTYPES)
    if codebook.shape[0] > MAX_CODES:
        r.append(f"K={codebook.shape[0]} codes is more than {MAX_CODES}")
    return r


@_backend.register(OP, "cuda")
def _cuda_reasons(x, codebook, metric, allow_tf32):
    r = []
    if x.device.type != "cuda":
        r.append(f"the cuda kernel takes CUDA tensors, got {x.device.type}")
    if not _backend.has_cuda_kernels():
        err = _backend.c_extension_error()
        r.append("vqkernels._C was built without CUDA kernels" if err is None
                 else f"vqkernels._C was not built ({err})")
    r += _dtype_reason(x, KERNEL_DTYPES)
    if codebook.shape[0] > MAX_CODES:
        r.append(f"K={codebook.shape[0]} codes is more than {MAX_CODES}")
    return r


# ---------------------------------------------------------------------------------------------
# The implementations, by backend name: (x (N, D) contiguous, codebook (K, D) contiguous, metric id,
# allow_tf32) -> (indices int64 (N,), distance float32 (N,)).

def _run_torch(x, codebook, metric, allow_tf32):
    return nearest_code_reference(x, codebook, metric, allow_tf32)


def _run_c(x, codebook, metric, allow_tf32):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.nearest_code(x, codebook, metric, allow_tf32))


def _run_triton(x, codebook, metric, allow_tf32):
    from .triton import nearest_code_triton

    return nearest_code_triton(x, codebook, metric, allow_tf32)


_IMPLS = {"torch": _run_torch, "cpu": _run_c, "cuda": _run_c, "triton": _run_triton}


@torch.library.custom_op("vqkernels::nearest_code", mutates_args=())
def _nearest_code_op(
    x: torch.Tensor, codebook: torch.Tensor, metric: int, allow_tf32: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    idx, dist = _IMPLS[backend](x.contiguous(), codebook.contiguous(), metric, allow_tf32)
    return idx, dist


@_nearest_code_op.register_fake
def _(x, codebook, metric, allow_tf32, backend):
    n = x.shape[0]
    return x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------

def check_inputs(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    """Raise a clear error (naming the argument) for input no backend should see."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., D), got a 0-d tensor")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not codebook.dtype.is_floating_point:
        raise TypeError(f"codebook must be a floating-point tensor, got {codebook.dtype}")
    if x.dtype != codebook.dtype:
        raise TypeError(f"x and codebook must share a dtype, got x {x.dtype} and codebook {codebook.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"x and codebook must be on one device, got x on {x.device} and codebook on {codebook.device}")
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"the last dimension of x ({x.shape[-1]}) must equal the codebook's code dimension D "
            f"({codebook.shape[1]}); x has shape {tuple(x.shape)}, codebook {tuple(codebook.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code, got K=0")


def normalize(t: torch.Tensor) -> torch.Tensor:
    """l2-normalise the last dimension in float32 and round back to t's dtype (what cosine compares)."""
    return F.normalize(t.float(), dim=-1, eps=1e-12).to(t.dtype)


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    return_distance: bool = False,
    backend: str | None = None,
    allow_tf32: bool = False,
):
    """Index of the nearest code for every vector of ``x``.

    Args:
        x: (..., D) float32, float16 or bfloat16 (float64 on the ``torch`` backend).
        codebook: (K, D), same dtype and device as ``x``; K >= 1.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (both sides l2-normalised first, in
            float32, then rounded back to the input dtype).
        return_distance: also return the float32 distance of each chosen code: the squared l2
            distance, or 1 - cosine similarity.
        backend: ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"auto"``; default: the
            ``use_backend`` context, else ``VQKERNELS_BACKEND``, else ``auto``.
        allow_tf32: float32 inputs only: let GPU kernels use TF32 tensor cores (faster, ~1e-3
            relative error in the dot products). The default is the exact float32 path.

    Returns:
        int64 indices of shape ``x.shape[:-1]`` (and the float32 distances, same shape).

    Ties: among codes with equal scores the lowest index wins. Non-finite input: a NaN score counts
    as +inf, so a code holding NaN/Inf never wins for a finite row unless every code does (then
    index 0); a row of x holding NaN gets a valid index and a non-finite distance (NaN for l2,
    +inf for cosine).
    """
    check_inputs(x, codebook, metric)
    lead = x.shape[:-1]
    D = x.shape[-1]
    m = METRICS[metric]
    x2 = x.detach().reshape(-1, D)
    cb = codebook.detach()
    if m == 1:
        x2, cb = normalize(x2), normalize(cb)
    name = _backend.select(OP, backend, x2, cb, m, bool(allow_tf32))
    idx, dist = _nearest_code_op(x2.contiguous(), cb.contiguous(), m, bool(allow_tf32), name)
    idx = idx.reshape(lead)
    if return_distance:
        return idx, dist.reshape(lead)
    return idx
