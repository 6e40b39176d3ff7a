"""Thin modules over the vqkernels ops: drop-in quantizers for taming-transformers and vector-quantize-pytorch."""
from .attention import CausalSelfAttention, KVCache
from .quantizer import VectorQuantize, VectorQuantizer

__all__ = ["VectorQuantize", "VectorQuantizer", "CausalSelfAttention", "KVCache"]
