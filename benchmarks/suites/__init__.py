"""The benchmark suites, one module per benchmarked op or model, each holding a ``SUITE``
(:class:`benchmarks.harness.protocol.Suite`): its sizes (a named tuple of its own dimensions), modes, throughput
metrics, providers (ours, the reference, the peers people run today, a floor) and correctness check.

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

A new suite is a module here with a ``SUITE``, and its name in :data:`SUITES`: the runner (``--ops``, ``--list``),
the pytest-benchmark modules and the tests find every suite through this list. Importing this package imports
no suite (nor torch, nor a peer).
"""
from __future__ import annotations

import importlib

# Every suite, in the order `--ops all` runs them: the name is the suite's module here and its SUITE's op.
SUITES = ("nearest_code", "quantizer", "attention", "vqgan", "gpt", "linear", "residual_vq", "lfq")
# What the runner runs without --ops: the kernel suites, minutes on 2 cores. `--ops all` adds the others (a CPU
# run of the models' suites takes tens of minutes: taming's sampler recomputes the prefix).
DEFAULT_SUITES = ("nearest_code", "quantizer")
# Names for several suites at once (`--ops models`).
GROUPS = {"all": SUITES, "models": ("vqgan", "gpt")}


def load_suite(name: str):
    """The ``SUITE`` of the suite ``name`` (one of :data:`SUITES`)."""
    if name not in SUITES:
        raise SystemExit(f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")
    return importlib.import_module(f"{__name__}.{name}").SUITE


__all__ = ["SUITES", "DEFAULT_SUITES", "GROUPS", "load_suite"]
