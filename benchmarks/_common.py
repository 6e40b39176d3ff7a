"""What the pytest-benchmark modules share: the device, the memory cap, threads and the timed callable."""
from __future__ import annotations

import os

import pytest
import torch

from vqkernels.bench.runner import _MemoryMeter, _set_threads, _usable_cores


def bench_device() -> str:
    """VQKERNELS_BENCH_DEVICE (auto: cuda when a GPU is present, else cpu)."""
    want = os.environ.get("VQKERNELS_BENCH_DEVICE", "auto")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def skip_over_memory_cap(nk_bytes: int, device: str) -> None:
    """Skip a provider whose N x K matrices would not fit: 90% of the GPU, or half the RAM."""
    cap = int(0.9 * torch.cuda.get_device_properties(0).total_memory) if device == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if nk_bytes > cap:
        pytest.skip(f"its N x K matrices need more than the memory cap ({cap / 2**30:.1f} GiB)")


def set_bench_threads() -> None:
    _set_threads(int(os.environ.get("VQKERNELS_BENCH_THREADS", _usable_cores())))


def synchronized(fn, device: str):
    """fn, followed by a device synchronisation on CUDA (so a timed call includes the kernels)."""
    if device != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def measured_call(call, device: str):
    """One untimed call: (its output, the peak extra memory in bytes, how it was measured). Also a warm-up."""
    meter = _MemoryMeter(device)
    meter.start()
    out = call()
    return out, meter.peak(), meter.method


def rounds() -> int:
    return int(os.environ.get("VQKERNELS_BENCH_ROUNDS", "5"))
