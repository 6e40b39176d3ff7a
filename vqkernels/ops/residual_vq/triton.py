"""residual_vq in Triton: all Q stages of a block of rows in one program, the residual in registers.

Function: reference.py (the spec). Kernel design (``_residual_vq_fwd_kernel``):
  * A program owns BLOCK_N rows. Their residual (BLOCK_N, BLOCK_D) and the running sum of the chosen
    codes stay in registers for all Q stages: x is read once, quantized and the indices written once.
  * Per stage, the codebook streams through in (BLOCK_K, BLOCK_D) tiles: ``tl.dot`` (fp32,
    ``input_precision="ieee"``: exact fp32 products, as the reference) gives (BLOCK_N, BLOCK_K) dot
    products, turned into scores ||c||^2 - 2 <r, c> (NaN and codes past K to +inf), reduced to the tile's
    (min, lowest argmin) per row and merged into a running (best, index) with a strict ``<`` (an earlier
    tile keeps its lower index). Never an N x K buffer.
  * The chosen codes are gathered (one row of the codebook per row), subtracted from the residual and
    added to the output; each row's squared error is summed per program into ``err_part`` (nprog, Q)
    (summed in float64 by the launcher: deterministic); with stats, counts and sums go out by atomic adds.
  * ||c||^2 comes from ``_residual_vq_cnorm_kernel`` once per call.
  * D is a constexpr padded to BLOCK_D (a power of two, at most MAX_D): one compile per code dimension.
  * Offsets of rows and codes are int64 (N*D and Q*K*D may pass 2^31).
Backward (``_residual_vq_bwd_kernel``): the same row blocks, the residual rebuilt stage by stage from the
indices in registers, the gradient (straight-through or rotation trick, plus the squared errors') summed
in registers and written once.
``shipped_configs()`` lists what the launchers compile; tests/test_residual_vq_sm90.py compiles them for sm_90.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _backend

MAX_D = 512  # the residual of BLOCK_N rows lives in registers
# (BLOCK_N, BLOCK_K, num_warps) per BLOCK_D: the residual, the running code sum and a code tile all sit in
# registers, so wider rows get fewer rows and codes per tile and more warps (no spills at sm_90: the sm_90 test)
CONFIGS = {16: (32, 64, 4), 32: (32, 64, 4), 64: (32, 32, 4), 128: (32, 32, 8), 256: (16, 16, 8), 512: (16, 16, 8)}
_AUX_BLOCK_R = 64


@triton.jit
def _residual_vq_cnorm_kernel(c_ptr, out_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i] = ||c_i||^2 (fp32) for the R = Q*K rows of the codebooks."""
    r0 = tl.program_id(0) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_r < R)[:, None] & (offs_d < D)[None, :]
    v = tl.load(c_ptr + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :], mask=m, other=0.0)
    tl.store(out_ptr + offs_r, tl.sum(v * v, axis=1), mask=offs_r < R)


@triton.jit
def _residual_vq_fwd_kernel(
    x_ptr, c_ptr, cn_ptr, idx_ptr, q_ptr, err_ptr, counts_ptr, sums_ptr,
    N, Q, K,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    NEED_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = offs_n.to(tl.int64)
    m2 = n_mask[:, None] & d_mask[None, :]
    r = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)  # (BLOCK_N, BLOCK_D)
    quant = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for q in range(0, Q):
        cq = c_ptr + (q * K).to(tl.int64) * D
        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_i = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            c = tl.load(cq + ks.to(tl.int64)[:, None] * D + offs_d[None, :],
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
            dots = tl.dot(r, tl.trans(c), input_precision="ieee")  # (BLOCK_N, BLOCK_K)
            cn = tl.load(cn_ptr + q * K + ks, mask=k_mask, other=0.0)
            s = cn[None, :] - 2.0 * dots
            s = tl.where(k_mask[None, :] & (s == s), s, float("inf"))
            m = tl.min(s, axis=1)
            a = tl.min(tl.where(s == m[:, None], ks[None, :], 2147483647), axis=1)
            upd = m < best  # strict: an earlier tile keeps its lower index; an all-inf tile changes nothing
            best = tl.where(upd, m, best)
            best_i = tl.where(upd, a, best_i)
        tl.store(idx_ptr + rows * Q + q, best_i.to(tl.int64), mask=n_mask)
        code = tl.load(cq + best_i.to(tl.int64)[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        diff = r - code
        e = tl.sum(tl.where(m2, diff * diff, 0.0), axis=1)
        tl.store(err_ptr + pid * Q + q, tl.sum(e, axis=0))
        if NEED_STATS:
            slot = (q * K).to(tl.int64) + best_i.to(tl.int64)
            tl.atomic_add(counts_ptr + slot, tl.full((BLOCK_N,), 1.0, dtype=tl.float32), mask=n_mask)
            tl.atomic_add(sums_ptr + slot[:, None] * D + offs_d[None, :], r, mask=m2)
        quant = quant + code
        r = diff
    tl.store(q_ptr + rows[:, None] * D + offs_d[None, :], quant, mask=m2)


@triton.jit
def _residual_vq_bwd_kernel(
    g_ptr, ge_ptr, x_ptr, c_ptr, idx_ptr, out_ptr,
    N, Q, K,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROTATION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64)
    m2 = n_mask[:, None] & (offs_d < D)[None, :]
    r = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
    g = tl.load(g_ptr + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for q in range(0, Q):
        k = tl.load(idx_ptr + rows * Q + q, mask=n_mask, other=0)
        c = tl.load(c_ptr + ((q * K).to(tl.int64) + k)[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        two_ge = 2.0 * tl.load(ge_ptr + q)
        diff = r - c
        if ROTATION:
            # vector-quantize-pytorch's rotate_to at fixed (r, c): J^T g = s (g - 2 <g, w> w + 2 <g, qh> u)
            nr = tl.maximum(tl.sqrt(tl.sum(r * r, axis=1)), 1e-6)
            nc_raw = tl.sqrt(tl.sum(c * c, axis=1))
            nc = tl.maximum(nc_raw, 1e-6)
            u = r / nr[:, None]
            qh = c / nc[:, None]
            w = u + qh
            w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), 1e-6)[:, None]
            gw = tl.sum(g * w, axis=1)
            gq = tl.sum(g * qh, axis=1)
            s = nc_raw / nr
            acc += s[:, None] * (g - 2.0 * gw[:, None] * w + 2.0 * gq[:, None] * u) + two_ge * diff
        else:
            acc += g + two_ge * diff
        r = diff
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=m2)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def shipped_configs() -> list[dict]:
    """The (kernel, constexprs) the launchers compile for each supported code dimension bucket (sm_90 tests)."""
    out = []
    for bd, (bn, bk, warps) in CONFIGS.items():
        out.append(dict(kernel="fwd", BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps))
        out.append(dict(kernel="bwd", BLOCK_N=bn, BLOCK_D=bd, num_warps=warps))
    return out


def _check(x, cbs):
    if x.dim() != 2 or cbs.dim() != 3 or x.shape[1] != cbs.shape[2]:
        raise ValueError(f"x (N, D) and codebooks (Q, K, D) expected, got {tuple(x.shape)} and {tuple(cbs.shape)}")
    if x.dtype != torch.float32 or cbs.dtype != torch.float32:
        raise TypeError(f"x and codebooks must be float32, got {x.dtype} and {cbs.dtype}")
    if not (x.is_contiguous() and cbs.is_contiguous()):
        raise ValueError("x and codebooks must be contiguous")
    if x.shape[1] > MAX_D:
        raise ValueError(f"the triton residual_vq kernel takes D <= {MAX_D}, got {x.shape[1]}")


def residual_vq_fwd_triton(x: torch.Tensor, cbs: torch.Tensor, need_stats: bool):
    """x (N, D), codebooks (Q, K, D) float32 contiguous -> (indices, quantized, sq_err, counts, sums)."""
    _check(x, cbs)
    N, D = x.shape
    Q, K, _ = cbs.shape
    dev = x.device
    idx = _backend.new_output((N, Q), torch.int64, dev)
    quant = _backend.new_output((N, D), torch.float32, dev)
    counts = torch.zeros((Q, K) if need_stats else (0,), dtype=torch.float32, device=dev)
    sums = torch.zeros((Q, K, D) if need_stats else (0,), dtype=torch.float32, device=dev)
    if N == 0:
        return idx, quant, torch.zeros(Q, dtype=torch.float32, device=dev), counts, sums
    bd = _block_d(D)
    bn, bk, warps = CONFIGS[bd]
    cn = torch.empty(Q * K, dtype=torch.float32, device=dev)
    nprog = triton.cdiv(N, bn)
    err_part = torch.empty((nprog, Q), dtype=torch.float32, device=dev)
    with (torch.cuda.device(dev) if dev.type == "cuda" else _null()):
        _residual_vq_cnorm_kernel[(triton.cdiv(Q * K, _AUX_BLOCK_R),)](cbs, cn, Q * K, D, BLOCK_R=_AUX_BLOCK_R,
                                                                      BLOCK_D=bd)
        _residual_vq_fwd_kernel[(nprog,)](
            x, cbs, cn, idx, quant, err_part, counts, sums, N, Q, K,
            D=D, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, NEED_STATS=bool(need_stats), num_warps=warps)
    err = err_part.double().sum(0).to(torch.float32)
    return idx, quant, err, counts, sums


def residual_vq_bwd_triton(g, ge, x, cbs, idx, rotation: bool):
    _check(x, cbs)
    N, D = x.shape
    Q, K, _ = cbs.shape
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= K):
        raise IndexError(f"residual_vq backward: indices must lie in [0, {K})")
    out = _backend.new_output((N, D), torch.float32, x.device)
    if N == 0:
        return out
    bd = _block_d(D)
    bn, _, warps = CONFIGS[bd]
    with (torch.cuda.device(x.device) if x.device.type == "cuda" else _null()):
        _residual_vq_bwd_kernel[(triton.cdiv(N, bn),)](
            g, ge, x, cbs, idx, out, N, Q, K, D=D, BLOCK_N=bn, BLOCK_D=bd, ROTATION=bool(rotation), num_warps=warps)
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
