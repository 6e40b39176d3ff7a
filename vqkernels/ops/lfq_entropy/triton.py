"""lfq_entropy in Triton: the codebook entropy as a GEMM of bit tables built in registers, never N x 2^d.

Function: the same as ``reference.py`` (the spec). x (N, C, d), L = scale * x, q = sigmoid(L); the top
h = ceil(d/2) bits index a (table A), the low l = d - h bits index b (table B); pbar[c, a 2^l + b] = 1/N sum_n
A[n, a] B[n, b].

Kernels (D, H, L: compile-time constants, so the bit loops unroll):
  * ``_lfq_entropy_fwd_kernel``: grid (a tiles, b tiles, C). A program owns a (BLOCK_A, BLOCK_B) tile of pbar and
    streams the rows in BLOCK_N chunks: it builds its A (BLOCK_N, BLOCK_A) and B (BLOCK_N, BLOCK_B) table tiles
    from the d logit columns (H and L multiplies an entry: a small fraction of the BLOCK_A or BLOCK_B multiply-adds
    of the dot each entry feeds), then ``tl.dot(A^T, B)`` into an fp32 accumulator (exact fp32: "ieee").
    Epilogue: pbar = acc / N stored, and the tile's sum of -p log max(p, eps) stored as one partial (summed by the
    launcher in a fixed order: deterministic).
  * ``_lfq_per_sample_kernel``: the per-sample entropy, elementwise, one partial sum per program.
  * ``_lfq_entropy_grad_weight_kernel``: G = d codebook / d pbar times the upstream gradient / (N C), elementwise.
  * ``_lfq_entropy_bwd_kernel``: grid (row blocks, C). For each a tile: gA = sum over b tiles of B G^T, W = gA A,
    and the bit sums dL[:, j] += W @ bits (a (BLOCK_A, DP) 0/1 matrix built from iota, through ``tl.dot``), minus
    q_j sum W; then the same over b tiles with gB = A G. Tables are rebuilt (2^h / BLOCK_A times for B): cheap
    next to the dots. Plus the per-sample term; grad_x = scale * dL.
Memory: pbar (C, 2^d) and G (C, 2^d), partial sums; no N x K buffer. Indices into x are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _backend

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _bit_tile(x_row_ptr, row_mask, offs_k, scale, FIRST: tl.constexpr, NBITS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, D: tl.constexpr):
    """(BLOCK_N, BLOCK_K): prod over bits FIRST..FIRST+NBITS-1 of sigmoid(+-L), + where bit (NBITS-1-j) of k is set.
    Rows outside the mask are 0 (they add nothing to any sum)."""
    t = tl.where(row_mask, 1.0, 0.0)[:, None] + tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(NBITS):
        v = tl.load(x_row_ptr + (FIRST + j), mask=row_mask, other=0.0).to(tl.float32) * scale
        plus = 1.0 / (1.0 + tl.exp(-v))
        minus = 1.0 / (1.0 + tl.exp(v))
        bit = ((offs_k >> (NBITS - 1 - j)) & 1) != 0
        t = t * tl.where(bit[None, :], plus[:, None], minus[:, None])
    return t


@triton.jit
def _lfq_entropy_fwd_kernel(
    x_ptr, pbar_ptr, part_ptr,          # x (N, C, D) fp32; pbar (C, KA * KB) fp32; partial entropies (C, tiles)
    N, C, scale, eps, inv_n,
    D: tl.constexpr, H: tl.constexpr, L: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    c = tl.program_id(2)
    KA: tl.constexpr = 1 << H
    KB: tl.constexpr = 1 << L
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        row_mask = rows < N
        row_ptr = x_ptr + (rows.to(tl.int64) * C + c) * D
        A = _bit_tile(row_ptr, row_mask, offs_a, scale, 0, H, BLOCK_N, BLOCK_A, D)
        B = _bit_tile(row_ptr, row_mask, offs_b, scale, H, L, BLOCK_N, BLOCK_B, D)
        acc = tl.dot(tl.trans(A), B, acc, input_precision="ieee")
    p = acc * inv_n
    ok = (offs_a < KA)[:, None] & (offs_b < KB)[None, :]
    k = offs_a[:, None] * KB + offs_b[None, :]
    tl.store(pbar_ptr + c.to(tl.int64) * (KA * KB) + k, p, mask=ok)
    clamp = tl.maximum(eps, 1.1754943508222875e-38)
    e = tl.where(ok, -p * tl.log(tl.maximum(p, clamp)), 0.0)
    tiles = tl.num_programs(0) * tl.num_programs(1)
    tl.store(part_ptr + c * tiles + pid_a * tl.num_programs(1) + pid_b, tl.sum(tl.sum(e, axis=1), axis=0))


@triton.jit
def _lfq_per_sample_kernel(x_ptr, part_ptr, total, scale, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * scale
    a = tl.abs(v)
    e = tl.exp(-a)
    h = tl.log(1.0 + e) + a * e / (1.0 + e)  # softplus(-|L|) + |L| sigmoid(-|L|); log(1 + e) is exact enough:
    tl.store(part_ptr + pid, tl.sum(tl.where(m, h, 0.0), axis=0))  # e <= 1, absolute error ~1e-7 per term


@triton.jit
def _lfq_entropy_grad_weight_kernel(pbar_ptr, g_ptr, total, eps, neg_log_eps, w, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    p = tl.load(pbar_ptr + offs, mask=m, other=1.0)
    g = -(tl.log(tl.maximum(p, 1.1754943508222875e-38)) + 1.0)
    g = tl.where((eps > 0.0) & (p < eps), neg_log_eps, g)
    tl.store(g_ptr + offs, w * g, mask=m)


@triton.jit
def _lfq_entropy_bwd_kernel(
    x_ptr, g_ptr, grad_ptr,             # x (N, C, D); G (C, KA, KB) (weights: d loss / d A B products); grad (N, C, D)
    N, C, scale, gps,                   # gps: d loss / d per_sample, divided by N C
    D: tl.constexpr, H: tl.constexpr, L: tl.constexpr, DP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, NEED_CB: tl.constexpr,
):
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    KA: tl.constexpr = 1 << H
    KB: tl.constexpr = 1 << L
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_ptr = x_ptr + (rows.to(tl.int64) * C + c) * D
    offs_j = tl.arange(0, DP)
    j_ok = offs_j < D
    xt = tl.load(row_ptr[:, None] + offs_j[None, :], mask=row_mask[:, None] & j_ok[None, :], other=0.0)
    Lt = xt.to(tl.float32) * scale  # (BLOCK_N, DP)
    q = 1.0 / (1.0 + tl.exp(-Lt))
    qm = 1.0 / (1.0 + tl.exp(Lt))
    dL = gps * (-Lt * q * qm)
    if NEED_CB:
        g_base = g_ptr + c.to(tl.int64) * (KA * KB)
        offs_a0 = tl.arange(0, BLOCK_A)
        offs_b0 = tl.arange(0, BLOCK_B)
        # top bits: column j < H of bitsA[a, j] is bit (H-1-j) of a
        tot_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for a0 in range(0, KA, BLOCK_A):
            offs_a = a0 + offs_a0
            A = _bit_tile(row_ptr, row_mask, offs_a, scale, 0, H, BLOCK_N, BLOCK_A, D)
            gA = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)
            for b0 in range(0, KB, BLOCK_B):
                offs_b = b0 + offs_b0
                B = _bit_tile(row_ptr, row_mask, offs_b, scale, H, L, BLOCK_N, BLOCK_B, D)
                gt = tl.load(g_base + offs_b[:, None] + offs_a[None, :] * KB,  # (BLOCK_B, BLOCK_A) = G^T tile
                             mask=(offs_b < KB)[:, None] & (offs_a < KA)[None, :], other=0.0)
                gA = tl.dot(B, gt, gA, input_precision="ieee")
            W = tl.where((offs_a < KA)[None, :], gA * A, 0.0)
            sh = tl.where(offs_j < H, H - 1 - offs_j, 0)
            bits = tl.where((offs_j < H)[None, :], ((offs_a[:, None] >> sh[None, :]) & 1).to(tl.float32), 0.0)
            dL = tl.dot(W, bits, dL, input_precision="ieee")
            tot_a += tl.sum(W, axis=1)
        tot_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for b0 in range(0, KB, BLOCK_B):
            offs_b = b0 + offs_b0
            B = _bit_tile(row_ptr, row_mask, offs_b, scale, H, L, BLOCK_N, BLOCK_B, D)
            gB = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
            for a0 in range(0, KA, BLOCK_A):
                offs_a = a0 + offs_a0
                A = _bit_tile(row_ptr, row_mask, offs_a, scale, 0, H, BLOCK_N, BLOCK_A, D)
                gt = tl.load(g_base + offs_a[:, None] * KB + offs_b[None, :],
                             mask=(offs_a < KA)[:, None] & (offs_b < KB)[None, :], other=0.0)
                gB = tl.dot(A, gt, gB, input_precision="ieee")
            W = tl.where((offs_b < KB)[None, :], gB * B, 0.0)
            sh = tl.where((offs_j >= H) & j_ok, D - 1 - offs_j, 0)
            bits = tl.where(((offs_j >= H) & j_ok)[None, :],
                            ((offs_b[:, None] >> sh[None, :]) & 1).to(tl.float32), 0.0)
            dL = tl.dot(W, bits, dL, input_precision="ieee")
            tot_b += tl.sum(W, axis=1)
        tot = tl.where((offs_j < H)[None, :], tot_a[:, None], tot_b[:, None])
        dL = dL - q * tot
    tl.store(grad_ptr + (rows.to(tl.int64) * C + c)[:, None] * D + offs_j[None, :], dL * scale,
             mask=row_mask[:, None] & j_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Configurations: the table tiles must be at least 16 wide for tl.dot (padded, masked, for d < 8); at most 32
# (64 x 64 tiles spilled at sm_90: 4.4 KB of stack in the backward, 2.6 KB in the forward at d = 18).

BLOCK_N = 32
BLOCK_ELEMWISE = 1024
NUM_WARPS = 4
BWD_NUM_WARPS = 8  # the backward holds ~4 tiles live: at 4 warps it needed 255 registers and spilled at sm_90
NUM_STAGES = 2


def blocks(d: int) -> tuple[int, int, int, int]:
    """(H, L, BLOCK_A, BLOCK_B) for d bits."""
    h = (d + 1) // 2
    l = d - h
    return h, l, max(16, min(32, 1 << h)), max(16, min(32, 1 << l))


def dp(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _check(x):
    if x.dim() != 3 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 (N, C, d) tensor, got {x.dtype} {tuple(x.shape)}")
    if not 1 <= x.shape[2] <= 30:
        raise ValueError(f"d must be in [1, 30], got {x.shape[2]}")


def lfq_entropy_fwd_triton(x: torch.Tensor, scale: float, eps: float):
    """x (N, C, d) float32 contiguous -> (per_sample 0-d, codebook 0-d, pbar (C, 2^d)) float32."""
    _check(x)
    N, C, d = x.shape
    h, l, ba, bb = blocks(d)
    dev = x.device
    pbar = _backend.new_output((C, 1 << d), torch.float32, dev)
    if N == 0:
        nan = torch.full((), float("nan"), device=dev)
        return nan, nan.clone(), pbar.fill_(float("nan"))
    ga, gb = triton.cdiv(1 << h, ba), triton.cdiv(1 << l, bb)
    part = torch.empty((C, ga * gb), dtype=torch.float32, device=dev)
    total = N * C * d
    ps_part = torch.empty(triton.cdiv(total, BLOCK_ELEMWISE), dtype=torch.float32, device=dev)
    with (torch.cuda.device(dev) if dev.type == "cuda" else _null()):
        _lfq_entropy_fwd_kernel[(ga, gb, C)](x, pbar, part, N, C, float(scale), float(eps), 1.0 / N,
                                             D=d, H=h, L=l, BLOCK_N=BLOCK_N, BLOCK_A=ba, BLOCK_B=bb,
                                             num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        _lfq_per_sample_kernel[(ps_part.numel(),)](x, ps_part, total, float(scale), BLOCK=BLOCK_ELEMWISE,
                                                   num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    ps = ps_part.double().sum().float() / (N * C)
    cb = part.double().sum(1).mean().float()
    return ps, cb, pbar


def lfq_entropy_bwd_triton(grad_ps, grad_cb, x, pbar, scale: float, eps: float):
    """-> grad_x (N, C, d) float32."""
    _check(x)
    N, C, d = x.shape
    h, l, ba, bb = blocks(d)
    dev = x.device
    grad = _backend.new_output((N, C, d), torch.float32, dev)
    if N == 0:
        return grad
    gcb = float(grad_cb)
    gps = float(grad_ps) / (N * C)
    need_cb = gcb != 0.0
    import math

    K = 1 << d
    G = torch.empty((C, K), dtype=torch.float32, device=dev) if need_cb else pbar
    with (torch.cuda.device(dev) if dev.type == "cuda" else _null()):
        if need_cb:
            _lfq_entropy_grad_weight_kernel[(triton.cdiv(C * K, BLOCK_ELEMWISE),)](
                pbar, G, C * K, float(eps), -math.log(eps) if eps > 0 else 0.0, gcb / C / N,
                BLOCK=BLOCK_ELEMWISE, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        _lfq_entropy_bwd_kernel[(triton.cdiv(N, BLOCK_N), C)](
            x, G, grad, N, C, float(scale), gps, D=d, H=h, L=l, DP=dp(d), BLOCK_N=BLOCK_N, BLOCK_A=ba,
            BLOCK_B=bb, NEED_CB=need_cb, num_warps=BWD_NUM_WARPS, num_stages=NUM_STAGES)
    return grad


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# Bit counts the sm_90 compile test builds the kernels at (D is a compile-time constant: each d is its own
# compile; these cover the padded tiles (d < 8), odd splits, and the sizes tokenizers use).
SM90_CHECK_D = (5, 16, 18)


def shipped_configs() -> list[tuple[str, dict, int]]:
    """(kernel name, constexprs, num_warps, num_stages) of every launch the launchers make, at the d of ``SM90_CHECK_D``."""
    out = []
    for d in SM90_CHECK_D:
        h, l, ba, bb = blocks(d)
        tile = dict(D=d, H=h, L=l, BLOCK_N=BLOCK_N, BLOCK_A=ba, BLOCK_B=bb)
        out.append(("_lfq_entropy_fwd_kernel", tile, NUM_WARPS, NUM_STAGES))
        for need_cb in (True, False):
            out.append(("_lfq_entropy_bwd_kernel", dict(tile, DP=dp(d), NEED_CB=need_cb), BWD_NUM_WARPS, NUM_STAGES))
    out.append(("_lfq_per_sample_kernel", dict(BLOCK=BLOCK_ELEMWISE), NUM_WARPS, NUM_STAGES))
    out.append(("_lfq_entropy_grad_weight_kernel", dict(BLOCK=BLOCK_ELEMWISE), NUM_WARPS, NUM_STAGES))
    return out
