"""pytest-benchmark module for the few-row inference linear (PackedLinear): the linear maps of a GPT decoding step.

    pytest benchmarks/bench_linear.py --benchmark-only                        # the suite's CPU sizes (seconds)
    VQKERNELS_BENCH_SIZES=16x512x8 pytest benchmarks/bench_linear.py --benchmark-only   # rows x width x layers

See :mod:`benchmarks.suites.linear` for the providers. ``extra_info``: GB/s of weights read, GFLOP/s, the peak
extra memory of one call and the largest error relative to |x| |w| (``max_rel_err``). Environment: see
``harness/pytest_bench.py``.
"""
from __future__ import annotations

import pytest

from benchmarks.suites import linear as lin
from benchmarks.harness.protocol import Case

from benchmarks.harness.pytest_bench import case_id, run_case, suite_cases

SUITE = lin.SUITE
SMALL = [Case(lin.SIZES["cpu"].size, "fp32", lin.PROVIDER_NAMES)]
CASES = suite_cases(SUITE, SMALL)


@pytest.mark.parametrize("case,provider", CASES, ids=[case_id(SUITE, c, p) for c, p in CASES])
def test_linear(benchmark, case, provider):
    info = run_case(benchmark, SUITE, case, provider)
    err = info.get("max_rel_err")
    assert err is None or err <= 1e-5, f"{provider}: max |y - reference| / (|x| |w|) = {err:.3g}"
