"""The benchmark suite: providers, sizes and a runner that writes stamped CSV/JSON/plots.

- :mod:`vqkernels.bench.nearest_code` -- the providers (our backends and the peers: taming-transformers'
  full distance matrix, vector-quantize-pytorch's cdist, FAISS IndexFlatL2, and a bare matmul as the
  floor) and the sizes (taken from real models) of the ``nearest_code`` op.
- :mod:`vqkernels.bench.quantizer` -- the providers and sizes of a quantizer training step (forward +
  backward + EMA update): our ``VectorQuantizer`` / ``VectorQuantize`` against taming-transformers'
  ``VectorQuantizer2`` and vector-quantize-pytorch's ``VectorQuantize``.
- :mod:`vqkernels.bench.runner` -- measures time, throughput, peak extra memory and correctness of
  every (provider, size, dtype, threads) case, each in a fresh subprocess by default, and writes the
  results. ``vqkernels bench`` and ``python benchmarks/run.py`` call :func:`runner.main`.

Nothing here is imported by ``import vqkernels``; importing this package imports no GPU library and
compiles nothing.
"""
from __future__ import annotations

# Which module holds the providers and sizes of each benchmarked op.
OPS = {"nearest_code": "vqkernels.bench.nearest_code", "quantizer": "vqkernels.bench.quantizer"}

__all__ = ["OPS"]
