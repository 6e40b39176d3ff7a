"""Thin modules over the vqkernels ops: drop-in quantizers for taming-transformers and vector-quantize-pytorch."""
from .attention import CausalSelfAttention, KVCache, RotaryCausalSelfAttention
from .fsq import FSQ
from .lfq import LFQ
from .quantizer import VectorQuantize, VectorQuantizer
from .residual_vq import ResidualVQ
from .rope import RMSNorm, apply_rope, rope_table_1d, rope_table_2d

__all__ = ["VectorQuantize", "VectorQuantizer", "ResidualVQ", "FSQ", "LFQ", "CausalSelfAttention",
           "RotaryCausalSelfAttention", "KVCache", "RMSNorm", "apply_rope", "rope_table_1d", "rope_table_2d"]
