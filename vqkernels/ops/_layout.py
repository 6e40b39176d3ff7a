"""The (B, T, D) row layout the quantizer ops read and write in place (vq_loss, vector_quantize, code_stats).

Their C++ kernels take z as a (B, T, D) view with any strides, so a channel-first feature map permuted
to (B, H, W, C) is read where it lies; the reference and Triton take contiguous (N, D) rows and write
their result back into the layout ``torch.empty_like(z)`` gives (what the ops' fake implementations promise).
"""
from __future__ import annotations

import math

import torch


def as_btd(t: torch.Tensor) -> torch.Tensor:
    """A (B, T, D) view of ``t`` (..., D) without a copy where its strides allow (e.g. a channel-first
    feature map permuted to (B, H, W, C) becomes (B, H*W, C)); otherwise a contiguous (1, N, D) copy.
    Rows are numbered in t's logical (row-major) order either way."""
    D = t.shape[-1]
    lead, strides = list(t.shape[:-1]), list(t.stride()[:-1])

    def mergeable(sz, st):
        dims = [(a, b) for a, b in zip(sz, st) if a != 1]
        return all(dims[j][1] == dims[j + 1][1] * dims[j + 1][0] for j in range(len(dims) - 1))

    for i in range(len(lead) + 1):
        if mergeable(lead[:i], strides[:i]) and mergeable(lead[i:], strides[i:]):
            return t.view(math.prod(lead[:i]), math.prod(lead[i:]), D)
    return t.contiguous().view(1, -1, D)


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., D) as contiguous (N, D) rows (a copy only where it is not already)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def like(z: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``flat`` (N, D) laid out as ``torch.empty_like(z)`` (what the fake implementation promises)."""
    if z.is_contiguous():
        return flat.view(z.shape)
    out = torch.empty_like(z)
    if out.is_contiguous():  # z was not dense: empty_like gives a contiguous tensor
        return flat.view(z.shape)
    out.copy_(flat.view(z.shape))
    return out


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums run in (and the statistics come back in): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
