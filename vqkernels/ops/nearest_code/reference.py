"""nearest_code in pure PyTorch: the spec, the CPU fallback and the test oracle.

Function computed (for every backend):
    metric 0 (l2): score[n, k] = ||c_k||^2 - 2 <x_n, c_k>,  distance = max(||x_n||^2 + score, 0)
    metric 1 (ip): score[n, k] = -<x_n, c_k>,                distance = 1 + score
    index[n] = argmin_k score[n, k], the lowest k among equal scores; a NaN score counts as +inf.
Arithmetic: float16/bfloat16 inputs are widened to float32 (exact products, float32 sums);
float32 in float32 (TF32 matmul on CUDA when allow_tf32); float64 in float64.

Memory stays bounded however large N*K gets: rows and codes are processed in chunks whose score
tile holds at most ``max_tile_elems`` elements, with a running min/argmin across code chunks.
"""
from __future__ import annotations

import contextlib

import torch

from ..._backend import new_output

MAX_TILE_ELEMS = 1 << 22  # 4M scores = 16 MB of float32 per tile


@contextlib.contextmanager
def _tf32(enabled: bool, device: torch.device):
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def nearest_code_reference(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: int = 0,
    allow_tf32: bool = False,
    max_tile_elems: int = MAX_TILE_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), codebook (K, D) -> (indices int64 (N,), distance float32 (N,))."""
    N, D = x.shape
    K = codebook.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_idx = new_output(N, torch.int64, x.device)
    out_dist = new_output(N, torch.float32, x.device)
    if N == 0:
        return out_idx, out_dist
    rows = max(1, min(N, 4096, max_tile_elems))
    kc = max(1, min(K, max_tile_elems // rows))
    cb = codebook.to(acc)
    cnorm = (cb * cb).sum(1) if metric == 0 else None
    with _tf32(allow_tf32, x.device):
        for n0 in range(0, N, rows):
            xb = x[n0:n0 + rows].to(acc)
            best = torch.full((xb.shape[0],), float("inf"), dtype=acc, device=x.device)
            best_idx = torch.zeros(xb.shape[0], dtype=torch.int64, device=x.device)
            for k0 in range(0, K, kc):
                dots = xb @ cb[k0:k0 + kc].T  # (rows, kc)
                score = (cnorm[k0:k0 + kc] - 2.0 * dots) if metric == 0 else dots.neg_()
                score = torch.where(torch.isnan(score), torch.full_like(score, float("inf")), score)
                a = score.argmin(dim=1)  # the first index among ties
                m = score.gather(1, a[:, None]).squeeze(1)
                upd = m < best  # strict: an earlier chunk keeps its (lower) index on a tie
                best = torch.where(upd, m, best)
                best_idx = torch.where(upd, a + k0, best_idx)
            if metric == 0:
                dist = ((xb * xb).sum(1) + best).clamp_min(0)
            else:
                dist = 1.0 + best
            out_idx[n0:n0 + rows] = best_idx
            out_dist[n0:n0 + rows] = dist.to(torch.float32)
    return out_idx, out_dist
