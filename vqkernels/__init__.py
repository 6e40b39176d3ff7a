"""vqkernels: fused kernels for vector quantization (nearest-code search, VQ loss) and the stack on top.

``import vqkernels`` is cheap: it queries no GPU and compiles nothing. The C++/CUDA extension
``vqkernels._C`` is loaded on first use; :func:`info` says whether it was built and with what.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._backend import BACKENDS, BackendNotSupported, use_backend
from .ops.nearest_code import nearest_code
from .ops.vq_loss import vq_loss  # noqa: E402
from .ops.vq_loss import vector_quantize  # noqa: E402
from .ops.vq_loss import ema_update_  # noqa: E402
from .ops.vq_loss import ema_update_from_stats_  # noqa: E402
from .ops.vq_loss import code_stats  # noqa: E402
from .ops.vq_loss import code_usage  # noqa: E402
from .nn import VectorQuantize, VectorQuantizer  # noqa: E402

__all__ = ["BACKENDS", "BackendNotSupported", "info", "nearest_code", "use_backend", "__version__"]
__all__ += ["VectorQuantize", "VectorQuantizer"]


def info(as_text: bool = False):
    """Versions, device, what ``_C`` was built with, whether Triton can run, and which backend each op picks here."""
    from ._info import collect, format_info

    d = collect()
    return format_info(d) if as_text else d
