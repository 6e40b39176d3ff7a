"""The benchmark suites: providers, sizes and a runner that writes stamped CSV/JSON/plots.

Each suite's module holds a ``SUITE`` (:class:`benchmarks.harness.protocol.Suite`): its sizes (a named tuple of its
own dimensions), modes, throughput metrics, providers (ours, the reference, the peers people run today, a
floor) and correctness check.

- :mod:`.nearest_code` -- the search alone, (N, K, D), GFLOP/s; peers taming, vector-quantize-pytorch, FAISS.
- :mod:`.quantizer` -- a quantizer training step, (N, K, D), tokens/s; peers taming, vector-quantize-pytorch.
- :mod:`.attention` -- attention forward / backward / cached decoding, (B, H, T, Dh), TFLOP/s and GB/s; peers
  PyTorch SDPA per backend, flash-attn, minGPT's explicit-mask attention.
- :mod:`.vqgan` -- a VQGAN training step, encoding and decoding, (config, batch, resolution), images/s; peer
  taming-transformers.
- :mod:`.gpt` -- GPT sampling and a training step, (batch, tokens, layers, heads, width, vocab), tokens/s;
  peers taming's minGPT samplers and Hugging Face transformers' GPT-2 generate.
- :mod:`.linear` -- the few-row inference linear of a decoding step, (rows, width, layers), GB/s of weights read;
  peers F.linear, addmm on transposed weights, MKL's packed linear.
- :mod:`.runner` -- the command line (``vqkernels bench``, ``python benchmarks/run.py``); see its docstring for
  the modules that plan, measure, isolate, meter memory, stamp and report.

Nothing here is imported by ``import vqkernels``; importing this package imports no GPU library, no peer and
compiles nothing.
"""
from __future__ import annotations

# Which module holds the SUITE of each benchmarked op, in the order `--ops all` runs them.
OPS = {
    "nearest_code": "benchmarks.suites.nearest_code",
    "quantizer": "benchmarks.suites.quantizer",
    "attention": "benchmarks.suites.attention",
    "vqgan": "benchmarks.suites.vqgan",
    "gpt": "benchmarks.suites.gpt",
    "linear": "benchmarks.suites.linear",
}
# What `vqkernels bench` runs without --ops: the kernel suites, minutes on 2 cores. `--ops all` adds attention
# and the models (a CPU run of the models' suites takes tens of minutes: taming's sampler recomputes the prefix).
DEFAULT_OPS = ("nearest_code", "quantizer")
# Names for several suites at once (`--ops models`).
OP_GROUPS = {"all": tuple(OPS), "models": ("vqgan", "gpt")}

__all__ = ["OPS", "DEFAULT_OPS", "OP_GROUPS"]
