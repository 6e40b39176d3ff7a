"""Finite scalar quantization (FSQ, Mentzer et al. 2023), a drop-in for vector-quantize-pytorch's ``FSQ``.

Each of the d = len(levels) dimensions is bounded (tanh) to its level count and rounded with a straight-through
gradient: an implicit codebook of prod(levels) codes with nothing to learn and nothing to collapse. The work is
elementwise (a few torch ops on (N, d)); no kernel of its own beats torch's there. Unlike VQP 1.32 the implicit
codebook (prod(levels) x d) is never allocated at construction (VQP's once tried to allocate 34 GB):
``implicit_codebook`` builds it on request, ``indices_to_codes`` decodes indices directly.

Same constructor names and defaults, ``forward(z) -> (out, indices)``, ``codes_to_indices``,
``indices_to_codes``, ``indices_to_level_indices`` and state_dict keys (none, beyond ``project_in.*`` and
``project_out.*``) as VQP 1.32, for its core options (the orthogonal rotation is not provided).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["FSQ"]


def _round_ste(z):
    return z + (z.round() - z).detach()


def _floor_ste(z):
    return z + (z.floor() - z).detach()


class FSQ(nn.Module):
    """Finite scalar quantizer (vector-quantize-pytorch 1.32 ``FSQ``).

    Args:
        levels: the number of levels of each code dimension (ints >= 2; a 2 needs ``preserve_symmetry``).
        dim: input feature dimension (default len(levels) * num_codebooks; otherwise linear projections).
        num_codebooks (1), keep_num_codebooks_dim (None: num_codebooks > 1), scale (unused, as VQP),
        allowed_dtypes ((float32, float64): others are quantized in float32 when force_quantization_f32),
        channel_first (False), projection_has_bias (True), return_indices (True), force_quantization_f32 (True),
        preserve_symmetry (False), noise_dropout (0.), bound_hard_clamp (False): VQP's meaning.

    ``forward(z)``: z (B, N, dim), or (B, dim, ...) channel-first (4+ dimensions, or ``channel_first``) ->
    ``(out like z, indices int32 (B, N[, C]) (int64 when prod(levels) >= 2^31) or None)``.
    """

    def __init__(self, levels, dim=None, num_codebooks=1, keep_num_codebooks_dim=None, scale=None,
                 allowed_dtypes=(torch.float32, torch.float64), channel_first=False, projection_has_bias=True,
                 return_indices=True, force_quantization_f32=True, preserve_symmetry=False, noise_dropout=0.,
                 bound_hard_clamp=False):
        super().__init__()
        if not isinstance(levels, (list, tuple)) or len(levels) == 0 or \
                any(isinstance(v, bool) or not isinstance(v, int) for v in levels):
            raise TypeError(f"levels must be a non-empty list or tuple of ints, got {levels!r}")
        if any(v < 2 for v in levels):
            raise ValueError(f"every level must be >= 2, got levels={list(levels)}")
        if any(v == 2 for v in levels) and not preserve_symmetry:
            raise ValueError(f"a level of 2 needs preserve_symmetry=True (or use a level >= 3), got "
                             f"levels={list(levels)}")
        if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        if not 0 <= noise_dropout <= 1:
            raise ValueError(f"noise_dropout must be in [0, 1], got {noise_dropout}")
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True")
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim must be True (or None) when num_codebooks > 1")
        levels = list(levels)
        self.levels = levels
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.codebook_size = math.prod(levels)
        self._index_dtype = torch.int32 if self.codebook_size < 2**31 else torch.int64
        self.register_buffer("_basis", torch.tensor(basis, dtype=self._index_dtype), persistent=False)
        self.scale = scale
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep
        self.dim = self.effective_codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.return_indices = return_indices
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32
        self.bound_hard_clamp = bound_hard_clamp

    # ----------------------------------------------------------------------------------------

    def bound(self, z, eps=1e-3, hard_clamp=False):
        """Bound z (..., d) to the levels and round (straight-through), normalised to [-1, 1]."""
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        if hard_clamp:
            bounded = (z + offset / half_l).clamp(-1., 1.) * half_l - offset
        else:
            bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        return _round_ste(bounded) / (self._levels // 2)

    def symmetry_preserving_bound(self, z, hard_clamp=False):
        """QL(x) = 2 / (L - 1) * [(L - 1) * (tanh(x) + 1) / 2 + 0.5] - 1 (arXiv 2411.19842, 3.2)."""
        lm1 = self._levels - 1
        t = z.clamp(-1., 1.) if hard_clamp else torch.tanh(z)
        return (2. / lm1) * _floor_ste(lm1 * (t + 1) / 2. + 0.5) - 1.

    def quantize(self, z):
        fn = self.symmetry_preserving_bound if self.preserve_symmetry else self.bound
        return fn(z, hard_clamp=self.bound_hard_clamp)

    def _maybe_apply_noise(self, z):
        if not self.training or self.noise_dropout == 0.:
            return z
        mask = torch.full_like(z, self.noise_dropout).bernoulli_().bool()
        offset = torch.rand_like(z) - 0.5
        return torch.where(mask, z + offset, z).clamp(-1., 1.)

    def _scale_and_shift(self, zhat):
        if self.preserve_symmetry:
            return (zhat + 1.) / (2. / (self._levels - 1))
        half = self._levels // 2
        return zhat * half + half

    def _scale_and_shift_inverse(self, zhat):
        if self.preserve_symmetry:
            return zhat * (2. / (self._levels - 1)) - 1.
        half = self._levels // 2
        return (zhat - half) / half

    def indices_to_level_indices(self, indices):
        """indices (...) -> the level index of each dimension (..., d)."""
        return (indices[..., None] // self._basis) % self._levels

    def _indices_to_codes(self, indices):
        return self._scale_and_shift_inverse(self.indices_to_level_indices(indices))

    @property
    def implicit_codebook(self):
        """The (prod(levels), d) codebook, built on request (VQP keeps it as a buffer from construction)."""
        return self._indices_to_codes(torch.arange(self.codebook_size, device=self._levels.device))

    def codes_to_indices(self, zhat):
        """Codes (..., d) -> indices (...), int32 (int64 when the codebook has 2^31 codes or more)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must have last dimension {self.codebook_dim}, got shape {tuple(zhat.shape)}")
        zhat = self._scale_and_shift(zhat)
        if self._index_dtype == torch.int64:
            # float32 cannot hold indices past 2^24 exactly: sum the integer level indices instead
            return (zhat.round().long() * self._basis).sum(dim=-1)
        return (zhat * self._basis).sum(dim=-1).round().to(self._index_dtype)  # VQP's arithmetic

    def indices_to_codes(self, indices):
        """Indices (..., [C]) -> codes (..., dim) (projected out; channel-first for image/video shapes, as VQP)."""
        is_img_or_video = indices.ndim >= (3 + int(self.keep_num_codebooks_dim))
        codes = self._indices_to_codes(indices)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        codes = self.project_out(codes)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def forward(self, z):
        move = z.ndim >= 4 or self.channel_first
        if move:
            z = z.movedim(1, -1)  # (B, ..., dim)
            spatial = z.shape[1:-1]
            z = z.reshape(z.shape[0], -1, z.shape[-1])  # (B, N, dim)
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected the feature dimension {self.dim}, got input of shape {tuple(z.shape)}")
        z = self.project_in(z)
        B, N = z.shape[0], z.shape[1]
        z = z.reshape(B, N, self.num_codebooks, self.codebook_dim)  # (B, N, C, d)
        orig_dtype = z.dtype
        if self.force_quantization_f32 and orig_dtype not in self.allowed_dtypes:
            z = z.float()
        codes = self.quantize(z)
        indices = self.codes_to_indices(codes) if self.return_indices else None  # (B, N, C)
        codes = self._maybe_apply_noise(codes)
        codes = codes.reshape(B, N, self.effective_codebook_dim).to(orig_dtype)
        out = self.project_out(codes)
        if move:
            out = out.reshape(B, *spatial, out.shape[-1]).movedim(-1, 1)
            if indices is not None:
                indices = indices.reshape(B, *spatial, self.num_codebooks)
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices
