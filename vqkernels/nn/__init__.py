"""Thin modules over the vqkernels ops: drop-in quantizers for taming-transformers and vector-quantize-pytorch."""
from .attention import CausalSelfAttention, KVCache
from .quantizer import VectorQuantize, VectorQuantizer
from .fsq import FSQ
from .lfq import LFQ

__all__ = ["VectorQuantize", "VectorQuantizer", "CausalSelfAttention", "KVCache"]
__all__ += ["FSQ", "LFQ"]
