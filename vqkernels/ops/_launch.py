"""What the op folders share around their Triton launchers (kept free of a triton import: an op's ``__init__``
uses these and must import on machines without Triton)."""
from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType
from typing import Callable

import torch


def triton_module(package: str) -> Callable[[], ModuleType]:
    """The loader of an op folder's Triton launchers: ``triton_module(__name__)()`` is ``<package>.triton``,
    imported at the first call (importing Triton costs ~65 ms and is not needed unless a Triton kernel runs)."""

    def load() -> ModuleType:
        return importlib.import_module(".triton", package)

    return load


def interpreter_float32_only(z: torch.Tensor, **_) -> list[str]:
    """A backend limit (``_backend.Capability(limit=...)``) of the Triton kernels whose float16/bfloat16 paths
    run only on a GPU: on CPU tensors (the Triton interpreter) they take float32 only."""
    if z.device.type == "cpu" and z.dtype != torch.float32:
        return ["the Triton interpreter runs these kernels in float32 only (fp16/bf16 run on a GPU)"]
    return []


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is unit-stride (or of size 1: it is never stepped), else a contiguous
    copy: the kernels read any other strides in place (a gradient expanded from a scalar has stride 0 there)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def device_guard(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the *current* CUDA device, so a tensor
    on cuda:1 read by a kernel launched while cuda:0 is current would be an illegal address."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """The number of SMs of CUDA device ``device_index`` (queried once per device)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_d(D: int, lo: int = 16, hi: int = 128) -> int:
    """The D-chunk a row-walking kernel loads at once: the next power of two of D, within [lo, hi]."""
    p = 1
    while p < max(D, 1):
        p *= 2
    return max(lo, min(hi, p))
