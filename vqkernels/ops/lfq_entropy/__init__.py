"""lfq_entropy: LFQ's two entropy terms, exact at every codebook size, never an N x 2^d buffer.

Public entry point: :func:`lfq_entropy`. Registered with ``torch.library`` as ``vqkernels::lfq_entropy``
(forward) and ``vqkernels::lfq_entropy_backward`` (its autograd formula), with fake implementations, so
it passes ``torch.library.opcheck`` and runs under ``torch.compile``. The backend is chosen in the wrapper.

The math (vector-quantize-pytorch 1.32's ``LFQ``, checked against its source):
  * The codes are c_k in {-s, +s}^d (s = ``codebook_scale``); bit j of code k (dim 0 the most significant
    bit) picks +s. VQP's "distance" is -2 <x, c_k> (the squared distance up to terms constant in k) and its
    per-sample distribution is ``softmax_k(-distance * inv_temperature)``, i.e. logits 2 tau <x, c_k> =
    sum_j 2 tau s x_j (+-1). A softmax of a sum of independent per-bit terms is a product of per-bit
    softmaxes: p[n, k] = prod_j q_j(bit_j(k)), q_j(+) = sigmoid(L_j), L_j = 4 tau s x_j. So the logit
    scale of this op is ``scale = 4 * inv_temperature * codebook_scale``.
  * Per-sample entropy: the entropy of a product distribution is the sum of its factors' entropies,
    H(p[n]) = sum_j h(q_j): O(N d) work, computed stably as softplus(-|L|) + |L| sigmoid(-|L|).
    VQP computes -sum_k p log(max(p, 1e-5)) over all 2^d codes instead; the clamp (a guard against
    log 0) lowers that value by sum_{p < 1e-5} p log(1e-5 / p) (measured on random inputs: 1e-5 to
    4e-4 relative). This op returns the exact entropy, which needs no guard.
  * Codebook entropy: pbar[k] = 1/N sum_n p[n, k] does not factorise, but splitting the bits in two
    halves (top h = ceil(d/2), low l = d - h) gives p[n, a 2^l + b] = A[n, a] B[n, b] with A, B the
    products over each half, so pbar = 1/N A^T B: ONE (2^h x N) @ (N x 2^l) GEMM, N 2^d multiply-adds
    on tables of N (2^h + 2^l) entries, memory O(2^d) for pbar. Then codebook = -sum_k pbar log
    max(pbar, eps) with VQP's eps = 1e-5 clamp (``eps=0``: the exact entropy). The clamp matters at
    large d: with spread usage every pbar < 1e-5 once 2^d > 1e5 (d >= 17), VQP's codebook entropy is
    then capped at log(1e5) = 11.51 nats and passes no gradient; this op reproduces that exactly.
  * Backward: d codebook / d pbar = G (elementwise, O(2^d)); d/dA = 1/N B G^T, d/dB = 1/N A G (two
    GEMMs); d A[n, a] / d L_j = A[n, a] (bit_j(a) - q_j), reduced per row (O(N 2^h h)).
  * Several codebooks (x (N, C, d)): per_sample averages over N and C, codebook over C of each codebook's
    entropy (VQP: ``entropy(avg_prob).mean()`` over its c axis).
  * Underflow: table entries below the float32 range flush to 0; their true values (< 1e-38) change
    neither sum by more than that, and the entropy's largest weight is |log tiny| ~ 87, so nothing is lost
    that float32 could have held (tests compare with float64).
  * ``frac_per_sample_entropy`` existed because VQP's N x 2^d softmax does not fit: here the whole batch
    costs one GEMM (see benchmarks/suites/lfq.py for the numbers), so it is unnecessary.

Backends: ``torch`` (reference.py, chunked), ``cpu`` (C++ csrc/cpu/lfq_entropy.cpp: fused tables +
torch's BLAS; float32 and float64), ``triton`` (triton.py) and ``cuda`` (csrc/cuda/lfq_entropy_kernels.cu: the
GEMMs fused with the tables' construction, fp32 FMAs; float16/bfloat16 read as they are) where built.
"""
from __future__ import annotations

import torch

from ... import _backend
from .._checks import KERNEL_DTYPES, REFERENCE_DTYPES, check_range, check_tensor
from .._custom_op import custom_op
from .reference import acc_dtype, lfq_entropy_bwd_reference, lfq_entropy_fwd_reference

OP = "lfq_entropy"
MAX_BITS = 30  # pbar holds C * 2^d floats: 4 GB a codebook at d = 30


def _probe(device: str, dtype: torch.dtype) -> dict:
    return dict(x=torch.empty(16, 1, 10, device=device, dtype=dtype))


_C_KERNELS = ("lfq_entropy_fwd", "lfq_entropy_bwd")


_backend.declare(
    OP, primary="x", probe=_probe,
    torch=_backend.Capability(dtypes=REFERENCE_DTYPES),
    cpu=_backend.Capability(devices=("cpu",), dtypes=REFERENCE_DTYPES, needs="_C.cpu", kernels=_C_KERNELS),
    triton=_backend.Capability(dtypes=KERNEL_DTYPES, needs="triton"),
    cuda=_backend.Capability(devices=("cuda",), dtypes=KERNEL_DTYPES, needs="_C.cuda", kernels=_C_KERNELS),
)


# ---------------------------------------------------------------------------------------------
# Implementations by backend: fwd (x (N, C, d) contiguous, scale, eps) -> (per_sample, codebook, pbar (C, 2^d));
# bwd (grad_ps, grad_cb, x, pbar, scale, eps) -> grad_x (N, C, d) in x's dtype. The cpu and triton kernels take
# float32 (float16/bfloat16 are widened here: the sums run in float32 anyway); the cuda kernels read x as it is.

def _widen(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _fwd_c(x, scale, eps):
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.lfq_entropy_fwd(_widen(x), scale, eps))


def _bwd_c(grad_ps, grad_cb, x, pbar, scale, eps):
    _backend.c_extension()
    g = torch.ops.vqkernels_C.lfq_entropy_bwd(grad_ps.float() if x.dtype != torch.float64 else grad_ps,
                                             grad_cb.float() if x.dtype != torch.float64 else grad_cb,
                                             _widen(x), pbar, scale, eps)
    return g.to(x.dtype)


def _fwd_cuda(x, scale, eps):
    # csrc/cuda/lfq_entropy.cpp: float16/bfloat16 read as they are (no widened copy), float32 results
    _backend.c_extension()
    return tuple(torch.ops.vqkernels_C.lfq_entropy_fwd(x, scale, eps))


def _bwd_cuda(grad_ps, grad_cb, x, pbar, scale, eps):
    # the upstream gradients stay on the device (the kernels read them there: no host sync); grad_x in x's dtype
    _backend.c_extension()
    return torch.ops.vqkernels_C.lfq_entropy_bwd(grad_ps.float(), grad_cb.float(), x, pbar.float(), scale, eps)


def _fwd_triton(x, scale, eps):
    from .triton import lfq_entropy_fwd_triton

    return lfq_entropy_fwd_triton(_widen(x), scale, eps)


def _bwd_triton(grad_ps, grad_cb, x, pbar, scale, eps):
    from .triton import lfq_entropy_bwd_triton

    return lfq_entropy_bwd_triton(grad_ps.float(), grad_cb.float(), _widen(x), pbar, scale, eps).to(x.dtype)


_FWD = {"torch": lfq_entropy_fwd_reference, "cpu": _fwd_c, "cuda": _fwd_cuda, "triton": _fwd_triton}
_BWD = {"torch": lfq_entropy_bwd_reference, "cpu": _bwd_c, "cuda": _bwd_cuda, "triton": _bwd_triton}


@custom_op("vqkernels::lfq_entropy", mutates_args=())
def _lfq_entropy_op(x: torch.Tensor, scale: float, eps: float, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, C, d) -> (per_sample 0-d, codebook 0-d, pbar (C, 2^d)), float32 (float64 for float64 x)."""
    ps, cb, pbar = _FWD[backend](x.contiguous(), scale, eps)
    return ps, cb, pbar


@_lfq_entropy_op.register_fake
def _(x, scale, eps, backend):
    acc = acc_dtype(x.dtype)
    return (x.new_empty((), dtype=acc), x.new_empty((), dtype=acc),
            x.new_empty((x.shape[1], 1 << x.shape[2]), dtype=acc))


@custom_op("vqkernels::lfq_entropy_backward", mutates_args=())
def _lfq_entropy_backward_op(grad_ps: torch.Tensor, grad_cb: torch.Tensor, x: torch.Tensor, pbar: torch.Tensor,
                             scale: float, eps: float, backend: str) -> torch.Tensor:
    """-> grad_x (N, C, d) in x's dtype."""
    return _BWD[backend](grad_ps.contiguous(), grad_cb.contiguous(), x.contiguous(), pbar.contiguous(), scale, eps)


@_lfq_entropy_backward_op.register_fake
def _(grad_ps, grad_cb, x, pbar, scale, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, scale, eps, backend = inputs
    ctx.save_for_backward(x, output[2])
    ctx.args = (scale, eps, backend)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_ps, grad_cb, grad_pbar):
    x, pbar = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    acc = acc_dtype(x.dtype)
    grad_ps = x.new_zeros((), dtype=acc) if grad_ps is None else grad_ps.to(acc)
    grad_cb = x.new_zeros((), dtype=acc) if grad_cb is None else grad_cb.to(acc)
    scale, eps, backend = ctx.args
    return _lfq_entropy_backward_op(grad_ps, grad_cb, x, pbar, scale, eps, backend), None, None, None


_lfq_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------

def lfq_entropy(x: torch.Tensor, *, scale: float, eps: float = 1e-5, backend: str | None = None,
                return_probs: bool = False):
    """LFQ's per-sample entropy and codebook entropy of the bit logits ``scale * x``, exactly, in O(N d + 2^d) memory.

    Args:
        x: (..., C, d): C codebooks of d bits each (d in [1, 30]); float32, float16 or bfloat16 (float64 on the
            ``torch`` and ``cpu`` backends). The leading dimensions are the N samples.
        scale: the logit of each bit is ``scale * x``; vector-quantize-pytorch's LFQ is
            ``scale = 4 * inv_temperature * codebook_scale``. Finite, > 0.
        eps: the clamp in the codebook entropy ``-sum_k pbar_k log max(pbar_k, eps)`` (VQP's 1e-5; 0: exact).
        backend: ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"auto"``/None.
        return_probs: also return pbar (C, 2^d), each codebook's batch-mean code distribution (no gradient).

    Returns:
        ``(per_sample, codebook)`` 0-d tensors (float32; float64 for float64 x), differentiable in x:
        per_sample = mean over samples and codebooks of sum_j h(sigmoid(scale x_j)) (the exact entropy of each
        sample's code distribution), codebook = mean over codebooks of the entropy of the batch-mean
        distribution. See the module docstring for the derivation.
    """
    check_tensor(x, "x", min_dims=2, layout="(..., C, d)", floating=True)
    d = x.shape[-1]
    if not 1 <= d <= MAX_BITS:
        raise ValueError(f"x's last dimension (bits per code, d) must be in [1, {MAX_BITS}], got {d}")
    if x.shape[-2] < 1:
        raise ValueError(f"x must hold at least one codebook (x.shape[-2] >= 1), got shape {tuple(x.shape)}")
    scale = check_range(scale, "scale", lo=0.0)
    if scale == 0.0 or scale == float("inf"):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    eps = check_range(eps, "eps", lo=0.0, hi=1.0)
    x3 = x.reshape(-1, x.shape[-2], d)
    name = _backend.select(OP, backend, x=x3)
    ps, cb, pbar = _lfq_entropy_op(x3, scale, eps, name)
    if return_probs:
        return ps, cb, pbar
    return ps, cb
