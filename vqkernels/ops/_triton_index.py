"""The index-range check of the Triton launchers that gather by code index (vq_loss, code_stats).

The rule is the CUDA backend's (csrc/cuda/vq_launch.h): a kernel never dereferences an index outside [0, K) (it
masks such rows), and on CUDA tensors the range is checked on the device, without a host sync: a tiny kernel
queued on the stream before the op's kernels asserts every index (a device-side assert, as torch's own index ops
on CUDA report a bad index), so the ops overlap with the host and can be captured in a CUDA graph. A bad index then
stops the stream with a device-side error naming the check. VQKERNELS_SYNC_INDEX_CHECK=1 (outside graph capture)
reads the indices' min/max back instead and raises IndexError, as CPU tensors (the Triton interpreter) always do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_index_range as _check_index_range_sync
from ._checks import sync_index_check
from ._launch import device_guard

BLOCK = 1024


@triton.jit(debug=True)  # tl.device_assert is compiled in only in debug mode
def _index_range_assert_kernel(idx_ptr, N, K, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(idx_ptr + offs, mask=offs < N, other=0)  # lanes past N read 0: in range, since K >= 1
    tl.device_assert((k >= 0) & (k < K), "indices out of range: an index lies outside [0, num_codes)")


def check_index_range(indices: torch.Tensor, num_codes: int) -> None:
    """Every index of ``indices`` (contiguous int64) in [0, num_codes): on CUDA tensors a device-side assert queued
    on the current stream (no sync); on CPU tensors, and on CUDA under VQKERNELS_SYNC_INDEX_CHECK=1 outside graph
    capture, an IndexError raised here."""
    N = indices.numel()
    if N == 0:
        return
    if indices.device.type == "cuda" and (torch.cuda.is_current_stream_capturing() or not sync_index_check()):
        with device_guard(indices.device):
            _index_range_assert_kernel[(triton.cdiv(N, BLOCK),)](indices, N, num_codes, BLOCK=BLOCK)
        return
    _check_index_range_sync(indices, num_codes)
