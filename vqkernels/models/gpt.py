"""A GPT over code indices: minGPT (as taming-transformers ships it) on the vqkernels attention ops.

The module tree, parameter names and initialisation are minGPT's, so the ``transformer.*`` weights of a
taming-transformers checkpoint load with ``load_state_dict(strict=True)`` and give the same logits; minGPT's
persistent ``blocks.N.attn.mask`` buffer is accepted on load and not kept (see
:class:`vqkernels.nn.CausalSelfAttention`).

Sampling (:meth:`GPT.generate`) prefills the prompt once, then feeds one token per step through
``attention_with_kv_cache`` on caches preallocated for the whole run; :func:`generate_reference` is the
cache-free sampler (the whole prefix again at every step, as minGPT's ``sample``) that the tests compare it
with: given the same generator they draw the same tokens.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.attention import CausalSelfAttention, KVCache, Linear, inference_weights

__all__ = ["GPTConfig", "GPT", "GenerateStats", "generate_reference", "filter_logits", "sample_next"]


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0
    n_kv_head: int | None = None  # grouped-query attention; None: n_head (minGPT)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {val!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.n_unmasked <= self.block_size:
            raise ValueError(f"GPTConfig.n_unmasked must be in [0, block_size], got {self.n_unmasked}")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From a dict of these fields (e.g. taming's ``transformer_config.params``); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown} (known: {sorted(known)})")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm transformer block, minGPT's: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.attn = CausalSelfAttention(C, config.n_head, config.n_kv_head, attn_pdrop=config.attn_pdrop,
                                        resid_pdrop=config.resid_pdrop, n_unmasked=config.n_unmasked)
        self.mlp = nn.Sequential(
            Linear(C, 4 * C),
            nn.GELU(),
            Linear(4 * C, C),
            nn.Dropout(config.resid_pdrop),
        )

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv_cache)
        x = x + self.mlp(self.ln2(x))
        return x


@dataclass
class GenerateStats:
    """What the last :meth:`GPT.generate` call did: ``tokens`` generated in all (batch x new tokens), wall-clock
    seconds of ``setup_s`` (caches allocated, weights prepared), ``prefill_s`` (the prompt, first token) and
    ``decode_s`` (the other tokens; the device synchronised at the end of each), and
    ``tokens_per_s`` = tokens / (setup_s + prefill_s + decode_s)."""
    batch: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    tokens: int = 0
    setup_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0


class GPT(nn.Module):
    """minGPT: token + learned position embeddings, ``n_layer`` pre-norm blocks, a final LayerNorm and a
    bias-free head to ``vocab_size`` logits. ``forward(idx, embeddings=None, targets=None) -> (logits, loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.block_size = config.block_size
        self.apply(self._init_weights)
        self.last_generate_stats: GenerateStats | None = None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # minGPT's: N(0, 0.02) for linear and embedding weights, zero biases, unit LayerNorm; pos_emb stays 0
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def get_block_size(self) -> int:
        return self.block_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward -------------------------------------------------------------------------------------

    def _check_idx(self, idx: torch.Tensor, name: str = "idx") -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"{name} must be a (B, T) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"{name} must hold integer token ids, got {idx.dtype}")
        if idx.device != self.pos_emb.device:
            raise ValueError(f"{name} is on {idx.device} but the model is on {self.pos_emb.device}")
        if idx.numel() and not torch.compiler.is_compiling():  # one host read of min/max (a sync on a GPU)
            lo, hi = (int(x) for x in torch.aminmax(idx))
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    def forward(self, idx: torch.Tensor, embeddings: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids; embeddings (B, Te, C) prepended before the tokens (taming's conditioning path);
        targets (B, Te + T) ids (-100 ignored, as F.cross_entropy) -> (logits (B, Te + T, vocab), loss or None)."""
        self._check_idx(idx)
        x = self.tok_emb(idx)  # (B, T, C)
        if embeddings is not None:
            C = self.config.n_embd
            if embeddings.dim() != 3 or embeddings.shape[0] != idx.shape[0] or embeddings.shape[2] != C:
                raise ValueError(f"embeddings must be (B, Te, n_embd) = ({idx.shape[0]}, Te, {self.config.n_embd}), "
                                 f"got {tuple(embeddings.shape)}")
            x = torch.cat((embeddings, x), dim=1)  # (B, Te + T, C)
        t = x.shape[1]
        if t > self.block_size:
            raise ValueError(f"the sequence has {t} positions, more than block_size = {self.block_size}")
        x = self.drop(x + self.pos_emb[:, :t, :])
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def _forward_cached(self, idx: torch.Tensor, pos: int, caches: list[KVCache]) -> torch.Tensor:
        """Inference: idx (B, T) at positions [pos, pos + T), each layer appending to its cache -> last logits (B, V)"""
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb[:, pos:pos + T, :]  # (B, T, C); dropout is off in eval
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.head(self.ln_f(x[:, -1, :]))  # (B, V): only the last position is sampled from

    def _forward_at(self, tok: torch.Tensor, pos: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decoding step with the position on the device (the caches in :meth:`KVCache.at_position` mode):
        tok (B, 1) at position pos (int64 (1,)) -> logits (B, V). No host value: a CUDA graph can replay it."""
        x = self.tok_emb(tok) + self.pos_emb[0].index_select(0, pos)  # (B, 1, C)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.head(self.ln_f(x[:, -1, :]))  # (B, V)

    def _decode_graphed(self, out, T0, max_new_tokens, caches, temperature, top_k, top_p, generator,
                        capture: bool = True) -> None:
        """The decoding loop of :meth:`generate` over device positions: the step captured as a CUDA graph (when
        ``capture``; else run eagerly, the same step: how the CPU tests check it), replayed per token; sampling
        outside it. out (B, T0 + max_new_tokens) gets the tokens."""
        dev = out.device
        tok = out[:, T0:T0 + 1].clone()  # (B, 1) static input
        pos = torch.full((1,), T0, dtype=torch.int64, device=dev)  # static position
        with contextlib.ExitStack() as stack:
            for c in caches:
                stack.enter_context(c.at_position(pos, T0))
            step = functools.partial(self._forward_at, tok, pos, caches)
            graph, logits = None, None
            try:
                if not capture:
                    raise _NoCapture
                # warm up on a side stream (the CUDA-graph docs' recipe), then capture; both write the same
                # values at position T0 as the first replay will
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = step()
            except _NoCapture:
                pass
            except Exception as e:  # noqa: BLE001  (any capture failure: the eager step is the same function)
                warnings.warn(f"GPT.generate: CUDA-graph capture failed ({type(e).__name__}: {e}); decoding "
                              f"eagerly", RuntimeWarning, stacklevel=3)
                graph = None
            for i in range(T0, T0 + max_new_tokens - 1):
                tok.copy_(out[:, i:i + 1])
                pos.fill_(i)
                if graph is not None:
                    graph.replay()
                else:
                    logits = step()
                out[:, i + 1] = sample_next(logits, temperature, top_k, top_p, generator)
        end = T0 + max_new_tokens - 1
        for c in caches:
            c.reset([end] * c.batch)

    # -- sampling ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool = False) -> torch.Tensor:
        """Continue each prompt of idx (B, T0) by max_new_tokens tokens -> (B, T0 + max_new_tokens).

        The prompt is prefilled once; each new token is then one step of every layer over its KV cache (no
        prefix recomputed). The caches are allocated once for T0 + max_new_tokens - 1 positions (the last
        token is never fed back), which must fit in block_size: a longer run is refused (no sliding window).

        temperature: > 0 divides the logits; 0 means greedy (argmax, no randomness). top_k: keep the k most
        likely tokens; top_p: keep the smallest set of most likely tokens whose probability reaches top_p (in
        (0, 1]); both may be given (top-k first). Sampling draws through ``torch.multinomial(generator=...)``,
        so a seeded generator gives the same tokens every time, and the same as :func:`generate_reference`.

        cuda_graph (CUDA only): run the decoding step (every layer, for one token) as a CUDA graph captured once
        and replayed per token, as gpt-fast does, so that a step costs one launch instead of hundreds; the cache
        is then written at a position held on the device (:meth:`KVCache.at_position`). Sampling stays outside
        the graph, so the tokens are those of the eager path. If the capture fails, the run goes on eagerly
        (with a warning). Off by default until the GPU check has run it (scripts/gpu_check.sh, bench-models).

        Timing goes to ``self.last_generate_stats`` (:class:`GenerateStats`: tokens/s, prefill and decode s).
        """
        self._check_idx(idx)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, top_p)
        if cuda_graph and idx.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {idx.device}")
        B, T0 = idx.shape
        if T0 < 1:
            raise ValueError("idx must hold a prompt of at least one token (e.g. a start-of-sequence token)")
        fed = T0 + max_new_tokens - 1  # positions the model sees
        if max(T0, fed) > self.block_size:
            raise ValueError(f"a prompt of {T0} tokens + {max_new_tokens} new tokens needs {max(T0, fed)} positions, "
                             f"more than block_size = {self.block_size} (generate does not slide the context)")
        if 0 < T0 < self.config.n_unmasked and max_new_tokens > 1:
            raise ValueError(f"with n_unmasked = {self.config.n_unmasked} the prompt must hold the whole unmasked "
                             f"prefix (got {T0} tokens): later tokens would change the prefix's keys")
        out = torch.empty((B, T0 + max_new_tokens), dtype=torch.int64, device=idx.device)
        out[:, :T0] = idx
        stats = GenerateStats(batch=B, prompt_len=T0, new_tokens=max_new_tokens, tokens=B * max_new_tokens)
        if max_new_tokens == 0:
            self.last_generate_stats = stats
            return out

        was_training = self.training
        self.eval()
        try:
            ts = time.perf_counter()
            p = next(self.parameters())
            cfg = self.config
            Hkv = cfg.n_kv_head or cfg.n_head
            caches = [KVCache(B, Hkv, fed, cfg.n_embd // cfg.n_head, dtype=p.dtype, device=p.device)
                      for _ in self.blocks]
            with inference_weights(self):  # weights prepared once for the whole run
                t0 = time.perf_counter()
                logits = self._forward_cached(out[:, :T0], 0, caches)
                out[:, T0] = sample_next(logits, temperature, top_k, top_p, generator)
                _sync(idx.device)
                t1 = time.perf_counter()
                if cuda_graph and max_new_tokens > 1:
                    self._decode_graphed(out, T0, max_new_tokens, caches, temperature, top_k, top_p, generator)
                else:
                    for i in range(T0, T0 + max_new_tokens - 1):
                        logits = self._forward_cached(out[:, i:i + 1], i, caches)
                        out[:, i + 1] = sample_next(logits, temperature, top_k, top_p, generator)
                _sync(idx.device)
                t2 = time.perf_counter()
        finally:
            self.train(was_training)
        stats.setup_s, stats.prefill_s, stats.decode_s = t0 - ts, t1 - t0, t2 - t1
        stats.tokens_per_s = stats.tokens / max(t2 - ts, 1e-12)
        self.last_generate_stats = stats
        return out


class _NoCapture(Exception):
    """_decode_graphed was asked to run the step eagerly."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# Sampling, shared by GPT.generate and the cache-free reference, so that both draw from the same numbers.

def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) with the tokens outside the top-k and outside the top-p nucleus set to -inf (a new tensor).

    top-k keeps the k largest logits (ties with the k-th included; k above V keeps all). top-p keeps, in order
    of decreasing probability, every token whose preceding tokens hold less than top_p of the mass: the
    smallest set reaching top_p, never empty."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,) int64: argmax when temperature is 0, else a draw from
    softmax(filter_logits(logits / temperature)) through torch.multinomial with ``generator``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_reference(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The cache-free sampler: the whole sequence through ``model.forward`` at every step (minGPT's ``sample``,
    quadratic). The same sampling as :meth:`GPT.generate`, so the same generator gives the same tokens."""
    _check_sampling(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        x = idx.long()
        for _ in range(max_new_tokens):
            logits, _ = model(x)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            x = torch.cat((x, nxt[:, None]), dim=1)
    finally:
        model.train(was_training)
    return x
