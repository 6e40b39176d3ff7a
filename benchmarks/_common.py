"""What the pytest-benchmark modules share: the cases of a suite, and one benchmark of one (case, provider).

Every ``bench_*.py`` module runs the providers and sizes of a suite of :mod:`vqkernels.bench` (the runner's, see
``vqkernels/bench/protocol.py``), timed by pytest-benchmark instead of the runner. ``extra_info`` holds the
suite's metrics (GFLOP/s, TFLOP/s, GB/s, images/s, tokens/s: its work per call over the median), the peak extra
memory of one untimed call (CUDA: max_memory_allocated above the inputs; CPU: VmHWM above VmRSS in this
process -- the runner measures each case in a fresh process, for exact CPU peaks), and the suite's check
columns. CUDA calls synchronise the device inside the timed function.

Environment (all modules):
    VQKERNELS_BENCH_SIZES    small (default) | suite | a comma list of the suite's sizes (named, or its dimensions)
    VQKERNELS_BENCH_DTYPES   a comma list of dtypes (default: fp32 for small sizes, every dtype for suite)
    VQKERNELS_BENCH_MODES    a comma list of the suite's modes (default: all of its cases' modes)
    VQKERNELS_BENCH_DEVICE   auto (default: cuda when present) | cpu | cuda
    VQKERNELS_BENCH_THREADS  CPU threads for torch and FAISS (default: every usable core)
    VQKERNELS_BENCH_ROUNDS   timed rounds (default 5)
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from benchmarks.harness.measure import set_threads
from benchmarks.harness.memory import MemoryMeter
from benchmarks.harness.plan import default_mem_cap
from benchmarks.harness.protocol import Case
from benchmarks.harness.stamps import usable_cores


def bench_device() -> str:
    """VQKERNELS_BENCH_DEVICE (auto: cuda when a GPU is present, else cpu)."""
    want = os.environ.get("VQKERNELS_BENCH_DEVICE", "auto")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def _env_list(name: str) -> list[str]:
    return [s for s in os.environ.get(name, "").replace(" ", ",").split(",") if s]


def suite_cases(suite, small: list[Case]) -> list[tuple[Case, str]]:
    """(case, provider) pairs: ``small`` (default), the suite's default cases, or the sizes named."""
    device = bench_device()
    sizes_env = os.environ.get("VQKERNELS_BENCH_SIZES", "small").strip()
    dtypes = _env_list("VQKERNELS_BENCH_DTYPES")
    modes = _env_list("VQKERNELS_BENCH_MODES")
    if sizes_env == "suite":
        cases = suite.default_cases(device)
    elif sizes_env == "small":
        cases = list(small)
        dtypes = dtypes or ["fp32"]
    else:
        cases = suite.cases_for([suite.parse_size(s) for s in sizes_env.split(",") if s], dtypes or ["fp32"], device)
    if dtypes:
        cases = [c for c in cases if c.dtype in dtypes]
    if modes:
        cases = [c for c in cases if c.mode in modes]
    return [(c, p) for c in cases for p in c.providers]


def case_id(suite, case: Case, provider: str) -> str:
    return f"{provider}-{suite.case_label(case)}".replace(" ", "-")


def set_bench_threads() -> None:
    set_threads(int(os.environ.get("VQKERNELS_BENCH_THREADS", usable_cores())))


def synchronized(fn, device: str):
    """fn, followed by a device synchronisation on CUDA (so a timed call includes the kernels)."""
    if device != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def measured_call(call, device: str):
    """One untimed call: (its output, the peak extra memory in bytes, how it was measured). Also a warm-up."""
    meter = MemoryMeter(device)
    meter.start()
    out = call()
    return out, meter.peak(), meter.method


def rounds() -> int:
    return int(os.environ.get("VQKERNELS_BENCH_ROUNDS", "5"))


_REF: dict = {}  # reference answers per (suite, case, device), shared by the providers of one case


def run_case(benchmark, suite, case: Case, provider: str) -> dict:
    """Benchmark one provider on one case; returns ``extra_info`` (skips with the reason when it cannot run)."""
    prov = suite.providers[provider]
    device = prov.data_device or bench_device()
    reasons = prov.reasons(case, device)
    if reasons:
        pytest.skip("; ".join(reasons))
    elsewhere = [p for p in (prov.child_path() if prov.child_path else []) if os.path.abspath(p) not in
                 {os.path.abspath(q) for q in sys.path}]
    if elsewhere:
        pytest.skip(f"{provider} imports a separate install ({elsewhere[0]}) and needs its own process: "
                    f"use the runner (vqkernels bench --ops {suite.op})")
    real = prov.extra.get("needs_real_module")  # a stand-in for it in this process (taming's) would be used instead
    if real in sys.modules and not hasattr(sys.modules[real], "__version__"):
        pytest.skip(f"a stand-in for {real} holds this process (taming's): use the runner, which isolates providers")
    need, cap = suite.estimate_bytes(prov, case), default_mem_cap(device)
    if need > cap:
        pytest.skip(f"it needs ~{need / 2**30:.1f} GiB, more than the memory cap ({cap / 2**30:.1f} GiB)")
    set_bench_threads()
    benchmark.group = f"{suite.op} {suite.case_label(case)}"

    tiny = suite.warmup_case(case)
    if tiny != case:
        synchronized(prov.build(suite.make_inputs(tiny, device, 1), tiny), device)()
    inputs = suite.make_inputs(case, device, 0)
    fn = prov.build(inputs, case)
    call = synchronized(fn, device)

    # One untimed call for the peak memory and the correctness check; it also warms the provider.
    out, peak, mem_method = measured_call(call, device)
    info, checks = {}, {}
    if prov.checked:
        ans, info = suite.answer(prov, inputs, case, fn, out)
        key = (suite.op, suite.case_label(case), device)
        if provider == suite.reference_provider:
            _REF[key] = ans
        elif key not in _REF:
            _REF[key] = suite.reference(inputs, case)
        if _REF[key] is not None:
            checks = suite.compare(inputs, case, ans, _REF[key])
    del out

    benchmark.pedantic(call, rounds=rounds(), warmup_rounds=1, iterations=1)

    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op=suite.op, provider=provider, kind=prov.kind, device=device, **case.size._asdict(), dtype=case.dtype,
        mode=case.mode, threads=torch.get_num_threads(),
        **{m.column: m.rate(case, median) for m in suite.metrics},
        peak_mem_bytes=peak, mem_method=mem_method, **info, **checks,
    )
    return benchmark.extra_info
