"""Attention in pure PyTorch: the spec, the fallback on any device and the test oracle.

Function computed (for every backend), with q (B, H, Tq, Dh), k and v (B, Hkv, Tk, Dh), G = H / Hkv and
query head h reading kv head h // G (grouped / multi-query attention):

    s[i, j]   = scale * <q[h, i], k[h // G, j]>          masked to -inf where causal and j > i + Tk - Tq
    lse[i]    = log sum_j exp(s[i, j])                   (natural log; -inf for a row that sees no key)
    out[i]    = sum_j exp(s[i, j] - lse[i]) v[h // G, j]   (0 for a row that sees no key)

The causal mask is aligned to the bottom right (flash-attn's convention): the last query sees every key.
Backward (flash-attention style, recomputing the probabilities from lse):

    p = exp(s - lse),  dv = sum_h p^T dout,  dp = dout v^T,  delta = rowsum(dout * out),
    ds = p (dp - delta),  dq = scale ds k,  dk = scale sum_h ds^T q

with dk, dv summed over the G query heads of each kv head. A row that sees no key has p = 0, so its dq is 0
and it adds nothing to dk, dv.

Arithmetic in float32 (float64 for float64 inputs). Memory stays bounded: queries are processed in chunks
whose score tile holds at most ``MAX_TILE_ELEMS`` elements, never a full Tq x Tk matrix for large T.
"""
from __future__ import annotations

import torch

from ..._backend import new_output

MAX_TILE_ELEMS = 1 << 22  # 4M scores = 16 MB of float32 per chunk


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(B: int, H: int, Tq: int, Tk: int, max_tile_elems: int) -> int:
    return max(1, min(Tq, max_tile_elems // max(1, B * H * Tk)))


def _grouped(t: torch.Tensor, Hkv: int, t0: int, t1: int) -> torch.Tensor:
    """Rows [t0, t1) of t (B, H, T, D) as (B, Hkv, G * (t1 - t0), D): the G heads sharing a kv head stacked."""
    B, H, _, D = t.shape
    return t[:, :, t0:t1].reshape(B, Hkv, H // Hkv * (t1 - t0), D)


def _masked_scores(qc, k, scale, causal, t0, t1, Tq, Tk, G):
    """Scores of query rows [t0, t1) (grouped: (B, Hkv, G * c, Tk)) with the causal mask applied."""
    s = torch.matmul(qc, k.transpose(-1, -2)).mul_(scale)
    if causal:
        i = torch.arange(t0, t1, device=s.device).repeat(G)  # query index of each grouped row
        j = torch.arange(Tk, device=s.device)
        mask = j[None, :] > (i[:, None] + (Tk - Tq))
        s.masked_fill_(mask, float("-inf"))
    return s


def attention_fwd_reference(q, k, v, causal: bool, scale: float,
                            max_tile_elems: int = MAX_TILE_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, H, Tq, Dh) in q's dtype, lse (B, H, Tq) float32; float64 for float64 inputs)."""
    B, H, Tq, Dh = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    cdt = compute_dtype(q.dtype)
    kf, vf = k.to(cdt), v.to(cdt)
    out = new_output((B, H, Tq, Dh), q.dtype, q.device)
    lse = new_output((B, H, Tq), cdt, q.device)
    step = _chunk_rows(B, H, Tq, Tk, max_tile_elems)
    for t0 in range(0, Tq, step):
        t1 = min(Tq, t0 + step)
        c = t1 - t0
        qc = _grouped(q, Hkv, t0, t1).to(cdt)
        s = _masked_scores(qc, kf, scale, causal, t0, t1, Tq, Tk, G)  # (B, Hkv, G*c, Tk)
        l = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf for a row that sees no key
        p = torch.exp(s - torch.where(torch.isinf(l), torch.zeros_like(l), l))  # those rows: exp(-inf) = 0
        o = torch.matmul(p, vf)  # (B, Hkv, G*c, Dh)
        out[:, :, t0:t1] = o.view(B, H, c, Dh).to(q.dtype)
        lse[:, :, t0:t1] = l.view(B, H, c)
    return out, lse.float() if cdt == torch.float32 else lse


def attention_bwd_reference(grad_out, q, k, v, out, lse, causal: bool, scale: float,
                            max_tile_elems: int = MAX_TILE_ELEMS):
    """-> (dq like q, dk like k, dv like v), contiguous, in the inputs' dtype; dk/dv summed over grouped heads."""
    B, H, Tq, Dh = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    cdt = compute_dtype(q.dtype)
    kf, vf = k.to(cdt), v.to(cdt)
    dq = new_output((B, H, Tq, Dh), q.dtype, q.device)
    dk = torch.zeros((B, Hkv, Tk, Dh), dtype=cdt, device=q.device)
    dv = torch.zeros((B, Hkv, Tk, Dh), dtype=cdt, device=q.device)
    step = _chunk_rows(B, H, Tq, Tk, max_tile_elems)
    for t0 in range(0, Tq, step):
        t1 = min(Tq, t0 + step)
        c = t1 - t0
        qc = _grouped(q, Hkv, t0, t1).to(cdt)
        doc = _grouped(grad_out, Hkv, t0, t1).to(cdt)
        oc = _grouped(out, Hkv, t0, t1).to(cdt)
        l = lse[:, :, t0:t1].reshape(B, Hkv, G * c, 1).to(cdt)
        s = _masked_scores(qc, kf, scale, causal, t0, t1, Tq, Tk, G)
        p = torch.exp(s - torch.where(torch.isinf(l), torch.zeros_like(l), l))
        dv += torch.matmul(p.transpose(-1, -2), doc)  # the G heads of a kv head sum in the matmul
        dp = torch.matmul(doc, vf.transpose(-1, -2))
        delta = (doc * oc).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[:, :, t0:t1] = (torch.matmul(ds, kf) * scale).view(B, H, c, Dh).to(q.dtype)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def attention_decode_reference(q, k_cache, v_cache, cache_seqlens, scale: float) -> torch.Tensor:
    """Cached decoding: sequence b's queries are the last Tq positions of its first cache_seqlens[b] entries.

    Reads only cache positions [0, len_b) (a NaN past them cannot reach the output): the forward above, causal,
    on each sequence's slice of the cache. One host read of cache_seqlens.
    """
    B, H, Tq, Dh = q.shape
    out = new_output((B, H, Tq, Dh), q.dtype, q.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        o, _ = attention_fwd_reference(q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n], True, scale)
        out[b:b + 1] = o
    return out
