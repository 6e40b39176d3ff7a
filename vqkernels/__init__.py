"""vqkernels: fused kernels for vector quantization (nearest-code search, VQ loss) and attention, and the VQGAN +
GPT stack on top (``vqkernels.models``).

``import vqkernels`` is cheap: it queries no GPU and compiles nothing. The C++/CUDA extension
``vqkernels._C`` is loaded on first use; :func:`info` says whether it was built and with what.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._backend import BACKENDS, BackendNotSupported, use_backend
from .nn import FSQ, LFQ, CausalSelfAttention, KVCache, ResidualVQ, VectorQuantize, VectorQuantizer
from .ops.attention import attention, attention_with_kv_cache, causal_attention
from .ops.nearest_code import nearest_code
from .ops.code_stats import code_stats, code_usage, ema_update_, ema_update_from_stats_
from .ops.vq_loss import vector_quantize, vq_loss
from .ops.lfq_entropy import lfq_entropy

__all__ = [
    "BACKENDS", "BackendNotSupported", "use_backend", "info", "__version__",
    "nearest_code", "vq_loss", "vector_quantize", "ema_update_", "ema_update_from_stats_", "code_stats",
    "code_usage", "lfq_entropy", "VectorQuantizer", "VectorQuantize", "ResidualVQ", "FSQ", "LFQ",
    "attention", "causal_attention", "attention_with_kv_cache", "CausalSelfAttention", "KVCache",
]


def info(as_text: bool = False):
    """Versions, device, what ``_C`` was built with, whether Triton can run, and which backend each op picks here."""
    from ._info import collect, format_info

    d = collect()
    return format_info(d) if as_text else d
