"""One measurement: one (suite, provider, case, threads), in whatever process runs it.

1. the threads are set (torch, FAISS), the provider runs once on the suite's tiny warm-up case (loads lazy
   libraries, starts the thread pools), then the real inputs are made;
2. the memory baseline is taken before the first full-size call (:mod:`.memory`);
3. ``warmup`` calls, then at least ``repeats`` timed calls (more, up to ``MAX_REPEATS``, while their total is
   under ``min_time``); CUDA calls are timed with CUDA events and synchronised;
4. the metrics are the suite's: its work per call / the median time;
5. the last call's answer is compared with the reference (cached per input), after the memory reading.

A provider's failure is a result (status ``error`` / ``oom`` with the message), never an exception.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

from ..suites import load_suite
from .memory import MemoryMeter
from .protocol import Case

MAX_REPEATS = 100  # cap on the timed calls min_time may add


def case_from_spec(suite, spec: dict) -> Case:
    return Case(suite.Size(*spec["size"]), spec["dtype"], (spec["provider"],), spec.get("mode", ""))


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(Exception):
        import faiss

        faiss.omp_set_num_threads(n)


def timed_call(fn, device: str):
    """(seconds, result) of one call; CUDA calls are bracketed by events and synchronised."""
    if device == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (on a shared machine wall time grows with others' load; this less)."""
    return time.process_time()


def measure(spec: dict) -> dict:
    """Measure one case of one provider (``spec``: see :func:`benchmarks.harness.runner.run_suite`)."""
    suite = load_suite(spec["op"])
    prov = suite.providers[spec["provider"]]
    case = case_from_spec(suite, spec)
    device = prov.data_device or spec["device"]
    res = {"status": "ok", "reason": "", "device": device}
    set_threads(spec["threads"])
    reasons = prov.reasons(case, device)
    if reasons:
        return {**res, "status": "skipped", "reason": "; ".join(reasons)}
    try:
        inputs, fn = prepare(suite, prov, case, device, spec["seed"])
        meter = MemoryMeter(device)
        meter.start()  # baseline: inputs created and touched, nothing run at full size yet
        for _ in range(spec["warmup"]):
            fn()
            synchronize(device)
        meter.restart_cuda_peak()
        times, cpu_times, out = [], [], None
        while len(times) < spec["repeats"] or (sum(times) < spec["min_time"] and len(times) < MAX_REPEATS):
            out = None  # free the previous result before the next call (it would count in the peak)
            c0 = _cpu_seconds()
            t, out = timed_call(fn, device)
            cpu_times.append(_cpu_seconds() - c0)
            times.append(t)
        peak = meter.peak()
    except Exception as e:  # noqa: BLE001 -- a provider's failure is a result, not a crash
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        status = "oom" if "out of memory" in str(e).lower() else "error"
        return {**res, "status": status, "reason": " ".join(msg)[:500]}

    t_med = statistics.median(times)
    res.update(time_s=t_med, time_min_s=min(times), time_max_s=max(times), times_s=times, repeats=len(times),
               cpu_time_s=statistics.median(cpu_times), cpu_times_s=cpu_times,
               warmup=spec["warmup"], peak_mem_bytes=peak, peak_mem_mb=peak / 2**20, mem_method=meter.method)
    res.update(rates(suite, case, t_med))
    if spec["check"] and prov.checked:
        try:
            cache = ReferenceCache(Path(spec["ref_cache"]) if spec.get("ref_cache") else None)
            res.update(check(suite, prov, case, inputs, fn, out, device, spec["seed"], cache))
        except Exception as e:  # noqa: BLE001
            res["reason"] = f"correctness check failed: {type(e).__name__}: {e}"[:500]
    return res


# --- the steps of a measurement, which the pytest-benchmark modules (:mod:`.pytest_bench`) take too --------

def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def prepare(suite, prov, case: Case, device: str, seed: int):
    """(inputs, fn): the provider run once on the suite's tiny warm-up case (loads lazy libraries, starts the
    thread pools), then the real inputs made and the timed callable built."""
    tiny = suite.warmup_case(case)
    if tiny != case:
        prov.build(suite.make_inputs(tiny, device, seed + 1), tiny)()
        synchronize(device)
    inputs = suite.make_inputs(case, device, seed)
    return inputs, prov.build(inputs, case)


def rates(suite, case: Case, seconds: float) -> dict:
    """The suite's metric columns for a call of ``case`` that took ``seconds``."""
    return {m.column: m.rate(case, seconds) for m in suite.metrics}


class ReferenceCache:
    """The reference answers of a run, per (suite, case, device, seed): computed once per input and shared by
    every provider of that case -- on disk in ``folder`` (the measurement processes of one run share it), or in
    this process's memory when ``folder`` is None."""

    _memory: dict = {}

    def __init__(self, folder: Path | None):
        self.folder = folder

    def _key(self, suite, case, device, seed) -> str:
        tag = "".join(ch if ch.isalnum() else "-" for ch in suite.case_label(case))
        return f"{suite.op}-{tag}-{device}-s{seed}"

    def get(self, suite, case, device, seed):
        key = self._key(suite, case, device, seed)
        if self.folder is None:
            return self._memory.get(key)
        import torch

        path = self.folder / f"{key}.pt"
        return torch.load(path, map_location=device) if path.exists() else None

    def put(self, suite, case, device, seed, ref) -> None:
        key = self._key(suite, case, device, seed)
        if self.folder is None:
            self._memory[key] = ref
            return
        import torch

        torch.save(_to_cpu(ref), self.folder / f"{key}.pt")


def check(suite, prov, case: Case, inputs, fn, out, device: str, seed: int, cache: ReferenceCache) -> dict:
    """The suite's check columns (and the extra columns of its ``answer``) for the provider's last answer
    ``out``. The reference is the reference provider's own answer when it is the one checked, else the cached
    one, else the suite's ``reference`` (then cached)."""
    ans, info = suite.answer(prov, inputs, case, fn, out)
    if prov.name == suite.reference_provider:
        ref = ans
    else:
        ref = cache.get(suite, case, device, seed)
        if ref is None:
            ref = suite.reference(inputs, case)
    if ref is not None:
        cache.put(suite, case, device, seed, ref)
        info = {**info, **suite.compare(inputs, case, ans, ref)}
    return info




def _to_cpu(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    return x
