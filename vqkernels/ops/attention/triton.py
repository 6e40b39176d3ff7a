"""Attention in Triton: FlashAttention-2 forward and backward, and flash-decoding over a KV cache.

Function (the same as ``reference.py``, which is the spec), q (B, H, Tq, Dh), k, v (B, Hkv, Tk, Dh),
query head h reading kv head h // (H // Hkv):
    s[i, j] = scale * <q_i, k_j>, over the keys j that query i sees (all of them, or with ``causal``
    the keys j <= i + Tk - Tq: the mask aligned to the bottom right, as flash-attn does);
    out_i = sum_j softmax(s_i)_j v_j, lse_i = log sum_j exp(s[i, j]) (natural log, float32).
    A row that sees no key (causal with Tq > Tk) gives out = 0 and lse = -inf.
Cached decoding: query t of sequence b sits at position len_b - Tq + t and sees keys [0, that].

Kernel design:
  * ``_attention_fwd_kernel``: one program per (BLOCK_M queries, head). It streams BLOCK_N keys at a
    time through two ``tl.dot``s and an online softmax in the base-2 domain (log2(e) folded into the
    scale, so one exp2 per score). Key blocks come in two stages: blocks every query of the tile sees
    whole (no score mask), then the blocks on the causal diagonal or past Tk (masked); blocks past
    the diagonal are never visited. Row blocks run heaviest-first (causal load balance) and the row
    blocks of one head are consecutive programs (its K/V stay in L2).
  * Backward (FlashAttention-2): ``_attention_bwd_preprocess_kernel`` computes delta = rowsum(dO * O);
    ``_attention_bwd_dkdv_kernel`` owns BLOCK_N keys of one kv head and loops over the H/Hkv query
    heads that read it and over their query blocks, so dk/dv of grouped heads are summed in registers
    (no atomics); ``_attention_bwd_dq_kernel`` owns BLOCK_M queries and loops over key blocks. Both
    recompute P from the saved lse; no Tq x Tk matrix is ever stored. Deterministic.
  * Decoding: ``_attention_decode_kernel`` owns one kv head of one sequence, ALL the query rows
    (H/Hkv heads x Tq) that read it (padded to BLOCK_M rows, so the cache is read once per group), and
    one split of the cache length; a split writes its normalised partial output and lse (fp32) to a
    workspace and ``_attention_decode_combine_kernel`` merges them. The split count comes from B, Hkv
    and Tmax (never from the lengths' values: no host sync, CUDA-graph friendly); a split at or past
    a sequence's length exits after writing an empty partial. Loads are masked at len_b: nothing at
    or past a sequence's length is read. With one split the kernel writes the output directly.
  * Strides: every tensor is read through its strides (only the last dim must be unit stride; a
    tensor without that is copied), so (B, T, H, Dh) views of a fused qkv projection are read in place.
    Batch/head/block base offsets are int64 scalars (B*H*T*Dh may pass 2^31); offsets inside a tile
    stay int32.
  * Dh is a ``tl.constexpr`` (HEAD_DIM): masks on the head dim are static and vanish when Dh is a
    power of two; BLOCK_D = next power of two >= max(Dh, 16). One compile per head dim.
  * Precision: float16 / bfloat16 through ``tl.dot`` on tensor cores with fp32 accumulation (P and
    dS rounded to the input dtype for the second product, as FlashAttention does); float32 through
    ``input_precision="ieee"`` (exact fp32). Softmax statistics and accumulators are fp32.
    Under the interpreter (WIDEN) half tiles are widened to fp32 before ``tl.dot`` (the interpreter
    multiplies bf16's raw storage otherwise); the products of half values are exact in fp32, so the
    function is the one a GPU computes.

Configurations (``family``) are chosen from (dtype, Dh) per kernel; ``shipped_configs()`` lists the
ones ``tests/test_triton_sm90.py`` compiles for sm_90 and checks for register spills.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ... import _backend
from .._launch import device_guard, num_sms, unit_last

LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# Kernels. Signature order: pointers, sizes, strides, then UPPER_CASE constexprs.


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
    lo, hi, Tk, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    """Online softmax over the key blocks [lo, hi) (base-2 domain). MASK: mask keys >= Tk and, with
    CAUSAL, keys j > i + diag; without MASK every key of every block is visible to every row."""
    d_ok = (offs_d < HEAD_DIM)[None, :]
    k_ptrs = k_base + tl.cast(lo, tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + tl.cast(lo, tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < Tk)[:, None] & d_ok
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s * qk_scale
        if MASK:
            ok = (cols < Tk)[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= (rows + diag)[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead (exp2(-inf) = 0, no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        # P rounded to the input dtype (a no-op for fp32), as the tensor cores take it.
        acc = tl.dot(p.to(k_base.dtype.element_ty).to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    H, Hkv, Tq, Tk, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_mb = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_mb
    mb = n_mb - 1 - pid % n_mb  # heaviest (last, for causal) row blocks first
    b = bh // H
    h = bh % H
    hk = h // (H // Hkv)
    start_m = mb * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < Tq
    d_ok = offs_d < HEAD_DIM

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qt
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if WIDEN:  # interpreter only (see the module docstring)
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    diag = Tk - Tq  # query i sees keys j <= i + diag (causal)
    if CAUSAL:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + diag, Tk), 0)
        full_end = tl.maximum(tl.minimum(start_m + diag + 1, Tk), 0)  # keys every row of the tile sees
    else:
        hi = Tk
        full_end = Tk
    lo_mask = (full_end // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                                    0, lo_mask, Tk, diag, qk_scale,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, False, CAUSAL, PRECISION, WIDEN)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                                    lo_mask, hi, Tk, diag, qk_scale,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, True, CAUSAL, PRECISION, WIDEN)

    empty = l_i == 0.0  # saw no key: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_ot
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    H, Tq,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d] in fp32 (delta is a contiguous (B, H, Tq))."""
    n_mb = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_mb
    start_m = (pid % n_mb) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    mask = (rows < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_ot
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + start_m.to(tl.int64) * stride_dot + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
    offs_m, cols, offs_d, lo, hi, Tq, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    """Accumulate dk, dv of one key block over the query blocks [lo, hi) of one query head, in the
    transposed form (keys along rows). MASK: the causal mask; rows past Tq read q = dO = 0 and
    lse = +inf, so P = 0 there. Key columns past Tk only produce values in their own (unstored) rows."""
    d_ok = (offs_d < HEAD_DIM)[None, :]
    q_ptrs = q_base + tl.cast(lo, tl.int64) * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = do_base + tl.cast(lo, tl.int64) * stride_dot + offs_m[:, None] * stride_dot + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Tq
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            q = q.to(tl.float32)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        # A row that saw no key (lse = -inf) contributes nothing: +inf makes its P exactly 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        di = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.exp2(qkT * qk_scale - lse2[None, :])
        if MASK:
            pT = tl.where(cols[:, None] <= (rows + diag)[None, :], pT, 0.0)
        dv = tl.dot(pT.to(q_base.dtype.element_ty).to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - di[None, :])
        dk = tl.dot(dsT.to(q_base.dtype.element_ty).to(q.dtype), q, dk, input_precision=PRECISION)
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, Hkv, Tq, Tk, scale, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_nb = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    bhk = pid // n_nb
    nb = pid % n_nb
    if CAUSAL:
        nb = n_nb - 1 - nb  # first key blocks see the most queries: heaviest first
    b = bhk // Hkv
    hk = bhk % Hkv
    group = H // Hkv
    start_n = nb * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    kv_mask = (cols < Tk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + start_n.to(tl.int64) * stride_kt
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    if WIDEN:  # interpreter only (see the module docstring)
        k = k.to(tl.float32)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + start_n.to(tl.int64) * stride_vt
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    if WIDEN:  # interpreter only (see the module docstring)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    diag = Tk - Tq
    if CAUSAL:
        # Query i sees key j iff i >= j - diag. Rows below the block's first key see none of it; rows
        # from start_n + BLOCK_N - 1 - diag on see all of it (no mask).
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, lo)
        mid_hi = tl.minimum(mid, Tq)
    else:
        lo = 0
        mid = 0
        mid_hi = 0
    for g in range(0, group):
        h = hk * group + g
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        row_base = (b.to(tl.int64) * H + h) * Tq
        if CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr + row_base, delta_ptr + row_base,
                                          stride_qt, stride_dot, offs_m, cols, offs_d, lo, mid_hi, Tq, diag,
                                          qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, True, PRECISION, WIDEN)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr + row_base, delta_ptr + row_base,
                                      stride_qt, stride_dot, offs_m, cols, offs_d, mid, Tq, Tq, diag,
                                      qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, False, PRECISION, WIDEN)
    dk = dk * scale
    tl.store(dk_ptr + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + start_n.to(tl.int64) * stride_dkt
             + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + start_n.to(tl.int64) * stride_dvt
             + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, di, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
    lo, hi, Tk, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    d_ok = (offs_d < HEAD_DIM)[None, :]
    k_ptrs = k_base + tl.cast(lo, tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + tl.cast(lo, tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < Tk)[:, None] & d_ok
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            k = k.to(tl.float32)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            ok = (cols < Tk)[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= (rows + diag)[:, None])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - di[:, None])
        dq = tl.dot(ds.to(k_base.dtype.element_ty).to(k.dtype), k, dq, input_precision=PRECISION)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, Hkv, Tq, Tk, scale, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_mb = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_mb
    mb = n_mb - 1 - pid % n_mb
    b = bh // H
    h = bh % H
    hk = h // (H // Hkv)
    start_m = mb * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < Tq
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qt
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask, other=0.0)
    if WIDEN:  # interpreter only (see the module docstring)
        q = q.to(tl.float32)
    do = tl.load(do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + start_m.to(tl.int64) * stride_dot + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0)
    if WIDEN:  # interpreter only (see the module docstring)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    di = tl.load(delta_ptr + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    diag = Tk - Tq
    if CAUSAL:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + diag, Tk), 0)
        full_end = tl.maximum(tl.minimum(start_m + diag + 1, Tk), 0)
    else:
        hi = Tk
        full_end = Tk
    lo_mask = (full_end // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, di, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                            0, lo_mask, Tk, diag, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, False, CAUSAL,
                            PRECISION, WIDEN)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, di, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                            lo_mask, hi, Tk, diag, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, True, CAUSAL,
                            PRECISION, WIDEN)
    dq = dq * scale
    tl.store(dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + start_m.to(tl.int64) * stride_dqt
             + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, o_ptr, part_o_ptr, part_lse_ptr,
    B, H, Hkv, Tq, split_len, n_splits, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (sequence, kv head, block of its group's query rows, split of the cache). Row r of the
    group is query t = r % Tq of head hk * group + r // Tq. SPLIT: write an fp32 partial (normalised
    out, base-2 lse) to the workspace (n_splits, B, H, Tq, .); else the output directly."""
    group = H // Hkv
    n_rows = group * Tq
    n_rb = tl.cdiv(n_rows, BLOCK_M)
    pid = tl.program_id(0)
    s_id = pid % n_splits
    rest = pid // n_splits
    rb = rest % n_rb
    bhk = rest // n_rb
    b = bhk // Hkv
    hk = bhk % Hkv

    length = tl.load(seqlens_ptr + b).to(tl.int32)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    r = rb * BLOCK_M + offs_m
    row_ok = r < n_rows
    t = r % Tq
    h = hk * group + r // Tq
    pos = length - Tq + t  # the query's position: it sees keys [0, pos]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h.to(tl.int64) * stride_qh + t.to(tl.int64) * stride_qt)[:, None]
                + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
    if WIDEN:  # interpreter only (see the module docstring)
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = s_id * split_len
    end = tl.minimum(start + split_len, length)  # never read at or past the sequence's length
    k_ptrs = (k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + start.to(tl.int64) * stride_kt
              + offs_n[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + start.to(tl.int64) * stride_vt
              + offs_n[:, None] * stride_vt + offs_d[None, :])
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < end)[:, None] & d_ok
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            k = k.to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        sc = sc * qk_scale
        ok = (cols < end)[None, :] & (cols[None, :] <= pos[:, None])
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if WIDEN:  # interpreter only (see the module docstring)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(k_ptr.dtype.element_ty).to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        prow = ((s_id.to(tl.int64) * B + b) * H + h) * Tq + t  # (n_splits, B, H, Tq) row index
        tl.store(part_o_ptr + prow[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok)
        tl.store(part_lse_ptr + prow, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=row_ok)
    else:
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + (h.to(tl.int64) * stride_oh + t.to(tl.int64) * stride_ot)[:, None]
                 + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)


@triton.jit
def _attention_decode_combine_kernel(
    part_o_ptr, part_lse_ptr, o_ptr,
    n_rows, n_splits, H, Tq,
    stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[row] = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse): one program per query row."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    d_ok = offs_d < HEAD_DIM
    prow = offs_s.to(tl.int64) * n_rows + row
    lse = tl.load(part_lse_ptr + prow, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    o = tl.load(part_o_ptr + prow[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    t = row % Tq
    bh = row // Tq
    tl.store(o_ptr + (bh // H) * stride_ob + (bh % H) * stride_oh + t * stride_ot + offs_d,
             out.to(o_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------
# Configurations.


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def meta(self, head_dim: int) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": block_d(head_dim)}

    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


_HALF = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float32,) + _HALF
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
# "decode_wide": the decode kernel when a kv head's group of query rows (H/Hkv heads x Tq) passes 16.
KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "decode", "decode_wide")
_AUX_NUM_WARPS = 4


def _pre_block_m(bd: int) -> int:
    # preprocess: rows per program, so that each thread holds 32 elements of O and of dO.
    return max(16, min(64, 4096 // bd))


def block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(int(head_dim)))


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact FMAs (no TF32); half: the tensor cores ignore the flag.
    return "ieee"


def family(kernel: str, dtype: torch.dtype, head_dim: int) -> AttnConfig:
    """The configuration the launcher runs for (kernel, dtype, head dim).

    Chosen so that every one compiles for sm_90 without register spills (tests/test_triton_sm90.py
    prints the registers); the speed of the alternatives awaits an H100.
    """
    bd = block_d(head_dim)
    small, mid = bd <= 64, bd <= 128
    if dtype in _HALF:
        if kernel == "fwd":
            # wgmma over 2 warpgroups (64 rows each); 3 stages of K/V in flight.
            return AttnConfig(128, 64, 8, 3) if mid else AttnConfig(64, 32, 8, 2)
        if kernel == "bwd_dkdv":
            # k, v, dk, dv stay in registers for the whole loop. At Dh 128 every pipelined tile of 32 or
            # 64 query rows spilled (16-784 bytes); a single stage fit but left the loads synchronous.
            # 16 query rows x 128 keys, 3 stages: 236 registers, no spill, half the q/dO traffic of 64 keys.
            return (AttnConfig(32, 128, 8, 3) if small else AttnConfig(16, 128, 8, 3) if mid
                    else AttnConfig(16, 32, 8, 2))
        if kernel == "bwd_dq":
            return (AttnConfig(128, 64, 8, 2) if small else AttnConfig(64, 64, 8, 2) if mid
                    else AttnConfig(32, 32, 8, 2))
        if kernel == "decode":
            # 16 rows (the smallest tl.dot) hold a group's heads x Tq; memory bound: 64 keys a step.
            return AttnConfig(16, 64, 4, 2) if mid else AttnConfig(16, 32, 4, 2)
        if kernel == "decode_wide":
            # Many query rows per kv head (a prefill, or a wide group): 64 rows, still one cache read.
            return AttnConfig(64, 64, 4, 2) if mid else AttnConfig(64, 32, 8, 2)
    elif dtype == torch.float32:
        # Exact fp32 tl.dot lowers to FMAs, each thread holding its rows/columns over the whole
        # reduction: small tiles, one stage (two stages spilled hundreds of bytes at Dh 128).
        if kernel == "fwd":
            return AttnConfig(64, 32, 8, 1) if small else AttnConfig(32, 16, 8, 1) if mid else AttnConfig(16, 16, 8, 1)
        if kernel == "bwd_dkdv":
            return AttnConfig(32, 32, 8, 1) if small else AttnConfig(16, 32, 8, 1)
        if kernel == "bwd_dq":
            return AttnConfig(32, 32, 8, 1) if small else AttnConfig(16, 16, 8, 1)
        if kernel == "decode":
            return AttnConfig(16, 32, 4, 1) if mid else AttnConfig(16, 32, 8, 1)
        if kernel == "decode_wide":
            return AttnConfig(32, 32, 8, 1) if mid else AttnConfig(16, 32, 8, 1)
    raise ValueError(f"no attention config for kernel {kernel!r}, dtype {dtype}")


# (kernel, dtype, head dim, causal): what tests/test_triton_sm90.py compiles: every distinct config
# of ``family`` once, at the largest head dim that selects it (the most registers), the fast head
# dims (64, 128) in both half dtypes, and an odd head dim (masked head-dim loads).
SM90_CHECKS = (
    ("fwd", torch.bfloat16, 128, True),
    ("fwd", torch.float16, 64, False),
    ("fwd", torch.bfloat16, 256, True),
    ("fwd", torch.float32, 64, True),
    ("fwd", torch.float32, 128, False),
    ("fwd", torch.float32, 256, True),
    ("bwd_dkdv", torch.bfloat16, 128, True),
    ("bwd_dkdv", torch.float16, 64, True),
    ("bwd_dkdv", torch.float16, 256, True),
    ("bwd_dkdv", torch.float32, 64, True),
    ("bwd_dkdv", torch.float32, 256, True),
    ("bwd_dq", torch.bfloat16, 128, True),
    ("bwd_dq", torch.float16, 64, False),
    ("bwd_dq", torch.bfloat16, 256, True),
    ("bwd_dq", torch.float32, 64, True),
    ("bwd_dq", torch.float32, 256, True),
    ("decode", torch.bfloat16, 128, True),
    ("decode", torch.float16, 80, True),
    ("decode", torch.float16, 256, True),
    ("decode", torch.float32, 128, True),
    ("decode", torch.float32, 256, True),
    ("decode_wide", torch.bfloat16, 128, True),
    ("decode_wide", torch.float16, 256, True),
    ("decode_wide", torch.float32, 128, True),
)


def shipped_configs() -> list[tuple[str, torch.dtype, int, bool, AttnConfig]]:
    """(kernel, dtype, head dim, causal, config) for the sm_90 compile test."""
    return [(kern, dt, hd, causal, family(kern, dt, hd)) for kern, dt, hd, causal in SM90_CHECKS]


def aux_configs() -> list[tuple[str, torch.dtype, dict, int, int]]:
    """(kernel name, dtype, constexprs, num_warps, num_stages) of the helper kernels at their largest
    tiles (head dim 256; the combine at the most splits), for the sm_90 test."""
    bd = block_d(MAX_HEAD_DIM)
    return [
        ("_attention_bwd_preprocess_kernel", torch.bfloat16,
         {"HEAD_DIM": MAX_HEAD_DIM, "BLOCK_M": _pre_block_m(bd), "BLOCK_D": bd}, _AUX_NUM_WARPS, 1),
        ("_attention_bwd_preprocess_kernel", torch.float32,
         {"HEAD_DIM": 64, "BLOCK_M": _pre_block_m(64), "BLOCK_D": 64}, _AUX_NUM_WARPS, 1),
        ("_attention_decode_combine_kernel", torch.bfloat16,
         {"HEAD_DIM": MAX_HEAD_DIM, "BLOCK_S": _MAX_SPLITS, "BLOCK_D": bd}, _AUX_NUM_WARPS, 1),
    ]


# ---------------------------------------------------------------------------------------------
# Launchers.

_INTERP_SMS = 4  # pretend SM count under the interpreter, so small inputs exercise the split path
_MAX_SPLITS = 64
_MIN_BLOCKS_PER_SPLIT = 2


# Under the interpreter the cost is per program and per loop step, not per element, and registers do
# not exist: the forward and backward run 64 x 64 tiles there (2-4x faster than the fp32 GPU tiles at
# T = 1000). The kernels' logic does not depend on the block sizes; tests/test_attention_triton.py
# runs the shipped GPU tiles and smaller ones explicitly.
_INTERP_CONFIG = AttnConfig(64, 64, 4, 1)


def _pick(kernel: str, dtype: torch.dtype, head_dim: int) -> AttnConfig:
    if _backend.triton_interpreter() and kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        return _INTERP_CONFIG
    return family(kernel, dtype, head_dim)


def _check_common(name_q: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name="k", v_name="v"):
    for n, t in ((name_q, q), (k_name, k), (v_name, v)):
        if t.dim() != 4:
            raise ValueError(f"{n} must be 4-D (B, heads, T, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{n} must be float32/float16/bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name_q}, {k_name}, {v_name} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name_q}, {k_name}, {v_name} must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, _, Dh = q.shape
    if k.shape[0] != B or k.shape[3] != Dh:
        raise ValueError(f"{k_name} must be (B={B}, Hkv, T, Dh={Dh}), got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"the query heads H={H} must be a multiple of the kv heads Hkv={Hkv}")
    if not MIN_HEAD_DIM <= Dh <= MAX_HEAD_DIM:
        raise ValueError(f"head dim Dh must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {Dh}")


def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                         *, config: AttnConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Tq, Dh), k, v (B, Hkv, Tk, Dh) -> (out (B, H, Tq, Dh) in q's dtype, lse fp32 (B, H, Tq)).

    ``config`` overrides the launcher's block sizes (tests and benchmarks only).
    """
    _check_common("q", q, k, v)
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    B, H, Tq, Dh = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = _backend.new_output((B, H, Tq, Dh), q.dtype, q.device)
    lse = _backend.new_output((B, H, Tq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    cfg = config or _pick("fwd", q.dtype, Dh)
    grid = (B * H * triton.cdiv(Tq, cfg.block_m),)
    with device_guard(q.device):
        _attention_fwd_kernel[grid](
            q, k, v, out, lse,
            H, Hkv, Tq, Tk, float(scale) * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=Dh, CAUSAL=bool(causal), PRECISION=_precision(q.dtype),
            WIDEN=_backend.triton_interpreter() and q.dtype in _HALF, **cfg.meta(Dh), **cfg.options())
    return out, lse


def attention_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                         *, config_dkdv: AttnConfig | None = None, config_dq: AttnConfig | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward: (dq like q, dk and dv like k) from dO, the inputs, out and lse."""
    _check_common("q", q, k, v)
    B, H, Tq, Dh = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    for n, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape:
            raise ValueError(f"{n} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{n} must be on q's device {q.device}, got {t.device}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{n} must be float32/float16/bfloat16, got {t.dtype}")
    if lse.shape != (B, H, Tq) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 (B, H, Tq) = {(B, H, Tq)} on {q.device}, got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    # dO must share q's dtype for the half dots (autograd may hand it in another dtype).
    grad_out = unit_last(grad_out.to(q.dtype))
    out = unit_last(out)
    lse = lse.contiguous()
    dq = _backend.new_output((B, H, Tq, Dh), q.dtype, q.device)
    dk = _backend.new_output((B, Hkv, Tk, Dh), k.dtype, k.device)
    dv = _backend.new_output((B, Hkv, Tk, Dh), v.dtype, v.device)
    if dk.numel() and not dq.numel():
        dk.zero_()
        dv.zero_()
    if dq.numel() and not dk.numel():
        dq.zero_()
    if not dq.numel() or not dk.numel():
        return dq, dk, dv
    prec = _precision(q.dtype)
    widen = _backend.triton_interpreter() and q.dtype in _HALF
    bd = block_d(Dh)
    c_kv = config_dkdv or _pick("bwd_dkdv", q.dtype, Dh)
    c_q = config_dq or _pick("bwd_dq", q.dtype, Dh)
    qk_scale = float(scale) * LOG2E
    with device_guard(q.device):
        delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
        pre_m = _pre_block_m(bd)
        _attention_bwd_preprocess_kernel[(B * H * triton.cdiv(Tq, pre_m),)](
            out, grad_out, delta, H, Tq,
            out.stride(0), out.stride(1), out.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            HEAD_DIM=Dh, BLOCK_M=pre_m, BLOCK_D=bd, num_warps=_AUX_NUM_WARPS, num_stages=1)
        _attention_bwd_dkdv_kernel[(B * Hkv * triton.cdiv(Tk, c_kv.block_n),)](
            q, k, v, grad_out, lse, delta, dk, dv,
            H, Hkv, Tq, Tk, float(scale), qk_scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            HEAD_DIM=Dh, CAUSAL=bool(causal), PRECISION=prec, WIDEN=widen, **c_kv.meta(Dh), **c_kv.options())
        _attention_bwd_dq_kernel[(B * H * triton.cdiv(Tq, c_q.block_m),)](
            q, k, v, grad_out, lse, delta, dq,
            H, Hkv, Tq, Tk, float(scale), qk_scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            HEAD_DIM=Dh, CAUSAL=bool(causal), PRECISION=prec, WIDEN=widen, **c_q.meta(Dh), **c_q.options())
    return dq, dk, dv


def decode_num_splits(batch_heads: int, row_blocks: int, t_max: int, block_n: int, num_sms: int) -> int:
    """Splits of the cache length: enough programs to fill the SMs about twice, each split at least
    _MIN_BLOCKS_PER_SPLIT key blocks long. From Tmax, not the lengths (no host sync)."""
    programs = batch_heads * row_blocks
    if programs >= num_sms:
        return 1
    want = triton.cdiv(2 * num_sms, programs)
    most = max(1, triton.cdiv(t_max, _MIN_BLOCKS_PER_SPLIT * block_n))
    return max(1, min(want, most, _MAX_SPLITS))


def attention_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, scale: float,
                            *, config: AttnConfig | None = None, num_splits: int | None = None) -> torch.Tensor:
    """q (B, H, Tq, Dh) the last Tq positions of each sequence; caches (B, Hkv, Tmax, Dh);
    cache_seqlens int32 (B,) with Tq <= len_b <= Tmax (checked by the op layer: checking here would
    synchronise the GPU). Returns out (B, H, Tq, Dh) in q's dtype."""
    _check_common("q", q, k_cache, v_cache, "k_cache", "v_cache")
    B, H, Tq, Dh = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be int32 of shape ({B},), got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    if Tq > Tmax:
        raise ValueError(f"q has Tq={Tq} queries, more than the cache holds (Tmax={Tmax})")
    q, k_cache, v_cache = unit_last(q), unit_last(k_cache), unit_last(v_cache)
    seqlens = cache_seqlens.contiguous()
    out = _backend.new_output((B, H, Tq, Dh), q.dtype, q.device)
    if out.numel() == 0:
        return out
    n_rows = (H // Hkv) * Tq
    cfg = config or _pick("decode" if n_rows <= 16 else "decode_wide", q.dtype, Dh)
    row_blocks = triton.cdiv(n_rows, cfg.block_m)
    if num_splits is None:
        dev = q.device
        sms = _INTERP_SMS if (_backend.triton_interpreter() or dev.type != "cuda") else num_sms(
            dev.index if dev.index is not None else torch.cuda.current_device())
        num_splits = decode_num_splits(B * Hkv, row_blocks, Tmax, cfg.block_n, sms)
    num_splits = min(int(num_splits), _MAX_SPLITS)  # the combine kernel is compiled up to this many
    split_len = triton.cdiv(triton.cdiv(max(Tmax, 1), max(num_splits, 1)), cfg.block_n) * cfg.block_n
    num_splits = max(1, triton.cdiv(Tmax, split_len))  # no split that starts past Tmax
    use_split = num_splits > 1
    bd = block_d(Dh)
    with device_guard(q.device):
        if use_split:
            part_o = torch.empty((num_splits, B, H, Tq, bd), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((num_splits, B, H, Tq), dtype=torch.float32, device=q.device)
        else:
            part_o = part_lse = out  # never touched
        _attention_decode_kernel[(B * Hkv * row_blocks * num_splits,)](
            q, k_cache, v_cache, seqlens, out, part_o, part_lse,
            B, H, Hkv, Tq, split_len, num_splits, float(scale) * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=Dh, SPLIT=use_split, PRECISION=_precision(q.dtype),
            WIDEN=_backend.triton_interpreter() and q.dtype in _HALF, **cfg.meta(Dh), **cfg.options())
        if use_split:
            _attention_decode_combine_kernel[(B * H * Tq,)](
                part_o, part_lse, out, B * H * Tq, num_splits, H, Tq,
                out.stride(0), out.stride(1), out.stride(2),
                HEAD_DIM=Dh, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=bd,
                num_warps=_AUX_NUM_WARPS, num_stages=1)
    return out
