"""The harness for the pytest-benchmark modules (``benchmarks/bench_*.py``): their cases, and one benchmark of
one (case, provider), timed by pytest-benchmark instead of the runner.

The cases are planned as the runner plans them (:func:`.plan.plan_cases`), and a case is set up and checked by
the runner's own steps (:func:`.measure.prepare`, :func:`.measure.check`); only the timing is pytest-benchmark's.
``extra_info`` holds the suite's metrics (GFLOP/s, TFLOP/s, GB/s, images/s, tokens/s: its work per call over the
median), the peak extra memory of one untimed call (CUDA: max_memory_allocated above the inputs; CPU: VmHWM above
VmRSS in this process -- the runner measures each case in a fresh process, for exact CPU peaks), and the suite's
check columns. CUDA calls synchronise the device inside the timed function.

Environment (all modules):
    VQKERNELS_BENCH_SIZES    small (default) | suite | a comma list of the suite's sizes (named, or its dimensions)
    VQKERNELS_BENCH_DTYPES   a comma list of dtypes (default: fp32 for small sizes, every dtype for suite)
    VQKERNELS_BENCH_MODES    a comma list of the suite's modes (default: all of its cases' modes)
    VQKERNELS_BENCH_DEVICE   auto (default: cuda when present) | cpu | cuda
    VQKERNELS_BENCH_THREADS  CPU threads for torch and FAISS (default: every usable core)
    VQKERNELS_BENCH_ROUNDS   timed rounds (default 5)
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest

from .common import usable_cores
from .measure import ReferenceCache, check, prepare, rates, set_threads, synchronize
from .memory import MemoryMeter
from .plan import default_mem_cap, plan_cases, resolve_device, split
from .protocol import Case


def bench_device() -> str:
    """VQKERNELS_BENCH_DEVICE (auto: cuda when a GPU is present, else cpu)."""
    return resolve_device(os.environ.get("VQKERNELS_BENCH_DEVICE", "auto"))


def suite_cases(suite, small: list[Case]) -> list[tuple[Case, str]]:
    """(case, provider) pairs: ``small`` (the module's own, by default), the suite's default cases
    (``VQKERNELS_BENCH_SIZES=suite``) or the sizes named, filtered by the dtypes and modes named."""
    sizes_env = os.environ.get("VQKERNELS_BENCH_SIZES", "small").strip()
    dtypes = split([os.environ.get("VQKERNELS_BENCH_DTYPES", "")])
    modes = split([os.environ.get("VQKERNELS_BENCH_MODES", "")])
    if sizes_env == "small":
        cases = [c for c in small if c.dtype in (dtypes or ["fp32"]) and (not modes or c.mode in modes)]
    else:
        # A module of several suites (bench_models) takes the dtypes and modes each suite knows; a suite that
        # knows none of those named has no case.
        known_dtypes = [d for d in dtypes if d in suite.dtypes]
        known_modes = [m for m in modes if m in suite.modes]
        if (dtypes and not known_dtypes) or (modes and not known_modes):
            return []
        sizes = [] if sizes_env == "suite" else split([sizes_env])
        args = argparse.Namespace(sizes=sizes, dtypes=known_dtypes, modes=known_modes, providers=None, quick=False,
                                  large=False)
        cases = plan_cases(args, suite, bench_device())
    return [(c, p) for c in cases for p in c.providers]


def case_id(suite, case: Case, provider: str) -> str:
    return f"{provider}-{suite.case_label(case)}".replace(" ", "-")


def rounds() -> int:
    return int(os.environ.get("VQKERNELS_BENCH_ROUNDS", "5"))


def _skip_reason(suite, prov, case: Case, device: str) -> str | None:
    """Why this provider is not benchmarked here: the suite's reasons, a process of its own, the memory cap."""
    reasons = prov.reasons(case, device)
    if reasons:
        return "; ".join(reasons)
    on_path = {os.path.abspath(q) for q in sys.path}
    elsewhere = [p for p in (prov.child_path() if prov.child_path else []) if os.path.abspath(p) not in on_path]
    if elsewhere:
        return (f"{prov.name} imports a separate install ({elsewhere[0]}) and needs its own process: "
                f"use the runner (python benchmarks/run.py --ops {suite.op})")
    real = prov.extra.get("needs_real_module")  # a stand-in for it in this process (taming's) would be used instead
    if real in sys.modules and not hasattr(sys.modules[real], "__version__"):
        return f"a stand-in for {real} holds this process (taming's): use the runner, which isolates providers"
    need, cap = suite.estimate_bytes(prov, case), default_mem_cap(device)
    if need > cap:
        return f"it needs ~{need / 2**30:.1f} GiB, more than the memory cap ({cap / 2**30:.1f} GiB)"
    return None


def run_case(benchmark, suite, case: Case, provider: str) -> dict:
    """Benchmark one provider on one case; returns ``extra_info`` (skips with the reason when it cannot run)."""
    prov = suite.providers[provider]
    device = prov.data_device or bench_device()
    reason = _skip_reason(suite, prov, case, device)
    if reason:
        pytest.skip(reason)
    set_threads(int(os.environ.get("VQKERNELS_BENCH_THREADS", usable_cores())))
    benchmark.group = f"{suite.op} {suite.case_label(case)}"

    inputs, fn = prepare(suite, prov, case, device, seed=0)

    def call():
        out = fn()
        synchronize(device)  # a timed call includes the kernels
        return out

    # One untimed call for the peak memory and the correctness check; it also warms the provider.
    meter = MemoryMeter(device)
    meter.start()
    out = call()
    peak = meter.peak()
    checks = check(suite, prov, case, inputs, fn, out, device, 0, ReferenceCache(None)) if prov.checked else {}
    del out

    benchmark.pedantic(call, rounds=rounds(), warmup_rounds=1, iterations=1)

    import torch

    benchmark.extra_info.update(
        op=suite.op, provider=provider, kind=prov.kind, device=device, **case.size._asdict(), dtype=case.dtype,
        mode=case.mode, threads=torch.get_num_threads(), **rates(suite, case, benchmark.stats.stats.median),
        peak_mem_bytes=peak, mem_method=meter.method, **checks,
    )
    return benchmark.extra_info
