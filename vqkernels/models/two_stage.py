"""The two-stage image model: a frozen VQGAN turns images into code indices, a GPT models the codes.

taming-transformers' ``Net2NetTransformer`` for its unconditional (a start-of-sequence token, taming's
``SOSProvider``) and class-conditional (a class token, taming's ``Labelator``) cases. As in taming, the
conditioning token shares ``tok_emb`` with the codes, without an offset: class c is token c, the start token
is ``sos_token``. The state_dict keys are taming's (``first_stage_model.*``, ``transformer.*``; its cond stage
and identity permuter have no weights), so a taming checkpoint loads through :meth:`VQGANTransformer.from_taming`.

With a LLaMA-family GPT (``GPTConfig(arch="llama")``, LlamaGen's class-conditional models) the class is not a
token: the GPT embeds it (its class embedding, with a null class for classifier-free guidance) and the sequence is
the image codes alone. A LlamaGen tokenizer + GPT pair loads through :meth:`VQGANTransformer.from_llamagen` and
``sample(n, class_label=..., cfg_scale=..., cfg_interval=...)`` draws as LlamaGen's ``sample_c2i.py``::

    model = VQGANTransformer.from_llamagen("vq_ds16_c2i.pt", "VQ-16", "c2i_B_256.pt", "GPT-B")
    images = model.sample(8, class_label=[207, 360, 387, 974, 88, 979, 417, 279], cfg_scale=4.0, top_k=2000)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._config import Config
from ._checkpoint import (CheckpointError, PretrainedMixin, check_state_dict, load_torch_checkpoint, load_yaml_config,
                          select_prefix)
from .gpt import GPT, GPTConfig
from .vqgan import VQGANConfig, VQModel

__all__ = ["VQGANTransformerConfig", "VQGANTransformer"]

_NET2NET = "taming.models.cond_transformer.Net2NetTransformer"
_MINGPT = "taming.modules.transformer.mingpt.GPT"
_SOS = "taming.modules.util.SOSProvider"
_LABELATOR = "taming.modules.util.Labelator"
_IDENTITY = "taming.modules.transformer.permuter.Identity"


def _is_llama(gpt: GPTConfig) -> bool:
    return getattr(gpt, "arch", "mingpt") == "llama"


@dataclass
class VQGANTransformerConfig(Config):
    gpt: GPTConfig
    vqgan: VQGANConfig
    # minGPT: None is unconditional (sos_token first), else class c is the first token. llama: the GPT's
    # num_classes (set from it when None): the GPT embeds the class itself
    n_classes: int | None = None
    sos_token: int = 0
    pkeep: float = 1.0  # training: each code is kept with this probability, else replaced by a random token
    # (h, w) of the code grid sampled; None: resolution / f squared (llama with 2-D RoPE: its block_size's grid)
    latent_size: tuple[int, int] | None = None

    def __post_init__(self):
        if isinstance(self.gpt, dict):
            self.gpt = GPTConfig.from_dict(self.gpt)
        if isinstance(self.vqgan, dict):
            self.vqgan = VQGANConfig.from_dict(self.vqgan)
        llama = _is_llama(self.gpt)
        rope_grid = llama and getattr(self.gpt, "rope", None) == "2d"
        if self.latent_size is None:
            s = math.isqrt(self.gpt.block_size) if rope_grid else self.vqgan.resolution // self.vqgan.downsample_factor
            self.latent_size = (s, s)
        self.latent_size = tuple(int(v) for v in self.latent_size)
        V = self.gpt.vocab_size
        if len(self.latent_size) != 2 or min(self.latent_size) < 1:
            raise ValueError(f"latent_size must be two positive ints (h, w), got {self.latent_size}")
        if V < self.vqgan.n_embed:
            raise ValueError(f"the GPT's vocab_size ({V}) must cover the VQGAN's {self.vqgan.n_embed} codes")
        if llama:
            self._check_llama(rope_grid)
            return
        if self.n_classes is None:
            if not 0 <= self.sos_token < V:
                raise ValueError(f"sos_token must be a token id in [0, vocab_size = {V}), got {self.sos_token}")
        elif isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int) or not 1 <= self.n_classes <= V:
            raise ValueError(f"n_classes must be None (unconditional) or an int in [1, vocab_size = {V}] (class c "
                             f"is token c, as taming's Labelator), got {self.n_classes!r}")
        if not 0.0 <= self.pkeep <= 1.0:
            raise ValueError(f"pkeep must be in [0, 1], got {self.pkeep}")
        h, w = self.latent_size
        if h * w > self.gpt.block_size:  # the model sees the condition token + h*w - 1 codes
            raise ValueError(f"block_size ({self.gpt.block_size}) must hold the {h}x{w} = {h * w} positions "
                             f"(one conditioning token + {h * w - 1} codes) of a sample")

    def _check_llama(self, rope_grid: bool) -> None:
        gpt, (h, w) = self.gpt, self.latent_size
        if self.n_classes is None:
            self.n_classes = gpt.num_classes
        elif self.n_classes != gpt.num_classes:
            raise ValueError(f"n_classes ({self.n_classes}) must be the llama GPT's num_classes ({gpt.num_classes}): "
                             f"its class embedding holds the classes")
        if self.sos_token != 0:
            raise ValueError("sos_token is for a minGPT model; a llama GPT starts from its class embedding")
        if rope_grid and not (h == w and h * w == gpt.block_size):
            raise ValueError(f"the llama GPT's 2-D RoPE places its block_size = {gpt.block_size} tokens on a square "
                             f"grid; latent_size must be that grid, got {h}x{w}")
        if h * w > gpt.block_size:
            raise ValueError(f"block_size ({gpt.block_size}) must hold the {h}x{w} = {h * w} codes of a sample")

    @classmethod
    def from_taming(cls, config) -> "VQGANTransformerConfig":
        """From taming's Net2NetTransformer YAML (path or dict, ``model: {target, params}``) or its ``params``.

        Supported: ``transformer_config`` mingpt.GPT; ``first_stage_config`` taming's VQModel;
        ``cond_stage_config`` ``__is_unconditional__`` / SOSProvider (or ``unconditional: true``) and
        Labelator; ``permuter_config`` absent or Identity. Other conditionings (depth, segmentation,
        ``__is_first_stage__``) and permuters are refused with NotImplementedError."""
        cfg = load_yaml_config(config)
        if "model" in cfg:
            cfg = cfg["model"]
        if "target" in cfg:
            if cfg["target"] != _NET2NET:
                raise NotImplementedError(f"config: model target {cfg['target']!r} is not supported; "
                                          f"expected {_NET2NET}")
            cfg = cfg.get("params", {})
        for key in ("transformer_config", "first_stage_config"):
            if key not in cfg:
                raise ValueError(f"config: Net2NetTransformer params need {key!r}; got keys {sorted(cfg)}")
        tc = cfg["transformer_config"]
        if tc.get("target") != _MINGPT:
            raise NotImplementedError(f"config: transformer_config target {tc.get('target')!r} is not supported; "
                                      f"only {_MINGPT}")
        gpt = GPTConfig.from_dict(dict(tc.get("params", {})))
        vqgan = VQGANConfig.from_taming(cfg["first_stage_config"])

        permuter = cfg.get("permuter_config")
        if permuter is not None and permuter.get("target") != _IDENTITY:
            raise NotImplementedError(f"config: permuter_config target {permuter.get('target')!r} is not supported; "
                                      f"only the identity ({_IDENTITY}, or none): codes are modelled in raster order")
        sos_token = int(cfg.get("sos_token", 0))
        cond = cfg.get("cond_stage_config")
        n_classes = None
        if cfg.get("unconditional", False) or cond == "__is_unconditional__":
            pass
        elif isinstance(cond, dict) and cond.get("target") == _SOS:
            sos_token = int(cond.get("params", {}).get("sos_token", sos_token))
        elif isinstance(cond, dict) and cond.get("target") == _LABELATOR:
            n_classes = int(cond["params"]["n_classes"])
        else:
            what = cond if isinstance(cond, str) else (cond or {}).get("target")
            raise NotImplementedError(
                f"config: cond_stage_config {what!r} is not supported; only unconditional models "
                f"(__is_unconditional__, {_SOS}) and class-conditional ones ({_LABELATOR})")
        return cls(gpt=gpt, vqgan=vqgan, n_classes=n_classes, sos_token=sos_token,
                   pkeep=float(cfg.get("pkeep", 1.0)))


class VQGANTransformer(nn.Module, PretrainedMixin):
    """A frozen :class:`VQModel` first stage and a :class:`GPT` over its code indices (raster order).

    ``forward(x, c=None) -> (logits (B, h*w, vocab), target (B, h*w))`` as taming's: x images (B, C, H, W),
    c class ids (B,) for a class-conditional model (ignored by an unconditional one). While training with
    ``pkeep < 1`` the GPT's inputs (not the targets) are corrupted as taming does.
    ``sample(n, class_label=...) -> images``; ``sample_codes`` returns the code grid.

    With a llama GPT the class goes to the GPT's class embedding (``class_labels``), the codes follow it, and
    sampling takes classifier-free guidance (``cfg_scale``, ``cfg_interval``, as LlamaGen's ``generate``).
    ``first_stage_model`` / ``transformer``: already built modules of exactly these configs (what the loaders
    pass, so that the weights are not allocated twice).
    """

    config_class = VQGANTransformerConfig

    def __init__(self, config: VQGANTransformerConfig, *, first_stage_model: VQModel | None = None,
                 transformer: GPT | None = None):
        super().__init__()
        if not isinstance(config, VQGANTransformerConfig):
            raise TypeError(f"VQGANTransformer(config): expected a VQGANTransformerConfig, got {type(config).__name__}")
        if first_stage_model is not None and first_stage_model.config != config.vqgan:
            raise ValueError("first_stage_model: its config is not config.vqgan")
        if transformer is not None and transformer.config != config.gpt:
            raise ValueError("transformer: its config is not config.gpt")
        self.config = config
        self.first_stage_model = VQModel(config.vqgan) if first_stage_model is None else first_stage_model
        self.first_stage_model.requires_grad_(False)
        self.first_stage_model.eval()
        self.transformer = GPT(config.gpt) if transformer is None else transformer

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage_model.eval()  # frozen: always in eval mode, as taming's disabled_train
        return self

    @property
    def conditional(self) -> bool:
        return self.config.n_classes is not None

    @property
    def is_llama(self) -> bool:
        """Whether the GPT is LLaMA-family (LlamaGen's): the class goes to its class embedding, not into the codes."""
        return _is_llama(self.config.gpt)

    # -- tokens --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_to_z(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> code indices (B, h*w) int64, raster order."""
        _, _, (_, _, indices) = self.first_stage_model.encode(x)
        return indices.reshape(x.shape[0], -1).long()

    def class_labels(self, batch: int, c=None, device=None) -> torch.Tensor:
        """The class of each sequence (B,) int64 from an int or B ids, checked against the model's classes. A llama
        GPT trained with class dropout also takes its null class, ``n_classes`` (unconditional rows)."""
        if c is None:
            raise ValueError(f"this model is class-conditional ({self.config.n_classes} classes): pass class labels")
        c = torch.as_tensor(c, device=device)
        if c.dim() == 0:
            c = c.expand(batch)
        if c.dim() != 1 or c.shape[0] != batch or c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"class labels must be an int or {batch} integer ids (B,), got "
                             f"{tuple(c.shape)} {c.dtype}")
        top = self.config.n_classes
        null = self.is_llama and self.config.gpt.class_dropout_prob > 0
        if c.numel():
            lo, hi = (int(v) for v in torch.aminmax(c))
            if lo < 0 or hi >= top + int(null):
                raise ValueError(f"class label {lo if lo < 0 else hi} is outside the model's classes "
                                 f"[0, {top})" + (f" and its null class {top}" if null else ""))
        return c.long()

    def cond_tokens(self, batch: int, c=None, device=None) -> torch.Tensor:
        """The conditioning token of each sequence (B, 1) int64: the class id, or sos_token (minGPT models)."""
        if self.is_llama:
            raise ValueError("a llama GPT has no conditioning token: its class goes to the class embedding "
                             "(see class_labels)")
        if not self.conditional:
            return torch.full((batch, 1), self.config.sos_token, dtype=torch.int64, device=device)
        return self.class_labels(batch, c, device)[:, None]

    # -- training ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor | None, c=None, *, codes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # codes (B, L): the codes of x already computed (training on a fixed data set encodes it once)
        z = self.encode_to_z(x) if codes is None else codes.long()  # (B, L)
        if self.is_llama:
            labels = self.class_labels(z.shape[0], c, z.device)  # (B,)
        else:
            cond = self.cond_tokens(z.shape[0], c, z.device)  # (B, 1)
        if self.training and self.config.pkeep < 1.0:
            # taming's corruption: keep each code with probability pkeep, else a uniform random token
            keep = torch.bernoulli(self.config.pkeep * torch.ones(z.shape, device=z.device)).round().long()
            rand = torch.randint_like(z, self.config.gpt.vocab_size)
            a = keep * z + (1 - keep) * rand
        else:
            a = z
        if self.is_llama:
            # the class embedding first, then codes 0..L-2: output i predicts code i (LlamaGen's training)
            logits, _ = self.transformer(a[:, :-1], class_labels=labels)  # (B, L, V)
            return logits, z
        cz = torch.cat((cond, a), dim=1)  # (B, 1 + L)
        logits, _ = self.transformer(cz[:, :-1])  # (B, L, V)
        logits = logits[:, cond.shape[1] - 1:]  # output i predicts code i
        return logits, z

    def training_loss(self, x: torch.Tensor, c=None) -> torch.Tensor:
        """Cross-entropy of the codes of x (taming's shared_step)."""
        logits, target = self(x, c)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))

    # -- sampling ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample_codes(self, n: int, *, class_label=None, cfg_scale: float | None = None, cfg_interval: int = -1,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """n code grids (n, h, w) int64 drawn from the GPT (cached decoding; see :meth:`GPT.generate`).

        cfg_scale, cfg_interval: classifier-free guidance of a llama GPT (None: its ``config.cfg_scale``); a minGPT
        model takes neither."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        device = next(self.parameters()).device
        if not self.conditional and class_label is not None:
            raise ValueError("this model is unconditional: class_label must be None")
        h, w = self.config.latent_size
        if self.is_llama:
            labels = self.class_labels(n, class_label, device)
            tokens = self.transformer.generate(None, h * w, class_labels=labels, cfg_scale=cfg_scale,
                                               cfg_interval=cfg_interval, temperature=temperature, top_k=top_k,
                                               top_p=top_p, generator=generator)
            return tokens.reshape(n, h, w)
        if (cfg_scale is not None and cfg_scale != 1) or cfg_interval != -1:
            raise ValueError("cfg_scale and cfg_interval (classifier-free guidance) need a llama GPT with a null "
                             "class; this model's GPT is minGPT")
        cond = self.cond_tokens(n, class_label, device)
        tokens = self.transformer.generate(cond, h * w, temperature=temperature, top_k=top_k, top_p=top_p,
                                           generator=generator)
        return tokens[:, cond.shape[1]:].reshape(n, h, w)

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids (n, h, w) -> images (n, C, h*f, w*f) in the first stage's range (about [-1, 1])."""
        return self.first_stage_model.decode_code(codes)

    @torch.inference_mode()
    def sample(self, n: int, *, class_label=None, cfg_scale: float | None = None, cfg_interval: int = -1,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) (not clamped; about [-1, 1]): codes from the GPT, decoded by the first stage.
        class_label: an int or n ids for a class-conditional model; cfg_scale / cfg_interval: classifier-free
        guidance (llama GPTs, see :meth:`sample_codes`). Timing: ``transformer.last_generate_stats``."""
        codes = self.sample_codes(n, class_label=class_label, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                  temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return self.decode_codes(codes)

    # -- taming checkpoints --------------------------------------------------------------------------

    @classmethod
    def from_taming(cls, checkpoint, config, *, trust_checkpoint: bool = False,
                    map_location="cpu") -> "VQGANTransformer":
        """Load a taming-transformers Net2NetTransformer.

        checkpoint: a Lightning ``last.ckpt`` path, such a dict, or a state_dict (``first_stage_model.*``,
            ``transformer.*``); read with ``torch.load(weights_only=True)`` unless ``trust_checkpoint=True``.
        config: taming's YAML (path or dict) for the Net2NetTransformer (see
            :meth:`VQGANTransformerConfig.from_taming` for what is supported), or a VQGANTransformerConfig.
        The first stage's ``loss.*`` entries are ignored; minGPT's attention masks are checked and dropped;
        every other key and shape must match.
        """
        cfg = config if isinstance(config, VQGANTransformerConfig) else VQGANTransformerConfig.from_taming(config)
        sd = load_torch_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint, map_location=map_location)
        model = cls(cfg)
        first = select_prefix(sd, "first_stage_model.", drop=("loss.",))
        gpt = select_prefix(sd, "transformer.")
        other = [k for k in sd if not k.startswith(("first_stage_model.", "transformer."))]
        if other:
            raise CheckpointError(f"checkpoint: entries outside first_stage_model.* and transformer.* (a cond stage "
                                  f"or permuter with weights is not supported): {other[:5]}")
        extra = {f"quantize.{k}" for k in ("cluster_size", "embed_sum", "initted")}
        check_state_dict(model.first_stage_model, first, what="checkpoint's first_stage_model", ignore_missing=extra)
        model.first_stage_model.load_state_dict(first, strict=True)
        masks = {k for k in gpt if k.endswith(".attn.mask")}
        check_state_dict(model.transformer, {k: v for k, v in gpt.items() if k not in masks},
                         what="checkpoint's transformer")
        model.transformer.load_state_dict(gpt, strict=True)  # the masks are validated by the attention's load hook
        return model.eval()

    # -- LlamaGen checkpoints ------------------------------------------------------------------------

    @classmethod
    def from_llamagen(cls, vq_checkpoint, vq_config="VQ-16", gpt_checkpoint=None, gpt_config="GPT-B", *,
                      latent_size: tuple[int, int] | None = None, trust_checkpoint: bool = False,
                      map_location="cpu", **gpt_overrides) -> "VQGANTransformer":
        """A LlamaGen image tokenizer and class-conditional GPT as one model (what its ``sample_c2i.py`` pairs).

        vq_checkpoint, vq_config: see :meth:`VQModel.from_llamagen` ('VQ-16', 'VQ-8' or its ModelArgs).
        gpt_checkpoint, gpt_config, gpt_overrides: see :meth:`GPT.from_llamagen` ('GPT-B' ... with ModelArgs
            overrides). As sample_c2i.py, ``vocab_size`` defaults to the tokenizer's codebook size; ``block_size``
            (LlamaGen's ``latent_size ** 2``, ``latent_size = image_size // downsample_size``) must be given for
            anything but its 256-token default (16 x 16 codes: 256 px with VQ-16).
        latent_size: the (h, w) code grid sampled; None: the GPT's block_size as a square grid.
        """
        if gpt_checkpoint is None:
            raise ValueError("gpt_checkpoint is required (a LlamaGen GPT checkpoint, path or dict)")
        first = VQModel.from_llamagen(vq_checkpoint, vq_config, trust_checkpoint=trust_checkpoint,
                                      map_location=map_location)
        gpt_overrides.setdefault("vocab_size", first.config.n_embed)
        gpt = GPT.from_llamagen(gpt_checkpoint, gpt_config, trust_checkpoint=trust_checkpoint,
                                map_location=map_location, **gpt_overrides)
        cfg = VQGANTransformerConfig(gpt=gpt.config, vqgan=first.config, latent_size=latent_size)
        return cls(cfg, first_stage_model=first, transformer=gpt).eval()
