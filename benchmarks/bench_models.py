"""pytest-benchmark module for the models: a VQGAN training step, encoding and decoding, and GPT sampling and a
training step; the runner's providers (ours, taming-transformers, Hugging Face GPT-2).

    pytest benchmarks/bench_models.py --benchmark-only             # small sizes (a few minutes on 2 cores)
    VQKERNELS_BENCH_SIZES=suite pytest benchmarks/bench_models.py --benchmark-only    # the suites' sizes

taming's modules need stand-ins to import (``benchmarks/peers.py``, installed into this benchmark process);
Hugging Face transformers, when it is installed only in a separate folder (``make bench`` puts it in
``.venv/hf-packages``), or while taming's stand-in for it holds the process, is skipped here with the reason:
the runner (``python benchmarks/run.py --ops vqgan gpt``) measures every provider in its own process.

``extra_info``: images/s (VQGAN) or tokens/s (GPT), the peak extra memory of one call. Environment: see
``harness/pytest_bench.py`` (VQKERNELS_BENCH_SIZES applies to both suites: a named size of either).
"""
from __future__ import annotations

import pytest

from benchmarks.suites import gpt, vqgan
from benchmarks.harness.protocol import Case

from benchmarks.harness.pytest_bench import case_id, run_case, suite_cases

_V, _G = vqgan.SUITE, gpt.SUITE
SMALL_VQGAN = [Case(vqgan.Size("cpu", 2, 64), "fp32", vqgan.PROVIDER_NAMES, m) for m in vqgan.MODES]
SMALL_GPT = [Case(gpt.Size(2, 64, 4, 8, 256, 1024), "fp32", gpt.SAMPLE_PROVIDERS, "sample"),
             Case(gpt.Size(2, 256, 4, 8, 256, 1024), "fp32", gpt.TRAIN_PROVIDERS, "train")]


def _cases(suite, small):
    try:
        return suite_cases(suite, small)
    except SystemExit:  # VQKERNELS_BENCH_SIZES names the other suite's sizes
        return []


VQGAN_CASES = _cases(_V, SMALL_VQGAN)
GPT_CASES = _cases(_G, SMALL_GPT)


@pytest.mark.parametrize("case,provider", VQGAN_CASES, ids=[case_id(_V, c, p) for c, p in VQGAN_CASES])
def test_vqgan(benchmark, case, provider):
    info = run_case(benchmark, _V, case, provider)
    assert info["images_per_s"] > 0


@pytest.mark.parametrize("case,provider", GPT_CASES, ids=[case_id(_G, c, p) for c, p in GPT_CASES])
def test_gpt(benchmark, case, provider):
    info = run_case(benchmark, _G, case, provider)
    assert info["tokens_per_s"] > 0
