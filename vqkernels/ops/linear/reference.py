"""linear in pure PyTorch: the spec and the oracle of ``vqkernels.ops.linear``.

Function computed (by every backend): ``y = x @ weight^T + bias``, x (..., K), weight (N, K) (``nn.Linear``'s
(out, in) layout), bias (N,) or None, y (..., N) in x's dtype.
Arithmetic: ``F.linear`` in the inputs' own dtype, on any device, float64 included: the tests' truth is this
function on float64 copies of the inputs, against which a float32 kernel's error is measured. It allocates nothing
beyond y, so it is memory-bounded for any number of rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None -> x @ weight^T + bias (..., N), in the inputs' dtype."""
    return F.linear(x, weight, bias)


__all__ = ["linear_reference"]
