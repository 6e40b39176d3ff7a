"""Rotary position embeddings (RoPE) as LlamaGen builds them, and RMSNorm.

A RoPE table holds, for each position of the sequence, the (cos, sin) of the angle of each pair of channels of a
head: (positions, head_dim / 2, 2). :func:`apply_rope` rotates channel pairs (2i, 2i + 1) of q or k by those
angles (the interleaved layout of LLaMA and LlamaGen, not GPT-NeoX's halves).

- :func:`rope_table_2d` (LlamaGen's ``precompute_freqs_cis_2d``): image tokens on a ``grid x grid`` raster;
  the first head_dim / 4 pairs turn with the token's row, the last head_dim / 4 with its column, each with
  the frequencies ``base ** (-4 i / head_dim)``.
- :func:`rope_table_1d` (LlamaGen's ``precompute_freqs_cis``): position t turns pair i by ``t * base ** (-2 i /
  head_dim)``.

Both tables are built on the CPU (also inside a ``torch.device('meta')`` context) and start with ``cls_token_num`` rows of zeros for the conditioning positions, as LlamaGen's do. Note
what a zero row does: cos = sin = 0 multiplies q and k by zero there (it does not leave them unrotated), so a
class token's key scores 0 against every query and its query attends uniformly. We keep that, because it is
the function LlamaGen's checkpoints were trained with.

The tables are built in float64 and rounded once to the dtype they are used in; the rotation runs in float32
(float64 for float64 inputs) and is rounded back to the input's dtype, as LlamaGen computes it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["rope_table_1d", "rope_table_2d", "apply_rope", "RMSNorm", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and the half types (LlamaGen's ``.float()``), float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dims(head_dim: int, multiple: int, what: str) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < multiple or head_dim % multiple:
        raise ValueError(f"{what}: head_dim must be a positive multiple of {multiple}, got {head_dim!r}")


def _with_cls_rows(angles: torch.Tensor, cls_token_num: int) -> torch.Tensor:
    """angles (T, head_dim / 2) -> (cls_token_num + T, head_dim / 2, 2): zero rows, then (cos, sin)."""
    if isinstance(cls_token_num, bool) or not isinstance(cls_token_num, int) or cls_token_num < 0:
        raise ValueError(f"cls_token_num must be an int >= 0, got {cls_token_num!r}")
    table = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)  # (T, hd/2, 2)
    return torch.cat((table.new_zeros(cls_token_num, *table.shape[1:]), table))


def rope_table_1d(seq_len: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """(cls_token_num + seq_len, head_dim / 2, 2) float64: position t (after the class rows) turns channel pair i
    by t * base ** (-2 i / head_dim)."""
    _check_dims(head_dim, 2, "rope_table_1d")
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))  # (hd/2,)
    t = torch.arange(seq_len, dtype=torch.float64, device="cpu")
    return _with_cls_rows(torch.outer(t, freqs), cls_token_num)


def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """(cls_token_num + grid_size ** 2, head_dim / 2, 2) float64: the token at raster position (r, c) turns its
    first head_dim / 4 channel pairs by r * f_i and its last head_dim / 4 by c * f_i, f_i = base ** (-4 i / head_dim)."""
    _check_dims(head_dim, 4, "rope_table_2d")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float64, device="cpu") / half))  # (hd/4,)
    axis = torch.outer(torch.arange(grid_size, dtype=torch.float64, device="cpu"), freqs)  # (grid, hd/4)
    angles = torch.cat((axis[:, None, :].expand(-1, grid_size, -1),  # row angle
                        axis[None, :, :].expand(grid_size, -1, -1)), dim=-1)  # column angle: (grid, grid, hd/2)
    return _with_cls_rows(angles.flatten(0, 1), cls_token_num)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, head_dim), table (T, head_dim / 2, 2) (cos, sin) -> x with channel pairs (2i, 2i + 1) rotated:
    (x0 cos - x1 sin, x1 cos + x0 sin); computed in :func:`compute_dtype` (the table's dtype should be it),
    returned contiguous in x's dtype."""
    B, T, H, D = x.shape
    xs = x.to(compute_dtype(x.dtype)).reshape(B, T, H, D // 2, 2)
    x0, x1 = xs.unbind(-1)  # (B, T, H, D/2) each
    cos = table[None, :, None, :, 0]  # (1, T, 1, D/2)
    sin = table[None, :, None, :, 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(3).to(x.dtype)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension; the normalisation computed in float32
    (float64 for float64 inputs) and rounded to x's dtype before the weight multiplies it, as LlamaGen's
    RMSNorm. Parameter: ``weight`` (dim,), ones at init."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight
