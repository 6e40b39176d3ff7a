"""The ``sdpa`` backend of attention: PyTorch's own ``scaled_dot_product_attention`` made to compute our function.

On CUDA tensors it is what ``auto`` falls back to when our CUDA and Triton kernels cannot run or failed their
self-check (see vqkernels/_backend.py): PyTorch picks its flash, cuDNN or memory-efficient kernel (or the math
one), and PyTorch's autograd gives the backward. What SDPA does not do by itself, done here:

- causal with Tq > Tk (bottom-right aligned): rows [0, Tq - Tk) see no key and output 0 (their gradient is 0);
  the remaining rows are a square causal problem, where SDPA's top-left alignment is ours;
- causal with Tq < Tk: ``torch.nn.attention.bias.causal_lower_right`` (flash / memory-efficient kernels take it
  natively; under torch.compile, which cannot trace that subclass, an explicit boolean mask);
- grouped heads: ``enable_gqa=True`` (k, v are not expanded where the kernel takes groups);
- decoding over a cache: the grouped query heads of a kv head folded into one longer query block, and a boolean
  mask (B, 1, G * Tq, Tmax) of what each query sees (query t of sequence b: [0, len_b - Tq + t]), built on the
  device from cache_seqlens (no host sync, so a decoding step can be graph-captured). The cache past each
  sequence's length is zeroed in a copy first: a masked score still multiplies its value (0 * NaN = NaN), and our
  function never reads there. That copy costs one pass over the cache, on top of SDPA's own.

Runs on any device SDPA runs on (the CPU too, which is how the tests check it without a GPU); ``auto`` chooses it
on CUDA tensors only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """q (B, H, Tq, Dh), k, v (B, Hkv, Tk, Dh) -> out (B, H, Tq, Dh); differentiable through PyTorch's autograd."""
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    gqa = H != k.shape[1]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if Tq >= Tk:
        r0 = Tq - Tk  # rows that see no key
        out = F.scaled_dot_product_attention(q[:, :, r0:], k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if r0:
            out = torch.cat((out.new_zeros(B, H, r0, Dh), out), dim=2)
        return out
    if torch.compiler.is_compiling():
        # (Dynamo cannot build the CausalBias subclass in a graph: a boolean mask, which the memory-efficient
        # and cuDNN kernels take)
        i = torch.arange(Tq, device=q.device)[:, None]
        mask = torch.arange(Tk, device=q.device)[None, :] <= i + (Tk - Tq)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attention_decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cache_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, Tq, Dh), k_cache, v_cache (B, Hkv, Tmax, Dh), cache_seqlens int32 (B,) -> out (B, H, Tq, Dh)."""
    B, H, Tq, Dh = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    lens = cache_seqlens.to(torch.int64)
    pos = torch.arange(Tmax, device=q.device)
    valid = (pos[None, :] < lens[:, None])[:, None, :, None]  # (B, 1, Tmax, 1)
    k = torch.where(valid, k_cache, 0)
    v = torch.where(valid, v_cache, 0)
    # query head h = kv * G + g: (B, Hkv, G * Tq, Dh), row g * Tq + t
    qg = q.reshape(B, Hkv, G * Tq, Dh)
    t = torch.arange(Tq, device=q.device).repeat(G)  # (G * Tq,)
    last = lens[:, None] - Tq + t[None, :]  # (B, G * Tq): the last position each query sees
    mask = pos[None, None, :] <= last[:, :, None]  # (B, G * Tq, Tmax)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None], scale=scale)
    return out.reshape(B, H, Tq, Dh)
