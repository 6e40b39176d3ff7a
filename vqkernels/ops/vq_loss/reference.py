"""The VQ loss in pure PyTorch: the spec, the fallback and the test oracle.

Functions computed (for every backend), with z (N, D), codebook (K, D), idx int64 (N,) in [0, K):

    vq_loss forward:   z_q[n] = codebook[idx[n]]                              (z's dtype, exact copy)
                       loss   = scale * sum_{n,d} (z_q[n,d] - z[n,d])^2       (scale = (w_commit + w_cb) / (N*D))
    vq_loss backward:  dz[n]  = dz_q[n] + c_z * (z[n] - z_q[n])               (c_z  = 2 * w_commit * dloss / (N*D))
                       dcb[k] = c_cb * sum_{n: idx[n]=k} (z_q[n] - z[n])      (c_cb = 2 * w_cb     * dloss / (N*D))

(The codebook statistics, code_stats and code_usage, are in ops/code_stats/reference.py.)

Arithmetic: float16/bfloat16 values are widened to float32 (every difference, square, product and
sum is float32; results are rounded to the input dtype once at the end); float32 in float32; float64
in float64 (the loss too, so gradcheck can run). Memory stays bounded: rows are processed in chunks
of at most ``MAX_CHUNK_ELEMS`` elements; nothing of size N x K is ever formed.
"""
from __future__ import annotations

import torch

from .._checks import check_index_range, new_output
from .._layout import acc_dtype

MAX_CHUNK_ELEMS = 1 << 22  # 4M elements = 16 MB of float32 per temporary


def _row_chunk(N: int, D: int, max_elems: int) -> int:
    return max(1, min(max(N, 1), max_elems // max(D, 1)))


def vq_loss_fwd_reference(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, scale: float,
    max_chunk_elems: int = MAX_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, D), codebook (K, D), indices (N,) -> (z_q (N, D) in z's dtype, loss 0-d float32/float64)."""
    N, D = z.shape
    K = codebook.shape[0]
    check_index_range(indices, K)
    acc = acc_dtype(z.dtype)
    z_q = new_output((N, D), z.dtype, z.device)
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    rows = _row_chunk(N, D, max_chunk_elems)
    for n0 in range(0, N, rows):
        i = indices[n0:n0 + rows]
        zq = codebook.index_select(0, i)
        z_q[n0:n0 + rows] = zq
        diff = zq.to(acc) - z[n0:n0 + rows].to(acc)
        total += (diff * diff).sum(dtype=acc).to(torch.float64)
    loss = (total * scale).to(acc)
    return z_q, loss


def vq_loss_bwd_reference(
    grad_zq: torch.Tensor, grad_loss: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
    w_commit: float, w_codebook: float, need_grad_z: bool = True, need_grad_codebook: bool = True,
    max_chunk_elems: int = MAX_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_z (N, D) in z's dtype or empty, grad_codebook (K, D) in the codebook's dtype or empty)."""
    N, D = z.shape
    K = codebook.shape[0]
    check_index_range(indices, K)
    acc = acc_dtype(z.dtype)
    numel = N * D
    g = grad_loss.to(acc)
    c_z = g * (2.0 * w_commit / numel) if numel else g * 0
    c_cb = g * (2.0 * w_codebook / numel) if numel else g * 0
    grad_z = new_output((N, D) if need_grad_z else (0,), z.dtype, z.device)
    gcb = torch.zeros((K, D), dtype=acc, device=z.device) if need_grad_codebook else None
    rows = _row_chunk(N, D, max_chunk_elems)
    for n0 in range(0, N, rows):
        i = indices[n0:n0 + rows]
        diff = z[n0:n0 + rows].to(acc) - codebook.index_select(0, i).to(acc)  # z - z_q
        if need_grad_z:
            grad_z[n0:n0 + rows] = (grad_zq[n0:n0 + rows].to(acc) + c_z * diff).to(z.dtype)
        if need_grad_codebook:
            gcb.index_add_(0, i, diff)
    if need_grad_codebook:
        grad_cb = new_output((K, D), codebook.dtype, z.device)
        grad_cb.copy_(gcb * (-c_cb))
    else:
        grad_cb = new_output((0,), codebook.dtype, z.device)
    return grad_z, grad_cb


__all__ = ["MAX_CHUNK_ELEMS", "vq_loss_bwd_reference", "vq_loss_fwd_reference"]
