"""pytest-benchmark module for a quantizer training step: every provider x size, the same providers as the runner.

    pytest benchmarks/bench_quantizer.py --benchmark-only                   # small sizes: about a minute on 2 cores
    VQKERNELS_BENCH_SIZES=suite pytest benchmarks/bench_quantizer.py --benchmark-only   # the runner's default sizes
    VQKERNELS_BENCH_SIZES=12288x1024x256 pytest benchmarks/ -k quantizer --benchmark-only

One call = forward + backward of the quantizer module (and its EMA update, inside the forward in training
mode), gradients cleared first; see :mod:`benchmarks.suites.quantizer`. Environment: see
``harness/pytest_bench.py``.

``extra_info``: tokens/s (from the median), the peak extra memory of one step (use the runner,
``python benchmarks/run.py --ops quantizer``, for exact CPU peaks), the fraction of indices equal to taming's on
the same codebook and input, and the loss value.
"""
from __future__ import annotations

import pytest

from benchmarks.suites import quantizer as q
from benchmarks.harness.protocol import Case

from benchmarks.harness.pytest_bench import case_id, run_case, suite_cases

SUITE = q.SUITE
# Small enough for 2 CPU cores, shaped like the suite's (tokens on 16 x 16 grids).
SMALL = [Case(s, "fp32", q.CPU_PROVIDERS) for s in (q.Size(3072, 1024, 256), q.Size(4096, 4096, 8))]
CASES = suite_cases(SUITE, SMALL)


@pytest.mark.parametrize("case,provider", CASES, ids=[case_id(SUITE, c, p) for c, p in CASES])
def test_quantizer_step(benchmark, case, provider):
    info = run_case(benchmark, SUITE, case, provider)
    match = info.get("index_match_vs_taming")
    assert match is None or match > 0.99, f"{provider} chose taming's code for only {match:.4f} of the tokens"
