"""Codebook statistics in pure PyTorch: the spec, the fallback and the test oracle.

Functions computed (for every backend), with z (N, D), idx int64 (N,) in [0, K):

    code_stats:  counts[k] = #{n: idx[n]=k},  sums[k] = sum_{n: idx[n]=k} z[n]      (float32; float64 for float64 z)
    code_usage:  counts[k] (int64), perplexity = exp(-sum_k p_k log(p_k + 1e-10)), p = counts / max(N, 1)
    ema_update_from_stats_: vector-quantize-pytorch's EMA mixing + Laplace smoothing, in place

Arithmetic: float16/bfloat16 rows are widened to float32 and summed in float32; float64 in float64.
Memory stays bounded: rows are summed in chunks of at most ``MAX_CHUNK_ELEMS`` elements.
"""
from __future__ import annotations

import torch

from .._checks import check_index_range, new_output
from .._layout import acc_dtype

MAX_CHUNK_ELEMS = 1 << 22  # 4M elements = 16 MB of float32 per temporary


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
    rows = max(1, min(max(N, 1), max_chunk_elems // max(D, 1)))
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
    "MAX_CHUNK_ELEMS", "code_stats_reference", "code_usage_reference", "ema_update_from_stats_reference",
    "perplexity_from_counts",
]
