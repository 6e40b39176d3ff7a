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
from .._checks import KERNEL_DTYPES, MAX_CODES, REFERENCE_DTYPES, check_choice, check_vectors_and_codebook
from .._custom_op import custom_op
from .._launch import triton_module
from .reference import nearest_code_reference

OP = "nearest_code"
METRICS = {"l2": 0, "cosine": 1}


# ---------------------------------------------------------------------------------------------
# What each backend can take, over the op's named arguments: x (N, D), codebook (K, D), metric id,
# allow_tf32.

def _code_limit(codebook, **_):
    K = codebook.shape[0]
    return [f"K={K} codes is more than {MAX_CODES}"] if K > MAX_CODES else []


def _probe(device: str, dtype: torch.dtype) -> dict:
    """Small example arguments for ``vqkernels info``'s report of the choice on this machine."""
    return dict(x=torch.empty(16, 64, device=device, dtype=dtype),
                codebook=torch.empty(32, 64, device=device, dtype=dtype), metric=0, allow_tf32=False)


_C_KERNELS = ("nearest_code",)
# The CUDA kernel's grid is one block per 128 rows and does not split the codebook: below ~128 blocks
# (an H100 has 132 SMs) it leaves most of the GPU idle, where the Triton kernel splits over codes. So
# on CUDA tensors with few rows and many codes, auto tries Triton first. The threshold follows from the
# grid, not from a measurement: no GPU was lent while it was written (scripts/gpu_check.sh measures it).
SMALL_N_ROWS = 128 * 128
SMALL_N_MIN_CODES = 1024


def _priority(device_type: str, x, codebook, **_):
    if device_type == "cuda" and x.shape[0] < SMALL_N_ROWS and codebook.shape[0] >= SMALL_N_MIN_CODES:
        return ("triton", "cuda", "torch")
    return None


_backend.declare(
    OP, primary="x", probe=_probe, priority=_priority,
    torch=_backend.Capability(dtypes=REFERENCE_DTYPES),
    cpu=_backend.Capability(devices=("cpu",), dtypes=KERNEL_DTYPES, needs="_C.cpu", kernels=_C_KERNELS,
                            limit=_code_limit),
    triton=_backend.Capability(dtypes=KERNEL_DTYPES, needs="triton", limit=_code_limit),
    cuda=_backend.Capability(devices=("cuda",), dtypes=KERNEL_DTYPES, needs="_C.cuda", kernels=_C_KERNELS,
                             limit=_code_limit),
)


# ---------------------------------------------------------------------------------------------
# The implementations, by backend name: (x (N, D) contiguous, codebook (K, D) contiguous, metric id,
# allow_tf32) -> (indices int64 (N,), distance float32 (N,)).

def _run_torch(x, codebook, metric, allow_tf32):
    return nearest_code_reference(x, codebook, metric, allow_tf32)


def _run_c(x, codebook, metric, allow_tf32):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.nearest_code(x, codebook, metric, allow_tf32))


_triton = triton_module(__name__)


def _run_triton(x, codebook, metric, allow_tf32):
    return _triton().nearest_code_triton(x, codebook, metric, allow_tf32)


_IMPLS = {"torch": _run_torch, "cpu": _run_c, "cuda": _run_c, "triton": _run_triton}


@custom_op("vqkernels::nearest_code", mutates_args=())
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
    check_vectors_and_codebook(x, codebook, "x")
    check_choice(metric, "metric", METRICS)
    lead = x.shape[:-1]
    D = x.shape[-1]
    m = METRICS[metric]
    x2 = x.detach().reshape(-1, D)
    cb = codebook.detach()
    if m == 1:
        x2, cb = normalize(x2), normalize(cb)
    name = _backend.select(OP, backend, x=x2, codebook=cb, metric=m, allow_tf32=bool(allow_tf32))
    idx, dist = _nearest_code_op(x2.contiguous(), cb.contiguous(), m, bool(allow_tf32), name)
    idx = idx.reshape(lead)
    if return_distance:
        return idx, dist.reshape(lead)
    return idx
