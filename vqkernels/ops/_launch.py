"""What every Triton launcher needs around a launch (kept free of a triton import)."""
from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the *current* CUDA device, so a tensor
    on cuda:1 read by a kernel launched while cuda:0 is current would be an illegal address."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def block_d(D: int, lo: int = 16, hi: int = 128) -> int:
    """The D-chunk a row-walking kernel loads at once: the next power of two of D, within [lo, hi]."""
    p = 1
    while p < max(D, 1):
        p *= 2
    return max(lo, min(hi, p))
