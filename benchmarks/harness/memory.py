"""The memory meter: peak extra memory of what runs between ``start()`` and ``peak()``, above the inputs.

CPU: the heap's freed pages are returned to the OS (``malloc_trim``), the process's peak RSS is reset
(``/proc/self/clear_refs``) and its current RSS taken as the baseline;
peak = ``VmHWM`` - baseline (``ru_maxrss`` where ``/proc`` has no VmHWM). Exact in a fresh process; in a
long-lived one, heap pages freed but kept by the allocator make small peaks read low.
CUDA: ``max_memory_allocated`` - ``memory_allocated`` with the inputs alive, counted from after the warm-up
(``restart_cuda_peak``: Triton's one-off autotuning does not count).
"""
from __future__ import annotations

import gc


def proc_status_kb(key: str, pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_heap() -> bool:
    """Give the heap's freed pages back to the OS (glibc ``malloc_trim``), so that memory freed before the
    baseline (a model built and dropped while setting up) cannot be reused unseen by the measured call."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


class MemoryMeter:
    def __init__(self, device: str):
        self.device = device
        self.method = ""
        self.base = 0

    def start(self):
        if self.device == "cuda":
            self.restart_cuda_peak()
            self.method = "cuda max_memory_allocated"
            return
        gc.collect()
        release_freed_heap()
        reset_ok = reset_peak_rss()
        self.base = (proc_status_kb("VmRSS") or 0) * 1024
        self.method = "VmHWM-VmRSS" if reset_ok else "VmHWM-VmRSS (VmHWM not reset)"
        if proc_status_kb("VmHWM") is None:
            import resource

            self.method = "ru_maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def restart_cuda_peak(self):
        """CUDA: count from here (after the warm-up), so one-off autotuning does not count."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        if self.method == "ru_maxrss":
            import resource

            return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)
        return max(0, (proc_status_kb("VmHWM") or 0) * 1024 - self.base)
