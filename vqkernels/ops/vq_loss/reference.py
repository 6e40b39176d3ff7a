"""The VQ loss ops in pure PyTorch: the spec, the fallback and the test oracle.

Functions computed (for every backend), with z (N, D), codebook (K, D), idx int64 (N,) in [0, K):

    vq_loss forward:   z_q[n] = codebook[idx[n]]                              (z's dtype, exact copy)
                       loss   = scale * sum_{n,d} (z_q[n,d] - z[n,d])^2       (scale = (w_commit + w_cb) / (N*D))
    vq_loss backward:  dz[n]  = dz_q[n] + c_z * (z[n] - z_q[n])               (c_z  = 2 * w_commit * dloss / (N*D))
                       dcb[k] = c_cb * sum_{n: idx[n]=k} (z_q[n] - z[n])      (c_cb = 2 * w_cb     * dloss / (N*D))
    code_stats:        counts[k] = #{n: idx[n]=k},  sums[k] = sum_{n: idx[n]=k} z[n]      (float32)
    code_usage:        counts[k] (int64), perplexity = exp(-sum_k p_k log(p_k + 1e-10)), p = counts / max(N, 1)

Arithmetic: float16/bfloat16 values are widened to float32 (every difference, square, product and
sum is float32; results are rounded to the input dtype once at the end); float32 in float32; float64
in float64 (the loss too, so gradcheck can run). Memory stays bounded: rows are processed in chunks
of at most ``MAX_CHUNK_ELEMS`` elements; nothing of size N x K is ever formed.
"""
from __future__ import annotations

import torch

from ..._backend import new_output

MAX_CHUNK_ELEMS = 1 << 22  # 4M elements = 16 MB of float32 per temporary


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sums run in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_index_range(indices: torch.Tensor, num_codes: int) -> None:
    """IndexError when an index lies outside [0, num_codes) (reads the values: called inside op bodies)."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_codes:
        bad = lo if lo < 0 else hi
        raise IndexError(f"indices out of range: got index {bad}, codes are numbered 0..{num_codes - 1} (K={num_codes})")


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


def code_stats_reference(
    z: torch.Tensor, indices: torch.Tensor, num_codes: int, max_chunk_elems: int = MAX_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, D), indices (N,) -> (counts float32 (K,), sums float32 (K, D)); float64 in float64."""
    N, D = z.shape
    check_index_range(indices, num_codes)
    acc = acc_dtype(z.dtype)
    counts = new_output((num_codes,), acc, z.device)
    counts.copy_(torch.bincount(indices, minlength=num_codes).to(acc))
    sums = new_output((num_codes, D), acc, z.device)
    sums.zero_()
    rows = _row_chunk(N, D, max_chunk_elems)
    for n0 in range(0, N, rows):
        sums.index_add_(0, indices[n0:n0 + rows], z[n0:n0 + rows].to(acc))
    return counts, sums


def code_usage_reference(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (N,) -> (counts int64 (K,), perplexity float32 0-d)."""
    check_index_range(indices, num_codes)
    counts = new_output((num_codes,), torch.int64, indices.device)
    counts.copy_(torch.bincount(indices, minlength=num_codes))
    perplexity = perplexity_from_counts(counts, indices.numel())
    return counts, perplexity


def perplexity_from_counts(counts: torch.Tensor, total: int) -> torch.Tensor:
    """taming's formula, exp(-sum p log(p + 1e-10)), with p = counts / total (total 0: perplexity 1)."""
    p = counts.to(torch.float64) / max(total, 1)
    return torch.exp(-(p * torch.log(p + 1e-10)).sum()).to(torch.float32)


def ema_update_from_stats_reference(
    codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor,
    counts: torch.Tensor, sums: torch.Tensor, decay: float, eps: float,
) -> None:
    """vector-quantize-pytorch's EuclideanCodebook EMA step, in its order of operations, in place.

    ``ema_inplace``: ``old.lerp_(new, 1 - decay)`` for cluster_size and embed_avg (= embed_sum here);
    ``update_ema``: ``laplace_smoothing(cluster_size, K, eps) * cluster_size.sum()`` then
    ``embed = embed_avg / smoothed[:, None]``.
    """
    K = cluster_size.shape[0]
    cluster_size.lerp_(counts.to(cluster_size), 1.0 - decay)
    embed_sum.lerp_(sums.to(embed_sum), 1.0 - decay)
    n = cluster_size.sum(dim=-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    codebook.copy_(embed_sum / smoothed[:, None])


__all__ = [
    "MAX_CHUNK_ELEMS", "acc_dtype", "check_index_range", "code_stats_reference", "code_usage_reference",
    "ema_update_from_stats_reference", "perplexity_from_counts", "vq_loss_bwd_reference", "vq_loss_fwd_reference",
]
