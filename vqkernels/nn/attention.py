"""Causal self-attention over the vqkernels attention ops, and the KV cache its generation writes into.

- :class:`CausalSelfAttention`: minGPT's module (parameters ``key``, ``query``, ``value``, ``proj``), so a
  taming-transformers / minGPT checkpoint loads into it; in training the three input projections are three
  GEMMs (no weight or gradient concatenation per step), in generation one on weights concatenated and packed
  once (:func:`inference_weights`); attention is :func:`vqkernels.ops.attention.causal_attention`
  (training, prefill) or :func:`~vqkernels.ops.attention.attention_with_kv_cache` (decoding).
- :class:`RotaryCausalSelfAttention`: LlamaGen's (LLaMA's) attention: one fused bias-free ``wqkv``, ``wo``, grouped
  heads, rotary positions on q and k (:mod:`vqkernels.nn.rope`); the same ops and KV cache.
- :class:`KVCache`: preallocated keys/values (B, Hkv, Tmax, Dh) and the int32 length of each sequence;
  ``append`` writes the new positions (the attention op itself only reads the cache).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import attention, attention_with_kv_cache, causal_attention
from ..ops.linear import PackedLinear
from .rope import apply_rope

__all__ = ["CausalSelfAttention", "RotaryCausalSelfAttention", "KVCache", "Linear", "inference_weights"]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state_dict and forward) that, inside :func:`inference_weights`,
    multiplies through a :class:`~vqkernels.ops.linear.PackedLinear` built once from its weight (on the CPU
    in float32: the weight packed for the few-row kernel of a decoding step)."""

    _packed: PackedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return F.linear(x, self.weight, self.bias)
        return self._packed(x)


@contextlib.contextmanager
def inference_weights(module: nn.Module):
    """Inference only (no gradient reaches the copies): within this context every :class:`Linear` and
    :class:`CausalSelfAttention` under ``module`` multiplies through weights prepared once
    (:class:`~vqkernels.ops.linear.PackedLinear`; the attention's q, k, v projections concatenated), instead
    of rebuilding or repacking them on every call. Costs one copy of those weights while it lasts (on the CPU
    in float32; elsewhere only the concatenated q, k, v); they are dropped on exit. The weights must not change
    inside the context: the copies would not see it."""
    stack = contextlib.ExitStack()
    with stack:
        for m in module.modules():
            if isinstance(m, CausalSelfAttention):
                stack.enter_context(m.fused_qkv())
            elif isinstance(m, Linear):
                stack.enter_context(_linear_prepared(m))
        yield


@contextlib.contextmanager
def _linear_prepared(m: Linear):
    m._packed = PackedLinear(m.weight, m.bias)
    try:
        yield
    finally:
        m._packed = None


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer, preallocated once.

    ``k``, ``v``: (B, Hkv, Tmax, Dh); ``seqlens``: int32 (B,) on the cache's device, the valid length of each
    sequence. Positions at or past a sequence's length hold whatever was there before (zeros in a new cache)
    and are never read by :func:`~vqkernels.ops.attention.attention_with_kv_cache`.

    ``append(k_new, v_new)`` (each (B, Hkv, T, Dh)) writes sequence b's new keys at [len_b, len_b + T) and
    nowhere else, then advances every length by T. The lengths are mirrored on the host, so the bound check
    costs no device sync; when every sequence has the same length (the usual case) the write is a slice copy.
    """

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, val in (("batch", batch), ("n_kv_head", n_kv_head), ("max_len", max_len), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {val!r}")
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, Hkv, Tmax, Dh)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (B, Hkv, Tmax, Dh)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.k.device)  # (B,)
        self._lens = [0] * batch  # host mirror of seqlens
        self._pos: torch.Tensor | None = None  # device-position mode (see at_position)

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def lengths(self) -> list[int]:
        """The valid length of each sequence (host copy, no sync)."""
        return list(self._lens)

    def is_empty(self) -> bool:
        return not any(self._lens)

    def reset(self, lengths=None) -> None:
        """Forget the cached positions: every length back to 0, or to ``lengths`` (B ints, e.g. prompts of
        different lengths already written by the caller). The buffers are reused, not reallocated or cleared."""
        if lengths is None:
            lens = [0] * self.batch
        else:
            lens = [int(n) for n in lengths]
            if len(lens) != self.batch or any(n < 0 or n > self.max_len for n in lens):
                raise ValueError(f"KVCache.reset: lengths must be {self.batch} ints in [0, max_len = {self.max_len}], "
                                 f"got {list(lengths)}")
        self._lens = lens
        self.seqlens.copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)

    @contextlib.contextmanager
    def at_position(self, pos: torch.Tensor, length: int):
        """Device-position mode, for a decoding step replayed as a CUDA graph: within this context ``append``
        takes one position per call and writes it at ``pos`` (an int64 (1,) tensor on the cache's device that
        the caller advances between calls: no host value enters the step), and sets every length to pos + 1.
        Every sequence must have the same length, ``length``, on entry. The host mirror (:attr:`lengths`) stays at
        ``length`` inside the context; the caller sets the final lengths with :meth:`reset` after it."""
        if pos.dtype != torch.int64 or tuple(pos.shape) != (1,) or pos.device != self.k.device:
            raise ValueError(f"KVCache.at_position: pos must be an int64 (1,) tensor on {self.k.device}, got "
                             f"{pos.dtype} {tuple(pos.shape)} on {pos.device}")
        if any(n != length for n in self._lens):
            raise ValueError(f"KVCache.at_position: every sequence must have length {length}, got {self._lens}")
        self._pos = pos
        try:
            yield self
        finally:
            self._pos = None

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write k_new, v_new (B, Hkv, T, Dh) at positions [len_b, len_b + T) of each sequence b; lengths += T."""
        B, Hkv, Tmax, Dh = self.k.shape
        if self._pos is not None:  # device-position mode: one position, at pos, every length = pos + 1
            if k_new.shape != (B, Hkv, 1, Dh) or v_new.shape != (B, Hkv, 1, Dh):
                raise ValueError(f"KVCache.append: at a device position k_new and v_new must be (B, Hkv, 1, Dh) = "
                                 f"({B}, {Hkv}, 1, {Dh}), got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
            self.k.index_copy_(2, self._pos, k_new.to(self.k.dtype))
            self.v.index_copy_(2, self._pos, v_new.to(self.v.dtype))
            self.seqlens.copy_((self._pos + 1).to(torch.int32).expand(B))
            return
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != Hkv or t.shape[3] != Dh:
                raise ValueError(f"KVCache.append: {name} must be (B, Hkv, T, Dh) = ({B}, {Hkv}, T, {Dh}), "
                                 f"got {tuple(t.shape)}")
        T = k_new.shape[2]
        if v_new.shape[2] != T:
            raise ValueError(f"KVCache.append: k_new and v_new must hold the same number of positions, "
                             f"got {k_new.shape[2]} and {v_new.shape[2]}")
        longest = max(self._lens)
        if longest + T > Tmax:
            raise ValueError(f"KVCache.append: appending {T} positions to a sequence of length {longest} "
                             f"passes the cache's max_len = {Tmax}")
        first = self._lens[0]
        if all(n == first for n in self._lens):
            self.k[:, :, first:first + T].copy_(k_new)
            self.v[:, :, first:first + T].copy_(v_new)
        else:
            # per-sequence positions: index (B, Hkv, T, Dh) along dim 2
            pos = torch.tensor(self._lens, dtype=torch.int64).to(self.k.device, non_blocking=True)
            pos = (pos[:, None] + torch.arange(T, device=self.k.device))[:, None, :, None].expand(B, Hkv, T, Dh)
            self.k.scatter_(2, pos, k_new.to(self.k.dtype))
            self.v.scatter_(2, pos, v_new.to(self.v.dtype))
        self._lens = [n + T for n in self._lens]
        self.seqlens.add_(T)



def _check_heads(n_embd: int, n_head: int, n_kv_head: int | None, attn_pdrop: float, resid_pdrop: float) -> int:
    """The head layout and dropout rates both attention modules take; returns n_kv_head (None: n_head)."""
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_head < 1 or n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a positive multiple of n_head ({n_head})")
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
    if not 0.0 <= attn_pdrop < 1.0 or not 0.0 <= resid_pdrop < 1.0:
        raise ValueError(f"attn_pdrop and resid_pdrop must be in [0, 1), got {attn_pdrop}, {resid_pdrop}")
    return n_kv_head

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with minGPT's parameters, on the vqkernels attention ops.

    Args:
        n_embd: the model width C; ``n_embd % n_head == 0``, head dim ``hs = n_embd // n_head``.
        n_head: query heads.
        n_kv_head: key/value heads (grouped-query attention; ``n_head % n_kv_head == 0``); default ``n_head``
            (minGPT). ``key`` and ``value`` then map C -> n_kv_head * hs.
        attn_pdrop: dropout on the attention probabilities while training. The fused ops have no dropout, so
            a training step with ``attn_pdrop > 0`` runs PyTorch's ``scaled_dot_product_attention`` with
            ``dropout_p`` instead (same function, unfused backward); in eval it is the fused op as always.
        resid_pdrop: dropout on the output projection (minGPT's ``resid_drop``).
        bias: biases on the four linear maps (minGPT: True).
        n_unmasked: minGPT's prefix: the first ``n_unmasked`` positions attend to each other fully (the rest
            is causal). Computed exactly with the fused ops: full attention within the prefix, causal
            attention (bottom-right aligned) of the later queries over all keys.

    ``forward(x (B, T, C), kv_cache=None) -> (B, T, C)``. With a :class:`KVCache` the new keys/values are
    appended to it and the queries attend to the whole cache (prefill, then one token per step); that path
    is inference only.

    The state_dict holds ``key``, ``query``, ``value``, ``proj`` (weight, bias) and no mask: minGPT's
    persistent ``mask`` buffer is accepted on load (checked to be the causal mask this module computes, then
    dropped), so a taming checkpoint and our own state_dict both load with ``strict=True``.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, attn_pdrop: float = 0.0,
                 resid_pdrop: float = 0.0, bias: bool = True, n_unmasked: int = 0):
        super().__init__()
        n_kv_head = _check_heads(n_embd, n_head, n_kv_head, attn_pdrop, resid_pdrop)
        if n_unmasked < 0:
            raise ValueError(f"n_unmasked must be >= 0, got {n_unmasked}")
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.attn_pdrop = attn_pdrop
        self.n_unmasked = n_unmasked
        kv_dim = n_kv_head * self.head_dim
        # minGPT's order of creation (key, query, value, dropouts, proj): the same seed gives the same weights
        self.key = nn.Linear(n_embd, kv_dim, bias=bias)
        self.query = nn.Linear(n_embd, n_embd, bias=bias)
        self.value = nn.Linear(n_embd, kv_dim, bias=bias)
        self.attn_drop = nn.Dropout(attn_pdrop)  # minGPT has it (no state); the dropout runs inside SDPA
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.proj = Linear(n_embd, n_embd, bias=bias)
        self._fused: PackedLinear | None = None  # prepared by fused_qkv(); None: three projections
        self.register_load_state_dict_pre_hook(_accept_mingpt_mask)

    def extra_repr(self) -> str:
        return (f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"attn_pdrop={self.attn_pdrop}, n_unmasked={self.n_unmasked}")

    # -- the fused input projection ---------------------------------------------------------------

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The three projections as one: weight ((H + 2 Hkv) hs, C) and bias, rows in q, k, v order.
        Concatenated on each call, so gradients flow to ``query``, ``key`` and ``value``."""
        w = torch.cat((self.query.weight, self.key.weight, self.value.weight))
        b = None
        if self.query.bias is not None:
            b = torch.cat((self.query.bias, self.key.bias, self.value.bias))
        return w, b

    @contextlib.contextmanager
    def fused_qkv(self):
        """Within this context (inference: no gradients reach key/query/value) the concatenated weights are
        built once into a :class:`~vqkernels.ops.linear.PackedLinear` and reused by every forward: a decoding
        step then neither copies nor repacks 3 C^2 weights."""
        with torch.no_grad():
            self._fused = PackedLinear(*self.qkv_weight())
        try:
            yield
        finally:
            self._fused = None

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, Hkv, hs = self.n_head, self.n_kv_head, self.head_dim
        if self._fused is None:
            # three GEMMs, as minGPT: one on concatenated weights would copy the weights forward and concatenate
            # the three gradients backward (a (B, T, (H + 2 Hkv) hs) copy per layer per step)
            q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, H hs), (B, T, Hkv hs) x 2
        else:
            q, k, v = self._fused(x).split((H * hs, Hkv * hs, Hkv * hs), dim=-1)  # one GEMM, weights prepared once
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, Hkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, Hkv, hs).transpose(1, 2)  # (B, nkv, T, hs)

        if kv_cache is not None:
            _check_inference(self, x)
            start = min(kv_cache.lengths)
            if 0 < start < self.n_unmasked:
                raise ValueError(f"CausalSelfAttention: with n_unmasked = {self.n_unmasked} the prefix positions "
                                 f"attend to later ones, so they must all be in the first (prefill) call; the "
                                 f"cache already holds {start}")
            empty = kv_cache.is_empty()
            kv_cache.append(k, v)
            if empty:  # prefill: the keys are exactly k, v, so the fused (training) op serves, prefix mask included
                y = self._attend(q, k, v)
            else:
                y = attention_with_kv_cache(q, kv_cache.k, kv_cache.v, kv_cache.seqlens)  # (B, nh, T, hs)
        elif self.training and self.attn_pdrop > 0:
            y = self._sdpa_with_dropout(q, k, v)
        else:
            y = self._attend(q, k, v)

        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_drop(self.proj(y))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[2]
        n = min(self.n_unmasked, T)
        if n <= 1:  # a prefix of one position is plain causal attention
            return causal_attention(q, k, v)
        # minGPT's prefix: queries < n see keys < n; queries >= n see keys <= themselves (bottom-right aligned
        # over all T keys, so query n + i sees keys up to n + i)
        head = attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal=False)  # (B, nh, n, hs)
        if n == T:
            return head
        tail = causal_attention(q[:, :, n:], k, v)  # (B, nh, T - n, hs)
        return torch.cat((head, tail), dim=2)

    def _sdpa_with_dropout(self, q, k, v):
        T = q.shape[2]
        mask = None
        if self.n_unmasked > 1:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()
            mask[: self.n_unmasked, : self.n_unmasked] = True
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_pdrop,
                                              is_causal=mask is None, enable_gqa=self.n_head != self.n_kv_head)


class RotaryCausalSelfAttention(nn.Module):
    """Causal self-attention with rotary positions, as LlamaGen's ``Attention`` (parameters ``wqkv``, ``wo``,
    no biases), on the vqkernels attention ops.

    Args:
        n_embd: the model width C; head dim ``hs = n_embd // n_head``.
        n_head, n_kv_head: query heads and key/value heads (grouped-query attention, ``n_head % n_kv_head == 0``;
            default ``n_head``). ``wqkv`` maps C -> (n_head + 2 n_kv_head) hs, rows in q, k, v order.
        attn_pdrop: dropout on the attention probabilities while training (PyTorch's
            ``scaled_dot_product_attention`` then runs instead of the fused op, as in
            :class:`CausalSelfAttention`).
        resid_pdrop: dropout on the output projection (LlamaGen's ``resid_dropout``).

    ``forward(x (B, T, C), rope (T, hs / 2, 2), kv_cache=None) -> (B, T, C)``: ``rope`` is the (cos, sin) table
    of the T positions of x (:mod:`vqkernels.nn.rope`), applied to q and k in float32 before attention. With a
    :class:`KVCache` (inference only) the rotated keys are appended to it and the queries attend to the cache.
    ``wqkv`` and ``wo`` are :class:`Linear`, so :func:`inference_weights` packs them for decoding.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, attn_pdrop: float = 0.0,
                 resid_pdrop: float = 0.0):
        super().__init__()
        n_kv_head = _check_heads(n_embd, n_head, n_kv_head, attn_pdrop, resid_pdrop)
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.attn_pdrop = attn_pdrop
        self.wqkv = Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(n_embd, n_embd, bias=False)
        self.resid_drop = nn.Dropout(resid_pdrop)

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, attn_pdrop={self.attn_pdrop}"

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, Hkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.wqkv(x).split((H * hs, Hkv * hs, Hkv * hs), dim=-1)  # (B, T, H hs), (B, T, Hkv hs) x 2
        q = apply_rope(q.view(B, T, H, hs), rope).transpose(1, 2)  # (B, nh, T, hs)
        k = apply_rope(k.view(B, T, Hkv, hs), rope).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, Hkv, hs).transpose(1, 2)  # (B, nkv, T, hs)

        if kv_cache is not None:
            _check_inference(self, x)
            empty = kv_cache.is_empty()
            kv_cache.append(k, v)
            if empty:  # prefill: the keys are exactly k, v
                y = causal_attention(q, k, v)
            else:
                y = attention_with_kv_cache(q, kv_cache.k, kv_cache.v, kv_cache.seqlens)  # (B, nh, T, hs)
        elif self.training and self.attn_pdrop > 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_pdrop, is_causal=True,
                                               enable_gqa=H != Hkv)
        else:
            y = causal_attention(q, k, v)

        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_drop(self.wo(y))


def _check_inference(module: nn.Module, x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{type(module).__name__}: the KV-cache path is inference only (no gradients); "
                           "run it under torch.no_grad() / torch.inference_mode()")


def mingpt_mask(block_size: int, n_unmasked: int = 0) -> torch.Tensor:
    """minGPT's ``attn.mask`` buffer (1, 1, block, block): lower triangular, the first n_unmasked fully 1."""
    mask = torch.tril(torch.ones(block_size, block_size))
    mask[:n_unmasked, :n_unmasked] = 1
    return mask.view(1, 1, block_size, block_size)


def _accept_mingpt_mask(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs):
    """Load hook: drop minGPT's ``<prefix>mask`` buffer after checking it is the mask this module computes."""
    mask = state_dict.pop(prefix + "mask", None)
    if mask is None:
        return
    if mask.dim() != 4 or mask.shape[:2] != (1, 1) or mask.shape[2] != mask.shape[3]:
        error_msgs.append(f"{prefix}mask: expected minGPT's causal mask of shape (1, 1, block, block), "
                          f"got {tuple(mask.shape)}")
        return
    want = mingpt_mask(mask.shape[-1], module.n_unmasked).to(mask.device, mask.dtype)
    if not torch.equal(mask, want):
        error_msgs.append(f"{prefix}mask: the checkpoint's attention mask is not minGPT's causal mask with "
                          f"n_unmasked = {module.n_unmasked} (was it trained with another n_unmasked?)")
