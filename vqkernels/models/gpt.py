"""A GPT over code indices, on the vqkernels attention ops, in two families chosen by ``GPTConfig.arch``.

- ``"mingpt"`` (the default): minGPT as taming-transformers ships it. The module tree, parameter names and
  initialisation are minGPT's, so the ``transformer.*`` weights of a taming-transformers checkpoint load with
  ``load_state_dict(strict=True)`` and give the same logits; minGPT's persistent ``blocks.N.attn.mask`` buffer
  is accepted on load and not kept (see :class:`vqkernels.nn.CausalSelfAttention`).
- ``"llama"``: the LLaMA family as LlamaGen builds its class-conditional (c2i) GPTs: RMSNorm (in float32),
  SwiGLU feed-forward, no biases, one fused ``wqkv``, grouped heads, rotary positions (2-D over the token grid
  or 1-D; :mod:`vqkernels.nn.rope`), a class embedding with one extra null-class row for classifier-free
  guidance (CFG), token dropout and drop path for training. The module tree and names are LlamaGen's
  (``tok_embeddings``, ``cls_embedding.embedding_table``, ``layers.N.attention.{wqkv,wo}``,
  ``layers.N.feed_forward.{w1,w2,w3}``, ``layers.N.{attention_norm,ffn_norm}``, ``norm``, ``output``), so
  :meth:`GPT.from_llamagen` loads its checkpoints strictly. The sequence is the class token, then the image
  tokens: ``forward(idx, class_labels=labels)`` gives logits (B, 1 + T, vocab) in float32, LlamaGen's.

Sampling (:meth:`GPT.generate`) prefills the prompt once, then feeds one token per step through
``attention_with_kv_cache`` on caches preallocated for the whole run; with CFG the conditional and null-class
rows run as one batch over one cache. :func:`generate_reference` is the cache-free sampler (the whole prefix
again at every step, as minGPT's ``sample``) that the tests compare it with: given the same generator they
draw the same tokens.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._config import Config
from ..nn.attention import CausalSelfAttention, KVCache, Linear, RotaryCausalSelfAttention, inference_weights
from ..nn.rope import RMSNorm, compute_dtype, rope_table_1d, rope_table_2d
from ._checkpoint import CheckpointError, check_state_dict, load_torch_checkpoint, peer_model_args

__all__ = ["GPTConfig", "GPT", "GenerateStats", "generate_reference", "filter_logits", "sample_next",
           "LLAMAGEN_MODELS", "llamagen_config"]

# Fields that only the llama family reads; a minGPT config keeps them at their defaults.
_LLAMA_FIELDS = ("num_classes", "cls_token_num", "class_dropout_prob", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope", "rope_base", "ffn_pdrop", "drop_path_rate", "cfg_scale")


@dataclass
class GPTConfig(Config):
    """What a :class:`GPT` is. ``arch`` picks the family; the fields after it are the llama family's (LlamaGen's
    ``ModelArgs``, by our names where minGPT already had one: ``n_embd`` = dim, ``embd_pdrop`` = token_dropout_p,
    ``resid_pdrop`` = resid_dropout_p, ``attn_pdrop`` = attn_dropout_p, ``ffn_pdrop`` = ffn_dropout_p).

    ``block_size``: minGPT: the positions a sequence may have (conditioning included). llama: LlamaGen's, the
    number of image tokens (a ``grid x grid`` raster for the 2-D RoPE); the class token comes on top, so a
    sequence holds at most ``cls_token_num + block_size`` positions (:attr:`n_positions`).

    llama fields: ``num_classes`` (required), ``cls_token_num`` (LlamaGen's: the RoPE table's leading rows for
    the condition; a c2i model's condition is one token, so more than 1 only shifts the image tokens' rows, as
    in LlamaGen), ``class_dropout_prob`` (training: a label is replaced by the null class with this
    probability; > 0 also gives the class table its null row, which CFG needs), ``multiple_of`` and
    ``ffn_dim_multiplier`` (the SwiGLU hidden size, :attr:`ffn_hidden`), ``norm_eps`` (RMSNorm), ``rope``
    ("2d" or "1d") and ``rope_base``, ``ffn_pdrop`` (None: ``resid_pdrop``), ``drop_path_rate`` (stochastic
    depth, rising linearly from 0 at the first layer), ``cfg_scale`` (the default of :meth:`GPT.generate`).
    """
    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0
    n_kv_head: int | None = None  # grouped-query attention; None: n_head
    arch: Literal["mingpt", "llama"] = "mingpt"
    num_classes: int | None = None
    cls_token_num: int = 1
    class_dropout_prob: float = 0.1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope: Literal["2d", "1d"] = "2d"
    rope_base: float = 10000.0
    ffn_pdrop: float | None = None
    drop_path_rate: float = 0.0
    cfg_scale: float = 1.0

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
        if self.arch == "mingpt":
            defaults = {f.name: f.default for f in fields(self)}
            changed = [n for n in _LLAMA_FIELDS if getattr(self, n) != defaults[n]]
            if changed:
                raise ValueError(f"GPTConfig: {', '.join(changed)} belong to the llama family; set arch='llama' to "
                                 f"use them (minGPT has no {changed[0]})")
        elif self.arch == "llama":
            self._check_llama()
        else:
            raise ValueError(f"GPTConfig.arch must be 'mingpt' or 'llama', got {self.arch!r}")

    def _check_llama(self) -> None:
        def positive_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"GPTConfig.{name} must be an int >= {lo} for arch='llama', got {v!r}")

        positive_int("num_classes")
        positive_int("cls_token_num")
        positive_int("multiple_of")
        if self.n_unmasked:
            raise ValueError("GPTConfig.n_unmasked is minGPT's; the llama family is causal throughout (set it to 0)")
        for name in ("class_dropout_prob", "drop_path_rate") + (("ffn_pdrop",) if self.ffn_pdrop is not None else ()):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"GPTConfig.ffn_dim_multiplier must be None or > 0, got {self.ffn_dim_multiplier}")
        if not self.norm_eps > 0 or not self.rope_base > 0:
            raise ValueError(f"GPTConfig: norm_eps and rope_base must be > 0, got {self.norm_eps}, {self.rope_base}")
        hs = self.n_embd // self.n_head
        if self.rope == "2d":
            grid = math.isqrt(self.block_size)
            if grid * grid != self.block_size:
                raise ValueError(f"GPTConfig: rope='2d' puts the block_size image tokens on a square grid; "
                                 f"block_size = {self.block_size} is not a square")
            if hs % 4:
                raise ValueError(f"GPTConfig: rope='2d' needs a head dim (n_embd / n_head) divisible by 4, got {hs}")
        elif self.rope == "1d":
            if hs % 2:
                raise ValueError(f"GPTConfig: rope='1d' needs an even head dim (n_embd / n_head), got {hs}")
        else:
            raise ValueError(f"GPTConfig.rope must be '2d' or '1d', got {self.rope!r}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0):
            raise ValueError(f"GPTConfig.cfg_scale must be a finite number >= 1 (1: no guidance), got {self.cfg_scale}")
        if self.cfg_scale > 1.0 and not self.class_dropout_prob > 0:
            raise ValueError("GPTConfig: cfg_scale > 1 needs the null class, which exists only with "
                             "class_dropout_prob > 0 (as LlamaGen's LabelEmbedder)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_positions(self) -> int:
        """The most positions a sequence may have: block_size (minGPT); cls_token_num + block_size (llama)."""
        return self.block_size + (self.cls_token_num if self.arch == "llama" else 0)

    @property
    def ffn_hidden(self) -> int:
        """LlamaGen's SwiGLU hidden size: int(2/3 * 4 n_embd), times ffn_dim_multiplier (truncated), rounded up
        to a multiple of multiple_of. (minGPT: 4 n_embd.)"""
        if self.arch != "llama":
            return 4 * self.n_embd
        hidden = int(2 * (4 * self.n_embd) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def has_null_class(self) -> bool:
        """Whether the class table has the null-class row (label ``num_classes``) that CFG conditions on."""
        return self.arch == "llama" and self.class_dropout_prob > 0


# LlamaGen's class-conditional models (autoregressive/models/gpt.py, GPT_models): n_layer, n_head, dim.
LLAMAGEN_MODELS = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
}
_LLAMAGEN_TEXT_MODELS = ("GPT-1B", "GPT-3B", "GPT-7B")
# LlamaGen's ModelArgs defaults, and where each field goes in GPTConfig (None: not a property of the weights'
# function: an init scale, cache sizes, the unused caption width)
_MODEL_ARGS = dict(dim=4096, n_layer=32, n_head=32, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None,
                   rope_base=10000.0, norm_eps=1e-5, initializer_range=0.02, token_dropout_p=0.1,
                   attn_dropout_p=0.0, resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.0, num_classes=1000,
                   caption_dim=2048, class_dropout_prob=0.1, model_type="c2i", vocab_size=16384, cls_token_num=1,
                   block_size=256, max_batch_size=32, max_seq_len=2048)
_MODEL_ARGS_TO_OURS = dict(dim="n_embd", n_layer="n_layer", n_head="n_head", n_kv_head="n_kv_head",
                           multiple_of="multiple_of", ffn_dim_multiplier="ffn_dim_multiplier", rope_base="rope_base",
                           norm_eps="norm_eps", token_dropout_p="embd_pdrop", attn_dropout_p="attn_pdrop",
                           resid_dropout_p="resid_pdrop", ffn_dropout_p="ffn_pdrop", drop_path_rate="drop_path_rate",
                           num_classes="num_classes", class_dropout_prob="class_dropout_prob",
                           vocab_size="vocab_size", cls_token_num="cls_token_num", block_size="block_size")


def llamagen_config(config: str | Mapping = "GPT-B", **overrides) -> GPTConfig:
    """The :class:`GPTConfig` of a LlamaGen class-conditional GPT.

    ``config``: a model name of :data:`LLAMAGEN_MODELS` ('GPT-B', 'GPT-L', 'GPT-XL', 'GPT-XXL', 'GPT-XXXL'), or a
    mapping of LlamaGen's ``ModelArgs`` fields; ``overrides``: more ``ModelArgs`` fields (what sample_c2i.py
    passes: ``vocab_size``, ``block_size``, ``num_classes``, ``cls_token_num``, ...). Unset fields take
    ModelArgs' defaults (the dropouts included: 0.1, used only in training). ``initializer_range``,
    ``max_batch_size``, ``max_seq_len`` and ``caption_dim`` do not change the model's function and are
    accepted and not kept. The text-conditional models (``model_type='t2i'``, 'GPT-1B/3B/7B') are refused:
    their caption projection is not built here.
    """
    if isinstance(config, str) and config in _LLAMAGEN_TEXT_MODELS:
        raise NotImplementedError(f"config: {config!r} is one of LlamaGen's text-conditional (t2i) models; only "
                                  f"the class-conditional ones are supported: {', '.join(LLAMAGEN_MODELS)}")
    args = peer_model_args(config, overrides, named=LLAMAGEN_MODELS, fields=_MODEL_ARGS, what="LlamaGen model")
    if args["model_type"] != "c2i":
        raise NotImplementedError(f"config: model_type {args['model_type']!r}: only LlamaGen's class-conditional "
                                  f"models (model_type='c2i') are supported (a t2i model's caption projection is "
                                  f"not built here)")
    ours = {mine: args[theirs] for theirs, mine in _MODEL_ARGS_TO_OURS.items()}
    if isinstance(ours["rope_base"], int) and not isinstance(ours["rope_base"], bool):
        ours["rope_base"] = float(ours["rope_base"])
    return GPTConfig.from_dict({**ours, "arch": "llama", "rope": "2d"}, where="LlamaGen ModelArgs")


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


# ---------------------------------------------------------------------------------------------------------
# The llama family's modules (LlamaGen's names, so that its state_dict keys are ours)

class ClassEmbedding(nn.Module):
    """LlamaGen's ``LabelEmbedder``: ``embedding_table`` (num_classes + 1, C) when ``dropout_prob > 0`` (the last
    row is the null class, label ``num_classes``, that CFG conditions on), else (num_classes, C). While
    training, each label is replaced by the null class with probability ``dropout_prob``.
    ``forward(labels (B,)) -> (B, 1, C)``."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, C)


class FeedForward(nn.Module):
    """SwiGLU, LlamaGen's: ``dropout(w2(silu(w1 x) * w3 x))``, no biases."""

    def __init__(self, dim: int, hidden: int, pdrop: float):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class DropPath(nn.Module):
    """Stochastic depth (LlamaGen's, from timm): while training, each sample's residual branch is dropped with
    probability p and otherwise scaled by 1 / (1 - p); the identity in eval or at p = 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)  # (B, 1, 1)
        return x * mask


class LlamaBlock(nn.Module):
    """LlamaGen's ``TransformerBlock``: h = x + drop_path(attention(attention_norm(x))), then
    h + drop_path(feed_forward(ffn_norm(h))); RMSNorm, rotary attention, SwiGLU."""

    def __init__(self, config: GPTConfig, drop_path: float):
        super().__init__()
        C = config.n_embd
        # LlamaGen's order of creation (attention, feed_forward, norms): the same seed gives the same weights
        self.attention = RotaryCausalSelfAttention(C, config.n_head, config.n_kv_head, attn_pdrop=config.attn_pdrop,
                                                   resid_pdrop=config.resid_pdrop)
        ffn_pdrop = config.resid_pdrop if config.ffn_pdrop is None else config.ffn_pdrop
        self.feed_forward = FeedForward(C, config.ffn_hidden, ffn_pdrop)
        self.attention_norm = RMSNorm(C, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(C, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, kv_cache))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


@dataclass
class GenerateStats:
    """What the last :meth:`GPT.generate` call did: ``tokens`` generated in all (batch x new tokens), wall-clock
    seconds of ``setup_s`` (caches allocated, weights prepared), ``prefill_s`` (the prompt, first token) and
    ``decode_s`` (the other tokens; the device synchronised at the end of each), and
    ``tokens_per_s`` = tokens / (setup_s + prefill_s + decode_s). ``batch`` counts the sequences asked for
    (the rows run are twice as many with CFG)."""
    batch: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    tokens: int = 0
    setup_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0


class GPT(nn.Module):
    """A GPT over code indices; the family is ``config.arch``.

    minGPT: token + learned position embeddings, ``n_layer`` pre-norm blocks, a final LayerNorm and a bias-free
    head to ``vocab_size`` logits. ``forward(idx, embeddings=None, targets=None) -> (logits, loss)``.

    llama (LlamaGen's c2i ``Transformer``): the class embedding (one token), token embeddings, ``n_layer``
    :class:`LlamaBlock`, a final RMSNorm and a bias-free ``output``; rotary positions, none learned.
    ``forward(idx, class_labels=labels, targets=None) -> (logits (B, 1 + T, vocab) float32, loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.last_generate_stats: GenerateStats | None = None
        if config.arch == "llama":
            self._build_llama(config)
            return
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _build_llama(self, config: GPTConfig) -> None:
        # LlamaGen's order of creation and initialisation: N(0, 0.02) linear and embedding weights, RMSNorm ones,
        # the output zero
        C = config.n_embd
        self.cls_embedding = ClassEmbedding(config.num_classes, C, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, C)
        self.tok_dropout = nn.Dropout(config.embd_pdrop)
        rates = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()  # LlamaGen's
        self.layers = nn.ModuleList([LlamaBlock(config, rates[i]) for i in range(config.n_layer)])
        self.norm = RMSNorm(C, eps=config.norm_eps)
        self.output = Linear(C, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)
        if config.rope == "2d":
            table = rope_table_2d(math.isqrt(config.block_size), config.head_dim, config.rope_base,
                                  config.cls_token_num)
        else:
            table = rope_table_1d(config.block_size, config.head_dim, config.rope_base, config.cls_token_num)
        # (cls_token_num + block_size, hs / 2, 2) float64 on the CPU, not in the state_dict (LlamaGen's isn't
        # either); the copies used are made once per device and compute dtype (_rope)
        self._rope_table = table
        self._rope_copies: dict = {}

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # minGPT's (and LlamaGen's): N(0, 0.02) for linear and embedding weights, zero biases, unit LayerNorm;
        # pos_emb stays 0
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    @property
    def is_llama(self) -> bool:
        return self.config.arch == "llama"

    @property
    def _trunk(self) -> nn.ModuleList:
        return self.layers if self.is_llama else self.blocks

    @property
    def _embedding(self) -> nn.Embedding:
        return self.tok_embeddings if self.is_llama else self.tok_emb

    def get_block_size(self) -> int:
        return self.block_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """The RoPE table on x's device in the dtype the rotation runs in (float32, float64 for float64 x)."""
        key = (x.device, compute_dtype(x.dtype))
        table = self._rope_copies.get(key)
        if table is None:
            with torch.inference_mode(False):  # a copy made inside generate must serve autograd later too
                table = self._rope_copies[key] = self._rope_table.to(device=x.device, dtype=key[1])
        return table

    # -- loading LlamaGen's checkpoints ---------------------------------------------------------------

    @classmethod
    def from_llamagen(cls, checkpoint, config: str | Mapping = "GPT-B", *, trust_checkpoint: bool = False,
                      map_location="cpu", **overrides) -> "GPT":
        """A LlamaGen class-conditional GPT with its weights, in eval mode.

        ``checkpoint``: a path to a ``torch.save`` file, or a dict, holding the weights under ``'model'``,
        ``'module'`` or ``'state_dict'`` (the first present), or bare, as LlamaGen's sample_c2i.py reads them.
        The file is read with ``torch.load(weights_only=True)`` (LlamaGen's training checkpoints also hold an
        argparse ``Namespace``, which that refuses: pass ``trust_checkpoint=True`` only for a file you trust).
        A ``freqs_cis`` entry (older LlamaGen checkpoints kept the RoPE table) is dropped: it is recomputed.
        ``config`` and ``overrides``: see :func:`llamagen_config` (a model name such as 'GPT-B' with ModelArgs
        overrides such as ``vocab_size``, ``block_size``, ``num_classes``, or a dict of ModelArgs fields).
        Every other key must match the model built from the config, name for name and shape for shape.
        """
        config = llamagen_config(config, **overrides)
        sd = _llamagen_state_dict(checkpoint, trust_checkpoint, map_location)
        if any(k.startswith("cls_embedding.cap_proj.") for k in sd):
            raise NotImplementedError("checkpoint: this is a text-conditional (t2i) LlamaGen model (it has "
                                      "cls_embedding.cap_proj); only class-conditional models are supported")
        sd.pop("freqs_cis", None)
        model = cls(config)
        check_state_dict(model, sd, what="LlamaGen checkpoint")
        model.load_state_dict(sd, strict=True)
        return model.eval()

    # -- forward -------------------------------------------------------------------------------------

    def _check_idx(self, idx: torch.Tensor, name: str = "idx") -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"{name} must be a (B, T) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"{name} must hold integer token ids, got {idx.dtype}")
        device = self._embedding.weight.device
        if idx.device != device:
            raise ValueError(f"{name} is on {idx.device} but the model is on {device}")
        if idx.numel() and not torch.compiler.is_compiling():  # one host read of min/max (a sync on a GPU)
            lo, hi = (int(x) for x in torch.aminmax(idx))
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    def _check_labels(self, labels, batch: int | None) -> torch.Tensor:
        """class_labels (B,) integer tensor on the model's device, ids in [0, num_classes) or the null class
        num_classes (when the table has it) -> int64."""
        cfg = self.config
        if labels is None:
            raise ValueError("class_labels is required: a llama (LlamaGen c2i) GPT is conditioned on a class label "
                             "per sequence (the null class, for unconditional rows, is num_classes)")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"class_labels must be a (B,) tensor of class ids, got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must hold integer class ids, got {labels.dtype}")
        if batch is not None and labels.shape[0] != batch:
            raise ValueError(f"class_labels holds {labels.shape[0]} labels for a batch of {batch} sequences")
        device = self._embedding.weight.device
        if labels.device != device:
            raise ValueError(f"class_labels is on {labels.device} but the model is on {device}")
        top = cfg.num_classes + int(cfg.has_null_class)
        if labels.numel() and not torch.compiler.is_compiling():
            lo, hi = (int(x) for x in torch.aminmax(labels))
            if lo < 0 or hi >= top:
                null = f" or the null class {cfg.num_classes}" if cfg.has_null_class else ""
                raise ValueError(f"class_labels holds class {lo if lo < 0 else hi}, outside [0, {cfg.num_classes})"
                                 f"{null}")
        return labels.long()

    def forward(self, idx: torch.Tensor, embeddings: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, *,
                class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """minGPT: idx (B, T) token ids; embeddings (B, Te, C) prepended before the tokens (taming's conditioning
        path); targets (B, Te + T) ids (-100 ignored, as F.cross_entropy) -> (logits (B, Te + T, vocab), loss).

        llama: idx (B, T) image tokens after the class token of class_labels (B,) -> logits (B, 1 + T, vocab) in
        float32 (float64 for a float64 model), as LlamaGen's ``Transformer.forward(idx, cond_idx)`` in eval mode
        (position j predicts the token after it); targets (B, 1 + T) aligned with the logits (-100 ignored).
        In training mode the labels are dropped to the null class with probability class_dropout_prob."""
        if self.is_llama:
            if embeddings is not None:
                raise ValueError("embeddings: a llama GPT is conditioned by class_labels, not by prepended "
                                 "embeddings")
            return self._forward_llama(idx, class_labels, targets)
        if class_labels is not None:
            raise ValueError("class_labels: a minGPT model has no class embedding (taming's class-conditional "
                             "models put the class token in idx); class_labels is for arch='llama'")
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
        return logits, _loss(logits, targets)

    def _forward_llama(self, idx, class_labels, targets):
        self._check_idx(idx)
        B, T = idx.shape
        labels = self._check_labels(class_labels, B)
        n = 1 + T
        if n > self.config.n_positions:
            raise ValueError(f"the sequence has {n} positions (the class token + {T} tokens), more than "
                             f"cls_token_num + block_size = {self.config.n_positions}")
        x = torch.cat((self.cls_embedding(labels), self.tok_embeddings(idx)), dim=1)  # (B, 1 + T, C)
        x = self.tok_dropout(x)
        rope = self._rope(x)[:n]  # (1 + T, hs / 2, 2)
        for layer in self.layers:
            x = layer(x, rope)
        logits = self.output(self.norm(x))  # (B, 1 + T, vocab)
        logits = logits.to(compute_dtype(logits.dtype))  # LlamaGen returns float32 logits
        if targets is not None and tuple(targets.shape) != (B, n):
            raise ValueError(f"targets must be (B, 1 + T) = ({B}, {n}), aligned with the logits, got "
                             f"{tuple(targets.shape)}")
        return logits, _loss(logits, targets)

    def _forward_cached(self, idx: torch.Tensor, pos: int, caches: list[KVCache],
                        class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Inference: idx (B, T) at positions [pos, pos + T), each layer appending to its cache -> last logits (B, V).
        llama: class_labels (B,) puts the class token first (a prefill, pos 0)."""
        T = idx.shape[1]
        if not self.is_llama:
            x = self.tok_emb(idx) + self.pos_emb[:, pos:pos + T, :]  # (B, T, C); dropout is off in eval
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache)
            return self.head(self.ln_f(x[:, -1, :]))  # (B, V): only the last position is sampled from
        x = self.tok_embeddings(idx)  # (B, T, C)
        if class_labels is not None:
            x = torch.cat((self.cls_embedding(class_labels), x), dim=1)  # (B, 1 + T, C)
        rope = self._rope(x)[pos:pos + x.shape[1]]
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope, cache)
        logits = self.output(self.norm(x[:, -1:, :]))[:, 0]  # (B, V)
        return logits.to(compute_dtype(logits.dtype))

    def _forward_at(self, tok: torch.Tensor, pos: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decoding step with the position on the device (the caches in :meth:`KVCache.at_position` mode):
        tok (B, 1) at position pos (int64 (1,)) -> logits (B, V). No host value: a CUDA graph can replay it."""
        if not self.is_llama:
            x = self.tok_emb(tok) + self.pos_emb[0].index_select(0, pos)  # (B, 1, C)
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache)
            return self.head(self.ln_f(x[:, -1, :]))  # (B, V)
        x = self.tok_embeddings(tok)  # (B, 1, C)
        rope = self._rope(x).index_select(0, pos)  # (1, hs / 2, 2)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope, cache)
        logits = self.output(self.norm(x[:, -1:, :]))[:, 0]  # (B, V)
        return logits.to(compute_dtype(logits.dtype))

    def _decode_graphed(self, out, T0, max_new_tokens, caches, temperature, top_k, top_p, generator,
                        capture: bool = True, *, pick=None, rows=None, offset: int = 0) -> None:
        """The decoding loop of :meth:`generate` over device positions: the step captured as a CUDA graph (when
        ``capture``; else run eagerly, the same step: how the CPU tests check it), replayed per token; sampling
        outside it. out (B, T0 + max_new_tokens) gets the tokens; token column i sits at position i + offset.
        ``pick(logits, n) -> (B,)`` chooses new token n from the step's logits (default: sample_next with the
        sampling arguments); ``rows(tokens (B, 1)) -> (R, 1)`` the rows fed (default: the tokens; CFG: twice)."""
        if pick is None:
            def pick(logits, n):
                return sample_next(logits, temperature, top_k, top_p, generator)
        if rows is None:
            def rows(t):
                return t
        dev = out.device
        tok = rows(out[:, T0:T0 + 1]).clone()  # (R, 1) static input
        pos = torch.full((1,), T0 + offset, dtype=torch.int64, device=dev)  # static position
        start = T0 + offset
        with contextlib.ExitStack() as stack:
            for c in caches:
                stack.enter_context(c.at_position(pos, start))
            step = functools.partial(self._forward_at, tok, pos, caches)
            graph, logits = None, None
            try:
                if not capture:
                    raise _NoCapture
                # warm up on a side stream (the CUDA-graph docs' recipe), then capture; both write the same
                # values at the first position as the first replay will
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
                tok.copy_(rows(out[:, i:i + 1]))
                pos.fill_(i + offset)
                if graph is not None:
                    graph.replay()
                else:
                    logits = step()
                out[:, i + 1] = pick(logits, i + 1 - T0)
        end = T0 + offset + max_new_tokens - 1
        for c in caches:
            c.reset([end] * c.batch)

    # -- sampling ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor | None = None, max_new_tokens: int | None = None, *,
                 class_labels: torch.Tensor | None = None, cfg_scale: float | None = None, cfg_interval: int = -1,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool = False) -> torch.Tensor:
        """Sample max_new_tokens tokens per sequence, each new token fed back.

        minGPT: continue each prompt of idx (B, T0) (at least one token) -> (B, T0 + max_new_tokens).
        llama: class_labels (B,) is each sequence's class; idx (B, T0) an optional prompt of image tokens after
        the class token -> (B, T0 + max_new_tokens) with a prompt, the (B, max_new_tokens) new tokens without.

        The prompt is prefilled once; each new token is then one step of every layer over its KV cache (no
        prefix recomputed). The caches are allocated once for the positions fed (the last token is never fed
        back), which must fit in block_size (minGPT) or cls_token_num + block_size (llama): a longer run is
        refused (no sliding window).

        Classifier-free guidance (llama; LlamaGen's): with ``cfg_scale`` > 1 (None: ``config.cfg_scale``) every
        sequence also runs with the null class, the two halves as one batch of 2B rows over one cache, and the
        token is drawn from ``uncond + (cond - uncond) * cfg_scale``; with ``cfg_interval`` > -1, from the
        conditional logits alone once more than ``cfg_interval`` tokens after the first were drawn. cfg_scale
        must be >= 1 (1: no guidance) and > 1 needs the null class (``class_dropout_prob > 0``).

        temperature: > 0 divides the logits; 0 means greedy (argmax, no randomness). top_k: keep the k most
        likely tokens; top_p: keep the smallest set of most likely tokens whose probability reaches top_p (in
        (0, 1]); both may be given (top-k first). Sampling draws through ``torch.multinomial(generator=...)``,
        so a seeded generator gives the same tokens every time, and the same as :func:`generate_reference`.
        With top_k=1 the tokens are LlamaGen's ``generate(..., top_k=1)`` tokens.

        cuda_graph (CUDA only): run the decoding step (every layer, for one token) as a CUDA graph captured once
        and replayed per token, as gpt-fast does, so that a step costs one launch instead of hundreds; the cache
        is then written at a position held on the device (:meth:`KVCache.at_position`). Sampling (and the CFG
        mix) stays outside the graph, so the tokens are those of the eager path. If the capture fails, the run
        goes on eagerly (with a warning). Off by default until the GPU check has run it.

        Timing goes to ``self.last_generate_stats`` (:class:`GenerateStats`: tokens/s, prefill and decode s).
        """
        cfg = self.config
        llama = self.is_llama
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, top_p)
        if llama:
            labels = self._check_labels(class_labels, None if idx is None else _batch_of(idx))
            B = labels.shape[0]
            if idx is None:
                idx = torch.empty((B, 0), dtype=torch.int64, device=labels.device)
            cfg_scale = _check_cfg(cfg, cfg_scale, cfg_interval)
        else:
            if idx is None:
                raise ValueError("idx is required: a minGPT model continues a prompt (e.g. a start-of-sequence "
                                 "token)")
            if class_labels is not None or (cfg_scale is not None and cfg_scale != 1) or cfg_interval != -1:
                raise ValueError("class_labels, cfg_scale and cfg_interval (classifier-free guidance) are for "
                                 "arch='llama'; a minGPT model takes its condition in idx")
            cfg_scale = 1.0
        self._check_idx(idx)
        if cuda_graph and idx.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {idx.device}")
        B, T0 = idx.shape
        if T0 < 1 and not llama:
            raise ValueError("idx must hold a prompt of at least one token (e.g. a start-of-sequence token)")
        offset = 1 if llama else 0  # the class token's position
        prefix = T0 + offset  # positions prefilled
        fed = prefix + max_new_tokens - 1  # positions the model sees
        limit = cfg.n_positions
        if max(prefix, fed) > limit:
            what = f"cls_token_num + block_size = {limit}" if llama else f"block_size = {limit}"
            cls_tok = "the class token + " if llama else ""
            raise ValueError(f"{cls_tok}a prompt of {T0} tokens + {max_new_tokens} new tokens needs "
                             f"{max(prefix, fed)} positions, more than {what} (generate does not slide the context)")
        if 0 < T0 < cfg.n_unmasked and max_new_tokens > 1:
            raise ValueError(f"with n_unmasked = {cfg.n_unmasked} the prompt must hold the whole unmasked "
                             f"prefix (got {T0} tokens): later tokens would change the prefix's keys")
        out = torch.empty((B, T0 + max_new_tokens), dtype=torch.int64, device=idx.device)
        out[:, :T0] = idx
        stats = GenerateStats(batch=B, prompt_len=T0, new_tokens=max_new_tokens, tokens=B * max_new_tokens)
        if max_new_tokens == 0:
            self.last_generate_stats = stats
            return out

        guided = cfg_scale > 1.0

        def rows(t: torch.Tensor) -> torch.Tensor:  # (B, T) -> the rows run: (2B, T) with CFG (cond, then null)
            return torch.cat((t, t)) if guided else t

        def pick(logits: torch.Tensor, n: int) -> torch.Tensor:  # logits of the rows -> new token n (B,)
            if guided:
                cond, uncond = logits.split(B)
                if cfg_interval == -1 or n - 1 <= cfg_interval:  # LlamaGen: off once step n - 1 > cfg_interval
                    logits = uncond + (cond - uncond) * cfg_scale
                else:
                    logits = cond
            return sample_next(logits, temperature, top_k, top_p, generator)

        was_training = self.training
        self.eval()
        try:
            ts = time.perf_counter()
            p = next(self.parameters())
            Hkv = cfg.n_kv_head or cfg.n_head
            R = 2 * B if guided else B
            caches = [KVCache(R, Hkv, fed, cfg.head_dim, dtype=p.dtype, device=p.device) for _ in self._trunk]
            with inference_weights(self):  # weights prepared once for the whole run
                t0 = time.perf_counter()
                if llama:
                    null = torch.full_like(labels, cfg.num_classes)
                    logits = self._forward_cached(rows(out[:, :T0]), 0, caches,
                                                  torch.cat((labels, null)) if guided else labels)
                else:
                    logits = self._forward_cached(out[:, :T0], 0, caches)
                out[:, T0] = pick(logits, 0)
                _sync(idx.device)
                t1 = time.perf_counter()
                if cuda_graph and max_new_tokens > 1:
                    self._decode_graphed(out, T0, max_new_tokens, caches, temperature, top_k, top_p, generator,
                                         pick=pick, rows=rows, offset=offset)
                else:
                    for i in range(T0, T0 + max_new_tokens - 1):
                        logits = self._forward_cached(rows(out[:, i:i + 1]), i + offset, caches)
                        out[:, i + 1] = pick(logits, i + 1 - T0)
                _sync(idx.device)
                t2 = time.perf_counter()
        finally:
            self.train(was_training)
        stats.setup_s, stats.prefill_s, stats.decode_s = t0 - ts, t1 - t0, t2 - t1
        stats.tokens_per_s = stats.tokens / max(t2 - ts, 1e-12)
        self.last_generate_stats = stats
        return out


def _batch_of(idx) -> int | None:
    return idx.shape[0] if isinstance(idx, torch.Tensor) and idx.dim() == 2 else None


def _check_cfg(cfg: GPTConfig, cfg_scale, cfg_interval) -> float:
    if cfg_scale is None:
        cfg_scale = cfg.cfg_scale
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) \
            or cfg_scale < 1:
        raise ValueError(f"cfg_scale must be a finite number >= 1 (1: no guidance), got {cfg_scale!r}")
    if cfg_scale > 1 and not cfg.has_null_class:
        raise ValueError("cfg_scale > 1 needs the null class, which this model lacks (class_dropout_prob = 0: its "
                         "class table has no null row)")
    if isinstance(cfg_interval, bool) or not isinstance(cfg_interval, int) or cfg_interval < -1:
        raise ValueError(f"cfg_interval must be an int >= -1 (-1: guidance on every token), got {cfg_interval!r}")
    return float(cfg_scale)


def _loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    if targets is None:
        return None
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def _llamagen_state_dict(checkpoint, trust_checkpoint: bool, map_location) -> dict:
    """The state_dict of a LlamaGen checkpoint (a path or a dict): under 'model', 'module' or 'state_dict' (the
    first present), or the bare dict, as sample_c2i.py reads it."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint: no such file {path!r}")
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=not trust_checkpoint)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint {path!r} holds Python objects besides tensors (LlamaGen's training checkpoints keep "
                f"their argparse arguments), and loading those would run code from the file. It was read with "
                f"torch.load(weights_only=True), which refused: {str(e).splitlines()[0]}\n"
                f"If you trust where this file comes from, pass trust_checkpoint=True.") from None
    elif not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint: expected a path or a dict, got {type(checkpoint).__name__}")
    for key in ("model", "module", "state_dict"):
        if key in checkpoint:
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint: the weights are a {type(checkpoint).__name__}, not a dict of tensors")
    return load_torch_checkpoint(dict(checkpoint))  # checks every entry is a tensor


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
def generate_reference(model: GPT, idx: torch.Tensor | None, max_new_tokens: int, *, class_labels=None,
                       cfg_scale: float | None = None, cfg_interval: int = -1, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The cache-free sampler: the whole sequence through ``model.forward`` at every step (minGPT's ``sample``,
    quadratic); for a llama model with CFG the conditional and null-class rows as one batch, mixed as
    :meth:`GPT.generate` does. The same sampling as :meth:`GPT.generate`, so the same generator gives the same
    tokens (and the same shape: no prompt, only the new tokens)."""
    _check_sampling(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        if not model.is_llama:
            x = idx.long()
            for _ in range(max_new_tokens):
                logits, _ = model(x)
                nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                x = torch.cat((x, nxt[:, None]), dim=1)
            return x
        labels = class_labels.long()
        B = labels.shape[0]
        cfg_scale = _check_cfg(model.config, cfg_scale, cfg_interval)
        guided = cfg_scale > 1
        if guided:
            labels = torch.cat((labels, torch.full_like(labels, model.config.num_classes)))
        x = torch.empty((B, 0), dtype=torch.int64, device=labels.device) if idx is None else idx.long()
        for n in range(max_new_tokens):
            logits, _ = model(torch.cat((x, x)) if guided else x, class_labels=labels)
            logits = logits[:, -1, :]
            if guided:
                cond, uncond = logits.split(B)
                use = cfg_interval == -1 or n - 1 <= cfg_interval
                logits = uncond + (cond - uncond) * cfg_scale if use else cond
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            x = torch.cat((x, nxt[:, None]), dim=1)
    finally:
        model.train(was_training)
    return x
