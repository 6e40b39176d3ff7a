"""Thin modules over the vqkernels ops: drop-in quantizers for taming-transformers and vector-quantize-pytorch."""
from .attention import CausalSelfAttention, KVCache
from .quantizer import VectorQuantize, VectorQuantizer
from .residual_vq import ResidualVQ

__all__ = ["VectorQuantize", "VectorQuantizer", "ResidualVQ", "CausalSelfAttention", "KVCache"]
