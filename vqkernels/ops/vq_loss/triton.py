"""The VQ loss in Triton: fused gather + loss, and the fused backward.

Functions (the same as ``reference.py``, which is the spec), z (N, D), codebook (K, D), idx (N,):
    forward:    z_q[n] = codebook[idx[n]];  loss = scale * sum (z_q - z)^2
    backward:   grad_z[n] = grad_zq[n] + c_z (z[n] - z_q[n]);  grad_cb[k] = c_cb sum_{idx[n]=k} (z_q[n] - z[n])

Kernel design: a program owns BLOCK_N rows and walks D in BLOCK_D chunks (masks on every load and
store; row offsets in int64, since N*D and K*D may pass 2^31). Values are widened to fp32.
  * ``_vq_loss_fwd_kernel`` stores z_q and one fp32 partial sum of squares per program; the launcher
    adds the partials in float64 in program order, so the loss is deterministic.
  * ``_vq_loss_bwd_kernel`` writes grad_z and adds (z - z_q) into a (K, D) fp32 accumulator with
    ``tl.atomic_add``; the launcher scales it by -c_cb and rounds to the codebook's dtype.
    ``c_z``/``c_cb`` read grad_loss from device memory (no host sync).
(The codebook statistics, code_stats and code_usage, are in ops/code_stats/triton.py.)
NONDETERMINISM: the float atomics of the codebook gradient add rows in whatever order the
programs run, so the last bits of those results may differ between runs on a GPU. Use the ``cpu``
(or ``torch``) backend where bit-reproducibility matters.
Index range: checked by the launcher, on CUDA tensors on the device without a host sync (a device-side assert;
VQKERNELS_SYNC_INDEX_CHECK=1 reads min/max back and raises IndexError instead: see ops/_triton_index.py), on CPU
tensors (the interpreter) with an IndexError; inside the kernels an out-of-range index is masked, never dereferenced.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import KERNEL_DTYPES, new_output
from .._launch import block_d, device_guard
from .._triton_index import check_index_range

BLOCK_N = 32


@triton.jit
def _vq_loss_fwd_kernel(
    z_ptr, c_ptr, idx_ptr, zq_ptr, part_ptr,
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    k = tl.load(idx_ptr + rows, mask=r_ok, other=0)
    r_ok = r_ok & (k >= 0) & (k < K)
    zrow = rows.to(tl.int64) * D
    crow = k.to(tl.int64) * D
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        m = r_ok[:, None] & (dd < D)[None, :]
        c = tl.load(c_ptr + crow[:, None] + dd[None, :], mask=m, other=0.0)
        x = tl.load(z_ptr + zrow[:, None] + dd[None, :], mask=m, other=0.0)
        tl.store(zq_ptr + zrow[:, None] + dd[None, :], c, mask=m)
        diff = c.to(tl.float32) - x.to(tl.float32)
        acc += diff * diff
    tl.store(part_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _vq_loss_bwd_kernel(
    gzq_ptr, gl_ptr, z_ptr, c_ptr, idx_ptr, gz_ptr, acc_ptr,
    N, K, D, cz_mul,
    NEED_GZ: tl.constexpr, NEED_GCB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    k = tl.load(idx_ptr + rows, mask=r_ok, other=0)
    r_ok = r_ok & (k >= 0) & (k < K)
    zrow = rows.to(tl.int64) * D
    crow = k.to(tl.int64) * D
    c_z = tl.load(gl_ptr).to(tl.float32) * cz_mul
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        m = r_ok[:, None] & (dd < D)[None, :]
        c = tl.load(c_ptr + crow[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(z_ptr + zrow[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
        diff = x - c  # z - z_q
        if NEED_GZ:
            g = tl.load(gzq_ptr + zrow[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
            out = g + c_z * diff
            tl.store(gz_ptr + zrow[:, None] + dd[None, :], out.to(gz_ptr.dtype.element_ty), mask=m)
        if NEED_GCB:
            tl.atomic_add(acc_ptr + crow[:, None] + dd[None, :], diff, mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch.

def _check(z: torch.Tensor, indices: torch.Tensor, what: str):
    if z.dtype not in KERNEL_DTYPES:
        raise TypeError(f"triton {what}: z must be float32, float16 or bfloat16, got {z.dtype}")
    if not (z.is_contiguous() and indices.is_contiguous()):
        raise ValueError(f"triton {what}: inputs must be contiguous")


def vq_loss_fwd_triton(z, codebook, indices, scale):
    """z (N, D), codebook (K, D), indices (N,) contiguous -> (z_q (N, D), loss fp32 0-d)."""
    _check(z, indices, "vq_loss")
    N, D = z.shape
    K = codebook.shape[0]
    check_index_range(indices, K)
    z_q = new_output((N, D), z.dtype, z.device)
    grid = (triton.cdiv(N, BLOCK_N),)
    part = new_output((grid[0],), torch.float32, z.device)
    if N > 0 and D > 0:
        with device_guard(z.device):
            _vq_loss_fwd_kernel[grid](z, codebook, indices, z_q, part, N, K, D, BLOCK_N=BLOCK_N, BLOCK_D=block_d(D))
        total = part.to(torch.float64).sum()
    else:
        total = torch.zeros((), dtype=torch.float64, device=z.device)
    return z_q, (total * scale).to(torch.float32)


def vq_loss_bwd_triton(grad_zq, grad_loss, z, codebook, indices, w_commit, w_codebook, need_z, need_cb):
    """-> (grad_z (N, D) or (0,), grad_codebook (K, D) or (0,)); grad_loss is a 0-d device tensor."""
    _check(z, indices, "vq_loss_backward")
    N, D = z.shape
    K = codebook.shape[0]
    check_index_range(indices, K)
    numel = N * D
    grad_z = new_output((N, D) if need_z else (0,), z.dtype, z.device)
    acc = torch.zeros((K, D) if need_cb else (1,), dtype=torch.float32, device=z.device)
    gl = grad_loss.reshape(1).to(torch.float32)
    if numel > 0 and (need_z or need_cb):
        grid = (triton.cdiv(N, BLOCK_N),)
        with device_guard(z.device):
            _vq_loss_bwd_kernel[grid](
                grad_zq, gl, z, codebook, indices, grad_z if need_z else z, acc,
                N, K, D, 2.0 * w_commit / numel,
                NEED_GZ=bool(need_z), NEED_GCB=bool(need_cb), BLOCK_N=BLOCK_N, BLOCK_D=block_d(D))
    if need_cb:
        grad_cb = new_output((K, D), codebook.dtype, z.device)
        c_cb = gl[0] * (2.0 * w_codebook / numel) if numel else gl[0] * 0
        grad_cb.copy_(acc * (-c_cb))
    else:
        grad_cb = new_output((0,), codebook.dtype, z.device)
    return grad_z, grad_cb
