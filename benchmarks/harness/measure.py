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
import importlib
import statistics
import time
from pathlib import Path

from .protocol import Case
from .memory import MemoryMeter

MAX_REPEATS = 100  # cap on the timed calls min_time may add


def load_suite(op: str):
    """The ``SUITE`` of an op's module (``benchmarks.suites.OPS``)."""
    from ..suites import OPS

    if op not in OPS:
        raise SystemExit(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    return importlib.import_module(OPS[op]).SUITE


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
    import torch

    suite = load_suite(spec["op"])
    prov = suite.providers[spec["provider"]]
    case = case_from_spec(suite, spec)
    device = prov.data_device or spec["device"]
    res = {"status": "ok", "reason": "", "device": device}
    set_threads(spec["threads"])
    reasons = prov.reasons(case, device)
    if reasons:
        return {**res, "status": "skipped", "reason": "; ".join(reasons)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        tiny = suite.warmup_case(case)
        if tiny != case:
            prov.build(suite.make_inputs(tiny, device, spec["seed"] + 1), tiny)()
            sync()
        inputs = suite.make_inputs(case, device, spec["seed"])
        fn = prov.build(inputs, case)
        meter = MemoryMeter(device)
        meter.start()  # baseline: inputs created and touched, nothing run at full size yet
        for _ in range(spec["warmup"]):
            fn()
            sync()
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
    for m in suite.metrics:
        res[m.column] = m.rate(case, t_med)

    if spec["check"] and prov.checked:
        try:
            ans, info = suite.answer(prov, inputs, case, fn, out)
            res.update(info)
            own = ans if spec["provider"] == suite.reference_provider else None
            ref = reference(suite, spec, case, inputs, own)
            if ref is not None:
                res.update(suite.compare(inputs, case, ans, ref))
        except Exception as e:  # noqa: BLE001
            res["reason"] = f"correctness check failed: {type(e).__name__}: {e}"[:500]
    return res


def reference(suite, spec, case, inputs, own):
    """The reference answer for these inputs: computed once per input, cached on disk for the others."""
    import torch

    path = None
    if spec.get("ref_cache"):
        tag = "".join(ch if ch.isalnum() else "-" for ch in suite.case_label(case))
        path = Path(spec["ref_cache"]) / f"{spec['op']}-{tag}-{spec['device']}-s{spec['seed']}.pt"
        if own is None and path.exists():
            return torch.load(path, map_location=spec["device"] if spec["device"] != "cuda" else "cuda")
    ref = own if own is not None else suite.reference(inputs, case)
    if path is not None and ref is not None:
        torch.save(_to_cpu(ref), path)
    return ref


def _to_cpu(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    return x
