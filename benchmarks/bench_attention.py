"""pytest-benchmark module for attention: forward, backward, both, and cached decoding; the runner's providers.

    pytest benchmarks/bench_attention.py --benchmark-only                 # small sizes, fp32: about a minute on 2 cores
    VQKERNELS_BENCH_SIZES=suite pytest benchmarks/bench_attention.py --benchmark-only   # the suite (CPU or GPU sizes)
    VQKERNELS_BENCH_SIZES=4x16x1024x64 VQKERNELS_BENCH_DTYPES=bf16 VQKERNELS_BENCH_MODES=fwdbwd-causal \\
        pytest benchmarks/bench_attention.py --benchmark-only

Sizes are BxHxTxDh; modes fwd, bwd, fwdbwd (each also -causal) and decode (one token per sequence over a cache
of T); see :mod:`benchmarks.suites.attention`. ``extra_info``: TFLOP/s (causal FLOPs halved), decoding tokens/s
and GB/s of cache read, the peak extra memory of one call and the largest difference from a float32
computation (``max_abs_err``). Environment: see ``harness/pytest_bench.py``.
"""
from __future__ import annotations

import pytest

from benchmarks.suites import attention as at
from benchmarks.harness.protocol import Case

from benchmarks.harness.pytest_bench import bench_device, case_id, run_case, suite_cases

SUITE = at.SUITE
_CUDA = bench_device() == "cuda"
_PROVS = at.CUDA_PROVIDERS if _CUDA else at.CPU_PROVIDERS
_DPROVS = at.CUDA_DECODE_PROVIDERS if _CUDA else at.CPU_DECODE_PROVIDERS
_S = at.Size(2, 8, 256, 64)
SMALL = ([Case(_S, "fp32", _PROVS, m) for m in ("fwd-causal", "fwdbwd-causal", "fwd")]
         + [Case(at.Size(8, 8, 256, 64), "fp32", _DPROVS, "decode")])
CASES = suite_cases(SUITE, SMALL)


@pytest.mark.parametrize("case,provider", CASES, ids=[case_id(SUITE, c, p) for c, p in CASES])
def test_attention(benchmark, case, provider):
    info = run_case(benchmark, SUITE, case, provider)
    err = info.get("max_abs_err")
    assert err is None or err <= at.TOLERANCE[case.dtype], f"{provider}: max |out - reference| = {err:.3g}"
