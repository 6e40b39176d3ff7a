"""pytest-benchmark module for ``nearest_code``: every provider x size, the same providers as the runner.

    pytest benchmarks/ --benchmark-only                     # small sizes: a minute or two on 2 CPU cores
    VQKERNELS_BENCH_SIZES=suite pytest benchmarks/ --benchmark-only    # the runner's default sizes
    VQKERNELS_BENCH_SIZES=65536x8192x64,taming VQKERNELS_BENCH_DTYPES=fp32,bf16 pytest benchmarks/ ...
    pytest benchmarks/ --benchmark-only --benchmark-save=mine   # then --benchmark-compare against it

``extra_info``: GFLOP/s and vectors/s (from the median), the peak extra memory of one call and the fraction of
rows answered correctly against the torch reference (environment: see ``harness/pytest_bench.py``). For the
stamped CSV/JSON/plot of a full run, use the runner, ``python benchmarks/run.py``.
"""
from __future__ import annotations

import pytest

from benchmarks.suites import nearest_code as nc
from benchmarks.harness.protocol import Case

from benchmarks.harness.pytest_bench import bench_device, case_id, run_case, suite_cases

SUITE = nc.SUITE
_PROVS = nc.CUDA_PROVIDERS if bench_device() == "cuda" else nc.CPU_PROVIDERS
# Small enough for 2 CPU cores, shaped like the real ones (taming's size is small already).
SMALL = [Case(s, "fp32", _PROVS) for s in (nc.SIZES["taming"].size, nc.Size(4096, 4096, 8), nc.Size(8192, 2048, 64))]
CASES = suite_cases(SUITE, SMALL)


@pytest.mark.parametrize("case,provider", CASES, ids=[case_id(SUITE, c, p) for c, p in CASES])
def test_nearest_code(benchmark, case, provider):
    info = run_case(benchmark, SUITE, case, provider)
    correct = info.get("correct_frac")
    if correct is not None:
        assert correct > 0.99 or case.dtype != "fp32", f"{provider} answered only {correct:.4f} of the rows correctly"
