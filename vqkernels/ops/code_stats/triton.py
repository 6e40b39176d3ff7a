"""Codebook statistics in Triton: per-code counts and sums (EMA statistics), and code usage.

Functions (the same as ``reference.py``, which is the spec), z (N, D), idx (N,):
    code_stats: counts[k] = #{n: idx[n]=k}, sums[k] = sum_{idx[n]=k} z[n]
    code_usage: counts[k] (int64)

Kernel design: a program owns BLOCK_N rows (BLOCK entries for code_usage) and walks D in BLOCK_D
chunks (masks on every load and store; row offsets in int64, since N*D and K*D may pass 2^31).
Counts are int64 atomic adds (exact at any N: float32 counts would stop growing at 2^24 per code);
code_stats converts them to float32 once at the end, as its contract says. The per-code sums are
float32 atomic adds of the rows widened to float32.
NONDETERMINISM: the float atomics add rows in whatever order the programs run, so the last bits of the
sums may differ between runs on a GPU (the counts are exact). Use the ``cpu`` (or ``torch``) backend
where bit-reproducibility matters.
Index range: checked by the launcher, on CUDA tensors on the device without a host sync (a device-side assert;
VQKERNELS_SYNC_INDEX_CHECK=1 reads min/max back and raises IndexError instead: see ops/_triton_index.py), on CPU
tensors (the interpreter) with an IndexError; inside the kernels an out-of-range index is masked, never dereferenced.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import KERNEL_DTYPES
from .._launch import block_d, device_guard
from .._triton_index import check_index_range
from .reference import perplexity_from_counts

BLOCK_N = 32


@triton.jit
def _code_stats_kernel(
    z_ptr, idx_ptr, cnt_ptr, sum_ptr,
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    k = tl.load(idx_ptr + rows, mask=r_ok, other=0)
    r_ok = r_ok & (k >= 0) & (k < K)
    tl.atomic_add(cnt_ptr + k, tl.full((BLOCK_N,), 1, tl.int64), mask=r_ok)
    zrow = rows * D
    crow = k.to(tl.int64) * D
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        m = r_ok[:, None] & (dd < D)[None, :]
        x = tl.load(z_ptr + zrow[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(sum_ptr + crow[:, None] + dd[None, :], x, mask=m)


@triton.jit
def _code_usage_kernel(idx_ptr, cnt_ptr, N, K, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    k = tl.load(idx_ptr + offs, mask=ok, other=0)
    ok = ok & (k >= 0) & (k < K)
    tl.atomic_add(cnt_ptr + k, tl.full((BLOCK,), 1, tl.int64), mask=ok)


def code_stats_triton(z, indices, num_codes):
    """z (N, D), indices (N,) contiguous -> (counts fp32 (K,), sums fp32 (K, D)), by atomic adds."""
    if z.dtype not in KERNEL_DTYPES:
        raise TypeError(f"triton code_stats: z must be float32, float16 or bfloat16, got {z.dtype}")
    if not (z.is_contiguous() and indices.is_contiguous()):
        raise ValueError("triton code_stats: inputs must be contiguous")
    check_index_range(indices, num_codes)
    counts = torch.zeros((num_codes,), dtype=torch.int64, device=z.device)
    sums = torch.zeros((num_codes, z.shape[1]), dtype=torch.float32, device=z.device)
    accumulate_code_stats_(z, indices, counts, sums)
    return counts.to(torch.float32), sums  # one rounding, at the end


def accumulate_code_stats_(z, indices, counts, sums) -> None:
    """Add the counts (into int64 ``counts`` (K,)) and the sums (into float32 ``sums`` (K, D)) of the rows
    of ``z`` (N, D) assigned by ``indices`` (N,), in place. Indices must be in range (not checked here)."""
    if counts.dtype != torch.int64 or sums.dtype != torch.float32:
        raise TypeError(f"counts must be int64 and sums float32, got {counts.dtype} and {sums.dtype}")
    N, D = z.shape
    if N > 0:
        with device_guard(z.device):
            _code_stats_kernel[(triton.cdiv(N, BLOCK_N),)](
                z, indices, counts, sums, N, counts.shape[0], D, BLOCK_N=BLOCK_N, BLOCK_D=block_d(D))


def code_usage_triton(indices, num_codes):
    """indices (N,) contiguous -> (counts int64 (K,), perplexity fp32 0-d)."""
    if not indices.is_contiguous():
        raise ValueError("triton code_usage: indices must be contiguous")
    N = indices.numel()
    check_index_range(indices, num_codes)
    counts = torch.zeros((num_codes,), dtype=torch.int64, device=indices.device)
    if N > 0:
        BLOCK = 1024
        with device_guard(indices.device):
            _code_usage_kernel[(triton.cdiv(N, BLOCK),)](indices, counts, N, num_codes, BLOCK=BLOCK)
    return counts, perplexity_from_counts(counts, N)
