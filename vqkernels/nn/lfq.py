"""Lookup-free quantization (LFQ, MAGVIT-v2 / Open-MAGVIT2), a drop-in for vector-quantize-pytorch's ``LFQ``.

Each of d dimensions is quantized to -s or +s (s = ``codebook_scale``), so a code is d bits: 2^d codes with
no codebook to store or search. The entropy loss (per-sample entropy low, codebook entropy high) is
:func:`vqkernels.ops.lfq_entropy.lfq_entropy`: exact for the whole batch at every size, never the
N x 2^d distribution VQP builds (14.3 GB at 8192 tokens, d = 16), so ``frac_per_sample_entropy`` is
accepted for compatibility but not needed.

Same constructor names, forward, outputs (``Return(quantized, indices, entropy_aux_loss)``, and with
``return_loss_breakdown`` ``LossBreakdown(per_sample_entropy, batch_entropy, commitment)``) and state_dict
keys (``mask``, ``project_in.*``, ``project_out.*``) as VQP 1.32 for its core options. One difference:
the per-sample entropy is the exact entropy, where VQP's carries a 1e-5 clamp (see the op's docstring).
"""
from __future__ import annotations

import math
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.lfq_entropy import lfq_entropy

__all__ = ["LFQ"]

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])


class LFQ(nn.Module):
    """Lookup-free quantizer (vector-quantize-pytorch 1.32 ``LFQ``'s core options).

    Args (keyword-only, VQP's names and defaults):
        dim: input feature dimension (default: codebook_dim * num_codebooks).
        codebook_size: 2^d codes per codebook, a power of two (default 2^dim).
        entropy_loss_weight (0.1), commitment_loss_weight (0.), diversity_gamma (1.): the aux loss is
            ``w_ent * (per_sample_entropy - gamma * codebook_entropy) + w_commit * mean((x - sg[q])^2)``.
        num_codebooks (1), keep_num_codebooks_dim (None: num_codebooks > 1).
        codebook_scale (1.): the code values +-s.
        frac_per_sample_entropy (1.): < 1 samples that fraction of the tokens for both entropies, drawing the
            same random numbers as VQP (so one seed gives both the same subset). Unnecessary here.
        has_projections (None: dim != codebook_dim * num_codebooks), projection_has_bias (True).
        soft_clamp_input_value (None): tanh soft clamp of the input to [-v, v] (v >= codebook_scale).
        channel_first (None: for inputs of 4 or more dimensions).
        experimental_softplus_entropy_loss (False), entropy_loss_offset (5.).
        spherical (False): BSQ, inputs and codes l2-normalised times codebook_scale.
        force_quantization_f32 (True): quantize and compute the losses in float32.
        entropy_eps (1e-5): the clamp of VQP's codebook entropy (0: the exact entropy).
        backend: the vqkernels backend of the entropy op (None: the usual choice).

    ``forward(x, inv_temperature=100., return_loss_breakdown=False)``: x (B, N, dim) or channel-first
    (B, dim, ...) -> ``Return(quantized like x, indices int64 (B, N[, C]) or (B, ...[, C]), aux_loss 0-d)``.
    """

    def __init__(self, *, dim=None, codebook_size=None, entropy_loss_weight=0.1, commitment_loss_weight=0.,
                 diversity_gamma=1., num_codebooks=1, keep_num_codebooks_dim=None, codebook_scale=1.,
                 frac_per_sample_entropy=1., has_projections=None, projection_has_bias=True,
                 soft_clamp_input_value=None, channel_first=None, experimental_softplus_entropy_loss=False,
                 entropy_loss_offset=5., spherical=False, force_quantization_f32=True, entropy_eps=1e-5,
                 backend=None):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size (either may be None, not both)")
        if codebook_size is not None:
            if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2 \
                    or codebook_size & (codebook_size - 1):
                hint = f" (suggested {2 ** math.ceil(math.log2(codebook_size))})" \
                    if isinstance(codebook_size, int) and codebook_size > 2 else ""
                raise ValueError(f"codebook_size must be a power of two >= 2 for lookup-free quantization, "
                                 f"got {codebook_size!r}{hint}")
        else:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"dim must be a positive int, got {dim!r}")
            codebook_size = 2 ** dim
        if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy}")
        if not codebook_scale > 0:
            raise ValueError(f"codebook_scale must be > 0, got {codebook_scale}")
        if soft_clamp_input_value is not None and not soft_clamp_input_value >= codebook_scale:
            raise ValueError(f"soft_clamp_input_value must be >= codebook_scale ({codebook_scale}), "
                             f"got {soft_clamp_input_value}")
        if not 0 <= entropy_eps <= 1:
            raise ValueError(f"entropy_eps must be in [0, 1], got {entropy_eps}")
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim must be True (or None) when num_codebooks > 1")

        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim = codebook_size.bit_length() - 1
        if codebook_dim > 30:
            raise ValueError(f"codebook_size must be at most 2^30, got 2^{codebook_dim}")
        codebook_dims = codebook_dim * num_codebooks
        self.dim = dim = codebook_dims if dim is None else dim
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep
        self.has_projections = codebook_dims != dim if has_projections is None else bool(has_projections)
        if self.has_projections:
            self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias)
        else:
            if dim != codebook_dims:
                raise ValueError(f"without projections dim ({dim}) must equal codebook_dim * num_codebooks "
                                 f"({codebook_dims})")
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.channel_first = channel_first
        self.spherical = spherical
        self.codebook_scale = float(codebook_scale)
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.force_quantization_f32 = force_quantization_f32
        self.entropy_eps = float(entropy_eps)
        self.backend = backend
        # VQP's state: `mask` (persistent: the one state_dict key), `zero` (not); its (2^d, d) `codebook`
        # buffer is never built here (4 GB at d = 30): codes come from indices by bit masks.
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.), persistent=False)

    # ----------------------------------------------------------------------------------------

    def _maybe_l2norm(self, t):
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def bits_to_codes(self, bits):
        return bits * self.codebook_scale * 2 - self.codebook_scale

    @property
    def dtype(self):
        return torch.float32

    def indices_to_codes(self, indices, project_out=True):
        """indices (..., [C]) -> codes (..., dim) (channel-first for image/video-shaped indices, as VQP)."""
        is_img_or_video = indices.ndim >= (3 + int(self.keep_num_codebooks_dim))
        transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = ((indices[..., None].int() & self.mask) != 0).to(self.dtype)
        codes = self._maybe_l2norm(self.bits_to_codes(bits))
        codes = codes.flatten(-2)  # (..., C * d)
        if project_out:
            codes = self.project_out(codes)
        if transpose:
            codes = codes.movedim(-1, 1)
        return codes

    def _entropy_scale(self, inv_temperature: float) -> float:
        """The bit logit per unit of x: 4 tau s (see the op), with s the codes' magnitude after l2norm."""
        s = self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale
        return 4.0 * float(inv_temperature) * s

    def forward(self, x, inv_temperature=100., return_loss_breakdown=False):
        is_img_or_video = x.ndim >= 4
        transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if transpose:
            x = x.movedim(1, -1)  # (B, ..., dim)
            spatial = x.shape[1:-1]
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, dim)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected the feature dimension {self.dim}, got input of shape {tuple(x.shape)}")

        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            v = self.soft_clamp_input_value
            x = (x / v).tanh() * v
        B, N = x.shape[0], x.shape[1]
        x = x.reshape(B, N, self.num_codebooks, self.codebook_dim)  # (B, N, C, d)
        x = self._maybe_l2norm(x)

        orig_dtype = x.dtype
        if self.force_quantization_f32:
            x = x.float()
        original_input = x
        s = self.codebook_scale
        quantized = torch.where(x > 0, torch.full_like(x, s), torch.full_like(x, -s))
        indices = ((quantized > 0).int() * self.mask.int()).sum(-1)  # (B, N, C) int64
        quantized = self._maybe_l2norm(quantized)

        if self.training:
            x = x + (quantized - x).detach()
            flat = original_input.reshape(B * N, self.num_codebooks, self.codebook_dim)
            if self.frac_per_sample_entropy < 1.:
                # VQP's draw, on the default generator, so one seed picks the same tokens on both sides.
                num_tokens = flat.shape[0]
                keep = int(num_tokens * self.frac_per_sample_entropy)
                flat = flat[torch.randn(num_tokens).argsort(dim=-1) < keep]
            per_sample_entropy, codebook_entropy = lfq_entropy(
                flat, scale=self._entropy_scale(inv_temperature), eps=self.entropy_eps, backend=self.backend)
            entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            if self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
        else:
            x = quantized
            entropy_aux_loss = per_sample_entropy = codebook_entropy = self.zero

        if self.training and self.commitment_loss_weight > 0.:
            commit_loss = F.mse_loss(original_input, quantized.detach())
        else:
            commit_loss = self.zero

        if self.force_quantization_f32:
            x = x.to(orig_dtype)
        x = x.reshape(B, N, self.num_codebooks * self.codebook_dim)
        x = self.project_out(x)
        if transpose:
            x = x.reshape(B, *spatial, x.shape[-1]).movedim(-1, 1)
            indices = indices.reshape(B, *spatial, self.num_codebooks)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)

        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        ret = Return(x, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)
