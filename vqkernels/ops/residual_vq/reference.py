"""residual_vq in pure PyTorch: the spec, the fallback and the test oracle.

Forward, for every row n of x (N, D) and the stages q = 0 .. Q-1 of codebooks (Q, K, D):
    r_0 = x_n
    idx[n, q] = argmin_k ||c_qk||^2 - 2 <r_q, c_qk>   (nearest_code's l2 score: lowest k among equal
                                                        scores, a NaN score never wins)
    r_{q+1} = r_q - c_q,idx[n,q]                      (float32; float64 for float64 input)
    quantized[n] = ((0 + c_0) + c_1) + ...            (the chosen codes summed in stage order)
    sq_err[q] = sum_n ||r_q - c_q,idx[n,q]||^2         (summed in float64; float32 out, float64 for float64)
    with stats: counts[q, k] = #{n : idx[n, q] = k},   sums[q, k] = sum_{idx[n,q]=k} r_q  (float32)

Backward (``residual_vq_backward_reference``): the residuals subtract *detached* codes, so every r_q has
the identity Jacobian with respect to x, and
    grad_x[n] = sum_q  J_q^T g_n + 2 grad_sq_err[q] (r_q - c_q)
where g = grad of quantized and J_q is the identity (straight-through) or, with the rotation trick
(Fifty et al. 2024, as vector-quantize-pytorch writes it), the rotation of c_q's direction to r_q's:
    u = r/max(|r|, 1e-6), qh = c/max(|c|, 1e-6), w = u + qh normalised (eps 1e-6), s = |c|/max(|r|, 1e-6)
    J^T g = s (g - 2 <g, w> w + 2 <g, qh> u)

Memory stays bounded: rows in chunks of ``rows`` (the residual of a chunk is the only (rows, D) state),
the search through nearest_code_reference (its own bounded tiles): never an N x K matrix.
"""
from __future__ import annotations

import torch

from ..._backend import new_output
from ..nearest_code.reference import nearest_code_reference

ROWS = 4096


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_vq_reference(
    x: torch.Tensor, codebooks: torch.Tensor, need_stats: bool = False, rows: int = ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, D), codebooks (Q, K, D) -> (indices int64 (N, Q), quantized (N, D) in x's dtype, sq_err (Q,) float32 (float64 for float64 x),
    counts float32 (Q, K), sums float32 (Q, K, D)); counts and sums are (0,) unless ``need_stats``."""
    N, D = x.shape
    Q, K, _ = codebooks.shape
    acc = _acc(x.dtype)
    dev = x.device
    out_idx = new_output((N, Q), torch.int64, dev)
    out_q = new_output((N, D), x.dtype, dev)
    err = torch.zeros(Q, dtype=torch.float64, device=dev)
    counts = torch.zeros((Q, K) if need_stats else (0,), dtype=torch.float32, device=dev)
    sums = torch.zeros((Q, K, D) if need_stats else (0,), dtype=torch.float32, device=dev)
    cbs = codebooks.to(acc)
    for n0 in range(0, N, rows):
        r = x[n0:n0 + rows].to(acc)  # (rows, D): the residual of this chunk
        quant = torch.zeros_like(r)
        for q in range(Q):
            idx, _ = nearest_code_reference(r, cbs[q], 0)
            c = cbs[q][idx]  # (rows, D)
            diff = r - c
            err[q] += (diff * diff).sum(1).double().sum()
            if need_stats:
                counts[q].index_add_(0, idx, torch.ones(idx.shape[0], dtype=torch.float32, device=dev))
                sums[q].index_add_(0, idx, r.to(torch.float32))
            out_idx[n0:n0 + rows, q] = idx
            quant = quant + c
            r = diff
        out_q[n0:n0 + rows] = quant.to(x.dtype)
    return out_idx, out_q, err.to(acc), counts, sums


def _rotation_vjp(g: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """J^T g of vector-quantize-pytorch's rotate_to(r, c) at fixed r, c (its rotation and scale are constants)."""
    nr = r.norm(dim=-1, keepdim=True)
    nc = c.norm(dim=-1, keepdim=True)
    u = r / nr.clamp(min=1e-6)
    qh = c / nc.clamp(min=1e-6)
    w = u + qh
    w = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    s = nc / nr.clamp(min=1e-6)
    return s * (g - 2.0 * (g * w).sum(-1, keepdim=True) * w + 2.0 * (g * qh).sum(-1, keepdim=True) * u)


def residual_vq_backward_reference(
    grad_quantized: torch.Tensor, grad_sq_err: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor,
    indices: torch.Tensor, rotation: bool, rows: int = ROWS,
) -> torch.Tensor:
    """-> grad_x (N, D) in x's dtype (see the module docstring); grad_sq_err (Q,)."""
    N, D = x.shape
    Q = codebooks.shape[0]
    acc = _acc(x.dtype)
    out = new_output((N, D), x.dtype, x.device)
    cbs = codebooks.to(acc)
    ge = grad_sq_err.to(acc)
    for n0 in range(0, N, rows):
        r = x[n0:n0 + rows].to(acc)
        g = grad_quantized[n0:n0 + rows].to(acc)
        gx = torch.zeros_like(r)
        for q in range(Q):
            c = cbs[q][indices[n0:n0 + rows, q]]
            diff = r - c
            gx = gx + (_rotation_vjp(g, r, c) if rotation else g) + (2.0 * ge[q]) * diff
            r = diff
        out[n0:n0 + rows] = gx.to(x.dtype)
    return out
