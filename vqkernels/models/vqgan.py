"""VQGAN (Esser et al. 2021): taming-transformers' first stage, in one file, on vqkernels' ops.

Encoder -> quant_conv -> VectorQuantizer (fused nearest-code search + VQ loss) -> post_quant_conv -> Decoder.
The attention blocks run :func:`vqkernels.ops.attention.attention` over the H*W positions (one head of
C channels). Module names, state_dict keys, methods and return values are taming's
(``taming.models.vqgan.VQModel`` without its ``loss.*``), so a taming ``last.ckpt`` and its YAML load with
:meth:`VQModel.from_taming` and reconstruct the same image::

    model = VQModel.from_taming("logs/.../checkpoints/last.ckpt", "logs/.../configs/project.yaml")
    indices = model.tokenize(x)                  # (B, h, w) int64
    x_rec = model.decode_code(indices)           # (B, 3, H, W)
    model.save_pretrained("vqgan-f16")           # config.json + model.safetensors

LlamaGen's image tokenizer (FoundationVision/LlamaGen, ``tokenizer/tokenizer_image/vq_model.py``) is the same
network with other module names, attention at the coarsest level only, an optional decoder ``ch_mult`` of its own
and an l2-normalised low-dimensional codebook (16384 codes of 8); ``layout="llamagen"`` names the modules as it
does, so its checkpoints load key for key::

    model = VQModel.from_llamagen("vq_ds16_c2i.pt", "VQ-16")  # weights under "model", as LlamaGen saves them
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._config import Config
from ..nn.quantizer import VectorQuantizer
from ..ops.attention import attention
from ._checkpoint import (PretrainedMixin, check_state_dict, load_torch_checkpoint, load_yaml_config,
                          peer_model_args, select_prefix)

__all__ = ["VQGANConfig", "VQModel", "Encoder", "Decoder", "ResnetBlock", "AttnBlock", "codebook_entropy_loss"]


# ---------------------------------------------------------------------------------------------
# config

# taming's ddconfig keys (Encoder/Decoder arguments); anything else in a ddconfig is refused
_DDCONFIG_FIELDS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                    "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "give_pre_end")
# taming VQModel's params besides ddconfig/lossconfig that describe the network (the rest is training glue)
_VQMODEL_PARAMS = ("n_embed", "embed_dim", "remap", "sane_index_shape")
_VQMODEL_IGNORED = ("ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor", "lossconfig",
                    # latent-diffusion's copy of the class (its f4/f8 VQ models) adds training options
                    "batch_resize_range", "scheduler_config", "lr_g_factor", "use_ema")
# the classes whose checkpoints hold this architecture under these keys
_TARGETS = ("taming.models.vqgan.VQModel", "ldm.models.autoencoder.VQModel")


# LlamaGen's tokenizer ModelArgs (tokenizer/tokenizer_image/vq_model.py), with its defaults
_LLAMAGEN_ARGS = dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                      commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=(1, 1, 2, 2, 4),
                      decoder_ch_mult=(1, 1, 2, 2, 4), z_channels=256, dropout_p=0.0)
# its named models (VQ_models): only the channel multipliers differ
_LLAMAGEN_MODELS = {"VQ-16": dict(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
                    "VQ-8": dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4))}
# LlamaGen's VectorQuantizer keeps the last 65536 code indices it chose while training (codebook_used)
LLAMAGEN_USAGE_WINDOW = 65536
# the softmax temperature of LlamaGen's entropy loss (compute_entropy_loss's default, the one it trains with)
LLAMAGEN_ENTROPY_TEMPERATURE = 0.01


@dataclass
class VQGANConfig(Config):
    # taming's ddconfig (defaults: the f16, 1024-code ImageNet model)
    double_z: bool = False
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    give_pre_end: bool = False
    # the codebook
    n_embed: int = 1024
    embed_dim: int = 256
    # the quantizer's options, as vqkernels.VectorQuantizer takes them (taming: beta 0.25, legacy)
    beta: float = 0.25
    legacy: bool = True
    remap: str | None = None
    sane_index_shape: bool = False
    decay: float | None = None
    threshold_ema_dead_code: float = 0.0
    use_cosine_sim: bool = False  # l2-normalised inputs and codes (LlamaGen's codebook_l2_norm)
    codebook_dim: int | None = None
    # LlamaGen's tokenizer (see VQGANConfig.from_llamagen)
    layout: Literal["taming", "llamagen"] = "taming"  # the module names, so the state_dict keys are the peer's
    decoder_ch_mult: tuple[int, ...] | None = None  # the decoder's own multipliers (None: ch_mult), same length
    codebook_show_usage: bool = False  # keep LlamaGen's quantize.codebook_used window of the last chosen codes
    # GroupNorm's groups on every width (taming and LlamaGen: 32). With 32 channels that is one channel a group,
    # which normalises away each channel's mean over the image: a narrow model (ch 32) then cannot pass a tile's
    # colour through its codes and guesses it from the texture; fewer groups keep the channels' relative means.
    norm_groups: int = 32
    entropy_loss_ratio: float = 0.0  # weight of LlamaGen's codebook entropy loss, added to the loss in training

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.layout not in ("taming", "llamagen"):
            raise ValueError(f"VQGANConfig: layout must be 'taming' or 'llamagen', got {self.layout!r}")
        if self.decoder_ch_mult is not None:
            self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
            if len(self.decoder_ch_mult) != len(self.ch_mult) or min(self.decoder_ch_mult) < 1:
                raise ValueError(
                    f"VQGANConfig: decoder_ch_mult must be positive ints, as many as ch_mult ({len(self.ch_mult)}: "
                    f"the decoder upsamples by the factor the encoder downsamples by), got {self.decoder_ch_mult}")
        if isinstance(self.entropy_loss_ratio, bool) or not isinstance(self.entropy_loss_ratio, (int, float)) \
                or not self.entropy_loss_ratio >= 0:
            raise ValueError(f"VQGANConfig: entropy_loss_ratio must be a number >= 0, got {self.entropy_loss_ratio!r}")
        if self.double_z:
            raise ValueError("VQGANConfig: double_z=True is not supported (taming's VQModel breaks with it too: "
                             "quant_conv expects z_channels inputs); published VQGAN configs use double_z: False")
        for name in ("z_channels", "resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "n_embed",
                     "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"VQGANConfig: {name} must be a positive int, got {v!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"VQGANConfig: ch_mult must be a non-empty sequence of positive ints, got {self.ch_mult}")
        g = self.norm_groups
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ValueError(f"VQGANConfig: norm_groups must be a positive int, got {g!r}")
        for m in (1,) + self.ch_mult + self.decoder_mult:  # GroupNorm(norm_groups) on every width
            if (self.ch * m) % g:
                raise ValueError(f"VQGANConfig: every width ch * ch_mult (and ch * decoder_ch_mult) must be a multiple "
                                 f"of norm_groups ({g}: GroupNorm's groups); ch={self.ch}, ch_mult={self.ch_mult}, "
                                 f"decoder_ch_mult={self.decoder_ch_mult}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def decoder_mult(self) -> tuple[int, ...]:
        """The decoder's channel multipliers (``decoder_ch_mult``, else ``ch_mult``)."""
        return self.ch_mult if self.decoder_ch_mult is None else self.decoder_ch_mult

    @classmethod
    def from_llamagen(cls, config="VQ-16", **model_args) -> "VQGANConfig":
        """LlamaGen's tokenizer config: a model name (``"VQ-16"``, ``"VQ-8"``, as its ``VQ_models``), a dict (or
        dataclass) of its ``ModelArgs`` fields, or a VQGANConfig (returned as is). ``model_args`` override fields, as
        LlamaGen's ``VQ_16(codebook_size=..., codebook_embed_dim=...)`` does.

        LlamaGen's Encoder/Decoder are taming's with ch 128, 2 ResNet blocks a level, 3 -> 3 channels and attention
        at the coarsest level; ``resolution`` (which it does not have: any multiple of the downsampling factor
        works) is set to its 256 training size and ``attn_resolutions`` to that level. Its quantizer is
        ``use_cosine_sim=codebook_l2_norm``, ``beta=commit_loss_beta`` with ``legacy=False`` (beta weights the
        commitment term).
        """
        if isinstance(config, VQGANConfig):
            if model_args:
                raise ValueError("VQGANConfig.from_llamagen: overrides are for LlamaGen's ModelArgs, not a VQGANConfig")
            return config
        a = peer_model_args(config, model_args, named=_LLAMAGEN_MODELS, fields=_LLAMAGEN_ARGS,
                            what="LlamaGen tokenizer", also=" or a VQGANConfig")
        enc, dec = tuple(a["encoder_ch_mult"]), tuple(a["decoder_ch_mult"])
        if len(enc) != len(dec):
            raise NotImplementedError(
                f"config: encoder_ch_mult {list(enc)} and decoder_ch_mult {list(dec)} have different lengths (a decoder "
                f"whose output size differs from its input's); only equal lengths are supported")
        resolution = max(256, 2 ** (len(enc) - 1))
        return cls(z_channels=a["z_channels"], resolution=resolution, in_channels=3, out_ch=3, ch=128, ch_mult=enc,
                   num_res_blocks=2, attn_resolutions=(resolution // 2 ** (len(enc) - 1),), dropout=a["dropout_p"],
                   n_embed=a["codebook_size"], embed_dim=a["codebook_embed_dim"], beta=a["commit_loss_beta"],
                   legacy=False, use_cosine_sim=a["codebook_l2_norm"], layout="llamagen",
                   decoder_ch_mult=None if dec == enc else dec, codebook_show_usage=a["codebook_show_usage"],
                   entropy_loss_ratio=a["entropy_loss_ratio"])

    @classmethod
    def from_taming(cls, config) -> "VQGANConfig":
        """From taming's YAML (path or dict: ``model: {target, params}``), its ``params``, or a VQGANConfig."""
        if isinstance(config, VQGANConfig):
            return config
        cfg = load_yaml_config(config)
        if "model" in cfg:
            cfg = cfg["model"]
        if "target" in cfg:
            target = cfg["target"]
            if target not in _TARGETS:
                raise NotImplementedError(
                    f"config: model target {target!r} is not supported; only {' and '.join(_TARGETS)} (the "
                    f"VectorQuantizer2 VQGAN) load into vqkernels' VQModel (GumbelVQ, EMAVQ and the conditional "
                    f"models have other quantizers or inputs)")
            cfg = cfg.get("params", {})
        if "ddconfig" not in cfg:
            raise ValueError("config: expected taming's VQModel params with a 'ddconfig' (or the whole YAML with "
                             f"model.target/params); got keys {sorted(cfg)}")
        dd = dict(cfg["ddconfig"])
        unknown = sorted(set(dd) - set(_DDCONFIG_FIELDS))
        if unknown:
            raise ValueError(f"config: ddconfig field(s) {unknown} are not taming's (it has {list(_DDCONFIG_FIELDS)})")
        unknown = sorted(set(cfg) - set(_VQMODEL_PARAMS) - set(_VQMODEL_IGNORED) - {"ddconfig"})
        if unknown:
            raise ValueError(f"config: VQModel param(s) {unknown} are not taming's")
        kw = {k: cfg[k] for k in _VQMODEL_PARAMS if k in cfg}
        if "remap" in kw and kw["remap"] is not None:
            kw["remap"] = str(kw["remap"])
        return cls(**dd, **kw)

    @classmethod
    def f16_1024(cls) -> "VQGANConfig":
        """taming's f16 ImageNet model with 1024 codes (vqgan_imagenet_f16_1024)."""
        return cls()

    @classmethod
    def f16_16384(cls) -> "VQGANConfig":
        """taming's f16 ImageNet model with 16384 codes (vqgan_imagenet_f16_16384)."""
        return cls(n_embed=16384)


# ---------------------------------------------------------------------------------------------
# blocks

def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3, twice, plus the (1x1-projected when widths differ) input."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        # F.silu is taming's x * sigmoid(x) in one op, saving one activation for backward instead of two
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, one head of C channels, with a residual connection.

    q/k/v/proj_out are taming's 1x1 convs (their keys); the forward applies them as one (3C, C) matmul on
    the channel-last map, which is the same arithmetic without four separate conv calls.
    """

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.in_channels = channels
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1, 1, 0)
        self.k = nn.Conv2d(channels, channels, 1, 1, 0)
        self.v = nn.Conv2d(channels, channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, 1, H * W, C)  # (B, 1, T, C), T = H*W
        w_qkv = torch.cat([self.q.weight, self.k.weight, self.v.weight]).view(3 * C, C)
        b_qkv = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(h, w_qkv, b_qkv).split(C, dim=-1)  # 3 x (B, 1, T, C)
        o = attention(q, k, v)  # (B, 1, T, C), softmax(q k^T / sqrt(C)) v
        o = F.linear(o, self.proj_out.weight.view(C, C), self.proj_out.bias)  # (B, 1, T, C)
        return x + o.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        if self.with_conv:
            # taming pads right and bottom only (no asymmetric padding in conv2d), then a stride-2 conv
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


def _upsample_conv_kernels(w: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel applied after 2x nearest upsampling, as four 2x2 kernels on the low-resolution map.

    Output row 2i + a of conv3x3(up(x)) reads rows i-1, i, i of x for a = 0 (taps W0 | W1 + W2) and rows i, i, i+1
    for a = 1 (taps W0 + W1 | W2); columns alike. w (Co, Ci, 3, 3) -> (4 * Co, Ci, 2, 2), phases (a, b) in
    order 00, 01, 10, 11.
    """
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),  # a = 0: (Co, Ci, 2, 3)
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))  # a = 1
    k = []
    for r in rows:
        k.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))  # b = 0: (Co, Ci, 2, 2)
        k.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))  # b = 1
    return torch.cat(k, 0)


class Upsample(nn.Module):
    """2x nearest upsampling, then (with_conv) a 3x3 conv: taming's module and keys.

    The conv runs on the low-resolution map as four 2x2 kernels, one per output phase (16 taps per 2x2 output
    block instead of 36): the same function with 2.25x fewer multiply-adds, forward and backward, and no
    upsampled copy of the input.
    """

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        if not self.with_conv:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        B, C, H, W = x.shape
        Co = self.conv.out_channels
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), _upsample_conv_kernels(self.conv.weight))  # (B, 4*Co, H+1, W+1)
        y = y.view(B, 2, 2, Co, H + 1, W + 1)
        # phase (a, b) is the window starting at (a, b); interleave the four into (B, Co, 2H, 2W)
        out = torch.stack([torch.stack([y[:, a, b, :, a:a + H, b:b + W] for b in (0, 1)], -1) for a in (0, 1)], -3)
        out = out.reshape(B, Co, 2 * H, 2 * W)  # (B, Co, H, 2, W, 2) -> (B, Co, 2H, 2W)
        return out + self.conv.bias.view(1, Co, 1, 1)


class _Level(nn.Module):
    """One resolution of the encoder/decoder: its ResNet blocks, the attention after each (when the
    resolution is in attn_resolutions) and the resampling (taming's ``down[i]`` / ``up[i]``, LlamaGen's
    ``conv_blocks[i]``). The ResNet blocks are ``block`` (taming) or ``res`` (LlamaGen)."""

    def __init__(self, blocks, attns, blocks_name: str = "block"):
        super().__init__()
        self._blocks_name = blocks_name
        setattr(self, blocks_name, nn.ModuleList(blocks))
        self.attn = nn.ModuleList(attns)

    def forward(self, h):
        for i, block in enumerate(getattr(self, self._blocks_name)):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """ResNet block, attention, ResNet block (taming's names)."""

    def __init__(self, channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class _MidList(nn.ModuleList):
    """The same three blocks as LlamaGen names them (``mid.0``, ``mid.1``, ``mid.2``)."""

    def __init__(self, channels: int, dropout: float, groups: int = 32):
        super().__init__([ResnetBlock(channels, channels, dropout, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, dropout, groups)])

    def forward(self, h):
        for block in self:
            h = block(h)
        return h


def _mid(cfg: VQGANConfig, channels: int) -> nn.Module:
    return (_MidList if cfg.layout == "llamagen" else _Mid)(channels, cfg.dropout, cfg.norm_groups)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = 2^(len(ch_mult) - 1).

    Levels finest first: taming's ``down``, LlamaGen's ``conv_blocks`` (``layout="llamagen"``)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, ch_mult = cfg.ch, cfg.ch_mult
        llamagen = cfg.layout == "llamagen"
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        res = cfg.resolution
        in_mult = (1,) + ch_mult
        levels = []
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * in_mult[i], ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.norm_groups))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, cfg.norm_groups))
            level = _Level(blocks, attns, "res" if llamagen else "block")
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_out, cfg.resamp_with_conv)
                res //= 2
            levels.append(level)
        if llamagen:
            self.conv_blocks = nn.ModuleList(levels)
        else:
            self.down = nn.ModuleList(levels)
        c = ch * ch_mult[-1]
        self.mid = _mid(cfg, c)
        self.norm_out = Normalize(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, 1, 1)

    def levels(self) -> nn.ModuleList:
        """The levels, finest first."""
        return self.conv_blocks if hasattr(self, "conv_blocks") else self.down

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.levels():
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f).

    Its widths are ``ch * decoder_mult``. Levels: taming's ``up`` finest first, LlamaGen's ``conv_blocks``
    coarsest first (the order each runs them in reversed / in order)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, ch_mult = cfg.ch, cfg.decoder_mult
        llamagen = cfg.layout == "llamagen"
        self.give_pre_end = cfg.give_pre_end
        c = ch * ch_mult[-1]
        res = cfg.resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, 1, 1)
        self.mid = _mid(cfg, c)
        ups = []
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, c_out, cfg.dropout, cfg.norm_groups))
                c = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, cfg.norm_groups))
            level = _Level(blocks, attns, "res" if llamagen else "block")
            if i != 0:
                level.upsample = Upsample(c_out, cfg.resamp_with_conv)
                res *= 2
            ups.append(level)  # coarsest first
        if llamagen:
            self.conv_blocks = nn.ModuleList(ups)
        else:
            self.up = nn.ModuleList(ups[::-1])  # up[0] is the finest level, as taming
        self.norm_out = Normalize(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, 1, 1)

    def levels(self) -> list[nn.Module]:
        """The levels in the order they run, coarsest first."""
        return list(self.conv_blocks) if hasattr(self, "conv_blocks") else list(reversed(self.up))

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, ch * decoder_mult[-1], h, w)
        for level in self.levels():
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)


# ---------------------------------------------------------------------------------------------
# the model

class VQModel(nn.Module, PretrainedMixin):
    """taming's ``VQModel`` (the VQGAN first stage) without its Lightning training glue and loss.

    Layout: NCHW by default, which reproduces taming's outputs to 1e-5. For training on the CPU, convert the model
    and the loss with ``.to(memory_format=torch.channels_last)``: oneDNN's convolutions then run without
    reordering (a training step measured ~8% less CPU time), at the price of another rounding order.

    ``encode(x) -> (quant, emb_loss, (perplexity, None, indices))``, ``decode(quant) -> x_rec``,
    ``forward(x) -> (x_rec, emb_loss)``, ``tokenize(x) -> (B, h, w)`` int64 indices,
    ``decode_code(indices (B, h, w)) -> x_rec``, ``get_last_layer()`` (the decoder's ``conv_out.weight``,
    for the adaptive GAN weight). x is (B, in_channels, H, W) with H, W multiples of
    :attr:`downsample_factor`.
    """

    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig):
        super().__init__()
        if not isinstance(config, VQGANConfig):
            raise TypeError(f"VQModel(config): expected a VQGANConfig, got {type(config).__name__} "
                            f"(use VQModel.from_taming for a taming YAML/dict)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(
            config.n_embed, config.embed_dim, beta=config.beta, remap=config.remap,
            sane_index_shape=config.sane_index_shape, legacy=config.legacy, decay=config.decay,
            threshold_ema_dead_code=config.threshold_ema_dead_code, use_cosine_sim=config.use_cosine_sim,
            codebook_dim=config.codebook_dim)
        if config.layout == "llamagen" and config.use_cosine_sim:
            # LlamaGen starts from unit codes (its uniform draw, then l2-normalised): the same search, but
            # codes of norm ~1/n_embed would get ~n_embed times larger gradients through the normalisation
            with torch.no_grad():
                self.quantize.embedding.weight.copy_(F.normalize(self.quantize.embedding.weight, dim=-1))
        if config.codebook_show_usage:
            # LlamaGen's window of the last chosen code indices (float, as it keeps them), in its state_dict
            self.quantize.register_buffer("codebook_used", torch.zeros(LLAMAGEN_USAGE_WINDOW))
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_images(self, x, name="x"):
        cfg, f = self.config, self.config.downsample_factor
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected images (B, {cfg.in_channels}, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"{name}: expected {cfg.in_channels} channels (B, {cfg.in_channels}, H, W), got "
                             f"{x.shape[1]} in {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % f or W % f or H == 0 or W == 0:
            raise ValueError(f"{name}: height and width must be positive multiples of the downsampling factor "
                             f"{f} (2^(len(ch_mult)-1)), got {H}x{W}; pad or crop the images first")

    # -- taming's methods ---------------------------------------------------------------------
    def encode(self, x):
        """x (B, C, H, W) -> (quant (B, embed_dim, h, w), emb_loss, (perplexity, None, indices)).

        While training, emb_loss also holds ``entropy_loss_ratio`` times LlamaGen's entropy loss (its
        ``vq_loss + commit_loss + entropy_loss`` in one scalar), and ``codebook_show_usage`` records the
        chosen codes in ``quantize.codebook_used``."""
        self._check_images(x)
        h = self.quant_conv(self.encoder(x))  # (B, embed_dim, h, w)
        quant, loss, info = self.quantize(h)
        if self.training:
            if self.config.entropy_loss_ratio > 0:
                loss = loss + self.config.entropy_loss_ratio * self._entropy_loss(h)
            if self.config.codebook_show_usage:
                self._record_usage(info[2])
        return quant, loss, info

    def _entropy_loss(self, h):
        q = self.quantize
        z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()  # (N, embed_dim)
        if q.project_in is not None:
            z = q.project_in(z)
        return codebook_entropy_loss(z, q.embedding.weight.float(), cosine=self.config.use_cosine_sim)

    @torch.no_grad()
    def _record_usage(self, indices):
        """LlamaGen's rolling window: shift out the oldest, append this batch's indices (the last window's worth)."""
        buf = self.quantize.codebook_used
        idx = indices.reshape(-1)[-buf.numel():].to(buf.dtype)
        n = idx.numel()
        buf.copy_(torch.cat([buf[n:], idx]))

    def codebook_usage(self) -> float:
        """LlamaGen's codebook_usage: distinct values in the ``codebook_used`` window over ``n_embed`` (the window
        starts as zeros, which count as code 0)."""
        if not self.config.codebook_show_usage:
            raise ValueError("codebook_usage needs a config with codebook_show_usage=True (the codebook_used window)")
        return torch.unique(self.quantize.codebook_used).numel() / self.config.n_embed

    def decode(self, quant):
        """quant (B, embed_dim, h, w) -> (B, out_ch, h*f, w*f)."""
        if quant.dim() != 4 or quant.shape[1] != self.config.embed_dim:
            raise ValueError(f"quant: expected (B, {self.config.embed_dim}, h, w), got {tuple(quant.shape)}")
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b):
        """Indices (B, h, w) (as :meth:`tokenize` returns them) -> images (B, out_ch, h*f, w*f)."""
        if not isinstance(code_b, torch.Tensor) or code_b.dim() != 3 or code_b.is_floating_point():
            raise ValueError(f"code_b: expected integer indices (B, h, w), got "
                             f"{tuple(code_b.shape) if isinstance(code_b, torch.Tensor) else type(code_b).__name__}"
                             f"{' of dtype ' + str(code_b.dtype) if isinstance(code_b, torch.Tensor) else ''}")
        n = self.quantize.re_embed
        if code_b.numel() and (int(code_b.min()) < 0 or int(code_b.max()) >= n):
            raise ValueError(f"code_b: indices must lie in [0, {n}), got [{int(code_b.min())}, {int(code_b.max())}]")
        B, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1).long(), (B, h, w, self.config.embed_dim))
        return self.decode(quant)

    def forward(self, input):
        """input (B, C, H, W) -> (reconstruction (B, out_ch, H, W), emb_loss)."""
        quant, diff, _ = self.encode(input)
        return self.decode(quant), diff

    def get_last_layer(self):
        return self.decoder.conv_out.weight

    # -- beyond taming -------------------------------------------------------------------------
    @torch.no_grad()
    def tokenize(self, x):
        """Images (B, C, H, W) -> code indices (B, H/f, W/f), int64 (remapped when the config has ``remap``)."""
        _, _, (_, _, indices) = self.encode(x)
        f = self.config.downsample_factor
        return indices.reshape(x.shape[0], x.shape[2] // f, x.shape[3] // f).long()

    @classmethod
    def from_taming(cls, checkpoint, config, *, trust_checkpoint: bool = False, map_location="cpu") -> "VQModel":
        """Load a taming-transformers VQGAN.

        checkpoint: a Lightning ``last.ckpt`` path (``{"state_dict": ...}``), or such a dict, or a state_dict.
            Read with ``torch.load(weights_only=True)``; ``trust_checkpoint=True`` unpickles it fully (only for
            files whose origin you trust: unpickling can run code).
        config: taming's YAML (path or parsed dict: ``model: {target: taming.models.vqgan.VQModel, params:
            {embed_dim, n_embed, ddconfig, lossconfig}}``), its ``params`` dict, or a :class:`VQGANConfig`.
        The ``loss.*`` entries (LPIPS, discriminator) are ignored (and latent-diffusion's ``model_ema.*``); every
        other key and shape must match. latent-diffusion's ``ldm.models.autoencoder.VQModel`` (vq-f4/f8) loads too.
        """
        cfg = VQGANConfig.from_taming(config)
        sd = load_torch_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint, map_location=map_location)
        sd = select_prefix(sd, drop=("loss.", "model_ema."))  # latent-diffusion keeps an EMA copy: the live weights load
        model = cls(cfg)
        # a quantizer with EMA/k-means options fills its extra buffers from a plain taming codebook on load
        extra = {f"quantize.{k}" for k in ("cluster_size", "embed_sum", "initted")}
        check_state_dict(model, sd, what="checkpoint", ignore_missing=extra)
        model.load_state_dict(sd, strict=True)
        return model.eval()

    @classmethod
    def from_llamagen(cls, checkpoint, config="VQ-16", *, ema: bool = False, trust_checkpoint: bool = False,
                      map_location="cpu") -> "VQModel":
        """Load a LlamaGen image tokenizer (``tokenizer/tokenizer_image/vq_model.py``).

        checkpoint: a ``torch.save`` file as LlamaGen's vq_train.py writes it (the weights under ``"model"``; also
            ``"module"`` or ``"state_dict"``, as its samplers accept), such a dict, or a bare state_dict. With
            ``ema=True`` the ``"ema"`` weights load instead (as its reconstruction script prefers). Read with
            ``torch.load(weights_only=True)``; its training checkpoints also hold the argparse ``args``, which only
            ``trust_checkpoint=True`` unpickles (only for files whose origin you trust).
        config: ``"VQ-16"``, ``"VQ-8"``, a dict of its ``ModelArgs`` (e.g. ``{"codebook_size": 16384,
            "codebook_embed_dim": 8}`` on top of the defaults) or a VQGANConfig (see
            :meth:`VQGANConfig.from_llamagen`).
        Every key and shape must match, ``quantize.codebook_used`` included when ``codebook_show_usage`` (its
        default) is set. ``tokenize(x)`` then gives LlamaGen's code indices as (B, h, w) and ``decode_code`` its
        reconstructions.
        """
        cfg = VQGANConfig.from_llamagen(config)
        if cfg.layout != "llamagen":
            raise ValueError("config: a VQGANConfig for from_llamagen needs layout='llamagen' (LlamaGen's key names)")
        keys = ("ema",) if ema else ("model", "module", "state_dict")
        sd = load_torch_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint, map_location=map_location,
                                   state_dict_keys=keys, bare=not ema)
        model = cls(cfg)
        check_state_dict(model, sd, what="checkpoint")
        model.load_state_dict(sd, strict=True)
        return model.eval()


def codebook_entropy_loss(z: torch.Tensor, codebook: torch.Tensor, *, cosine: bool,
                          temperature: float = LLAMAGEN_ENTROPY_TEMPERATURE) -> torch.Tensor:
    """LlamaGen's codebook entropy loss (``compute_entropy_loss(-d)``), z (N, D), codebook (K, D) -> 0-d.

    With p = softmax(-d / temperature) over the codes, d the squared distances (of the l2-normalised vectors with
    ``cosine``): the mean entropy of each p minus the entropy of their mean (with LlamaGen's 1e-5 inside that log).
    Low when each vector is sure of its code and the batch spreads over the codebook. Forms the (N, K) scores, as
    LlamaGen does: a training-time term for codebooks of a few ten thousand codes.
    """
    if cosine:
        z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    d = (z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1) - 2.0 * (z @ codebook.T)  # (N, K)
    logits = d.mul(-1.0 / temperature)
    log_probs = F.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    avg_probs = probs.mean(0)  # (K,)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy
