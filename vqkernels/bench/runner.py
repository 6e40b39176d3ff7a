"""The benchmark runner: time, throughput, peak extra memory and correctness of every provider.

``vqkernels bench`` and ``python benchmarks/run.py`` call :func:`main`; the CLI embeds the options
with :func:`add_arguments` and calls :func:`run`.

What one measurement is (one provider, one size, one dtype, one thread count):
  1. a fresh subprocess (default; ``--in-process`` for none) imports everything, sets the threads
     (torch and FAISS), calls the provider once on tiny inputs (loads lazy libraries, starts the
     thread pools), then creates the real inputs;
  2. the memory baseline is taken *before* the first full-size call: on CPU the process's peak RSS
     is reset (``/proc/self/clear_refs``) and the baseline is its current RSS; on CUDA the baseline is
     ``torch.cuda.memory_allocated()`` (the inputs), and the peak statistics are reset after the
     warm-up, so Triton's one-off autotuning does not count;
  3. ``--warmup`` calls, then at least ``--repeats`` timed calls (more, up to 100, while their total is
     under ``--min-time``; CUDA calls are timed with CUDA events and synchronised);
  4. peak extra memory = peak RSS (VmHWM) - baseline on CPU, max_memory_allocated - baseline on CUDA;
  5. the last call's indices are checked against the chunked torch reference (cached per input).

Time is the median of the timed calls; GFLOP/s = 2*N*K*D / time (the GEMM every provider does);
vectors/s = N / time. A provider that cannot run (not built, wrong device or dtype), whose N x K
matrices would exceed ``--mem-cap-gb``, or that passes ``--timeout`` is recorded as skipped, too big
or timed out, with the reason, and the run goes on.

The suites of ``--ops`` (default all: ``nearest_code``, then ``quantizer``, a training step of the
quantizer modules) run one after the other with the same options; each op module
(:mod:`vqkernels.bench.nearest_code`, :mod:`vqkernels.bench.quantizer`) supplies its providers, sizes and
correctness check, and may supply its own CSV columns, ratios and table (``CSV_COLUMNS``, ``add_ratios``,
``format_table``, ``check_call``, ``REFERENCE_PROVIDER``).

Output (``--out``, default ``benchmarks/results/<date>-<device-slug>/``): per op ``<op>.csv``, ``<op>.json``
(the same rows plus every timing and the stamps) and ``<op>.png``; a table is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import OPS

MAX_REPEATS = 100  # cap on the timed calls --min-time may add
CSV_COLUMNS = [
    "op", "case", "N", "K", "D", "dtype", "provider", "kind", "device", "threads",
    "status", "reason", "time_s", "time_min_s", "time_max_s", "repeats", "warmup",
    "vectors_per_s", "gflops", "peak_mem_bytes", "peak_mem_mb", "mem_method", "correct_frac",
    "best_peer", "speedup_vs_best_peer",
    "date_utc", "device_name", "cpu_model", "cores", "git_sha", "python", "torch", "triton", "faiss",
    "vqkernels", "isolation",
]
# The stamps copied from the metadata into every CSV row, so that a row read alone says where it came from.
STAMP_COLUMNS = ["date_utc", "device_name", "cpu_model", "cores", "git_sha", "python", "torch", "triton",
                 "faiss", "vqkernels"]


# =============================================================================================
# Command line

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The runner's options, added to ``p`` (the CLI's ``bench`` subparser, or our own parser)."""
    p.add_argument("--ops", nargs="+", choices=sorted(OPS), default=None, metavar="OP",
                   help=f"the ops whose suites run, in this order (default: all: {', '.join(OPS)})")
    p.add_argument("--op", choices=sorted(OPS), default=None, help=argparse.SUPPRESS)  # old spelling of --ops OP
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when a GPU is present, else cpu (the suite's sizes follow the device)")
    p.add_argument("--sizes", nargs="+", metavar="SIZE",
                   help="NxKxD or a named size (taming, llamagen, cpu-target, d256, large-d256, large-k100k); "
                        "replaces the suite's sizes; comma-separated lists work too")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help="fp32, bf16, fp16: the dtypes for --sizes (default fp32), or a filter on the suite's cases")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help="run exactly these providers on every case (default: the suite's per-case list); "
                        "see --list")
    p.add_argument("--threads", nargs="+", type=int, metavar="T",
                   help="CPU threads for torch and FAISS (default: every core this process may use)")
    p.add_argument("--thread-sweep", action="store_true",
                   help="threads 1, 2, 4, ... up to every core (the scaling table)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")
    p.add_argument("--min-time", type=float, default=None,
                   help="add timed calls (up to 100) until they total this many seconds (default 0.2; --quick 0)")
    p.add_argument("--large", action="store_true", help="on CPU, add the large (GPU) sizes to the suite")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes, 1 repeat, in-process; takes seconds")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--in-process", dest="isolate", action="store_false", default=None,
                     help="measure in this process (default with --quick); CPU peak memory then relies on "
                          "resetting VmHWM and the allocator returning freed memory")
    iso.add_argument("--subprocess", dest="isolate", action="store_true", default=None,
                     help="a fresh subprocess per measurement (the default, except with --quick)")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="skip a provider whose N x K matrices would exceed this; a subprocess whose RSS passes "
                        "it (+1 GiB) is killed (default: half the physical RAM on CPU, 90%% of the GPU's memory)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement subprocess (default 300)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the correctness check against the torch reference")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="time Triton on CPU under TRITON_INTERPRET=1 (slow; skipped by default)")
    p.add_argument("--seed", type=int, default=0, help="input seed")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default benchmarks/results/<date>-<device-slug>/)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw the PNG")
    p.add_argument("--list", action="store_true", help="list providers, sizes and the planned cases, then exit")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqkernels bench", description=__doc__.split("\n")[0])
    return add_arguments(p)


def main(argv=None) -> int:
    """``vqkernels bench`` / ``python benchmarks/run.py``: parse ``argv`` and run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:  # internal: one measurement in a fresh process (see _run_subprocess)
        return _child_main(argv[1:])
    return run(build_parser().parse_args(argv))


# =============================================================================================
# Planning: which (case, provider, threads) to measure

def _op_module(op: str):
    return importlib.import_module(OPS[op])


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _resolve_device(want: str) -> str:
    if want != "auto":
        return want
    import torch

    try:
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"


def _split(items):
    """["a,b", "c"] -> ["a", "b", "c"]."""
    out = []
    for it in items or []:
        out += [s for s in re.split(r"[,\s]+", it) if s]
    return out


def _parse_size(mod, token: str):
    if token in mod.SIZES:
        return mod.SIZES[token]
    m = re.fullmatch(r"(\d+)[x*,:](\d+)[x*,:](\d+)", token.lower())
    if not m:
        raise SystemExit(f"bad size {token!r}: expected NxKxD or one of {', '.join(mod.SIZES)}")
    N, K, D = map(int, m.groups())
    return mod.Size(N, K, D, "command line")


def plan_ops(args) -> list[str]:
    """The ops this run benchmarks: ``--ops`` (or the old ``--op``), default all; with several ops, an op that
    knows none of the ``--providers`` or none of the ``--dtypes`` named is left out."""
    ops = list(dict.fromkeys(args.ops or ([args.op] if args.op else list(OPS))))
    if len(ops) == 1:
        return ops
    mods = {op: _op_module(op) for op in ops}
    for flag, names, known in (("--providers", _split(args.providers), lambda m: m.PROVIDERS),
                               ("--dtypes", _split(args.dtypes), lambda m: m.DTYPES)):
        if not names:
            continue
        for n in names:
            if not any(n in known(m) for m in mods.values()):
                raise SystemExit(f"{flag}: {n!r} is not known to any of the ops {', '.join(ops)}")
        ops = [op for op in ops if any(n in known(mods[op]) for n in names)]
    return ops


def plan_cases(args, mod, device: str, lenient: bool = False):
    """The cases (size, dtype, providers) this run measures. ``lenient`` (a run of several ops): take the
    ``--providers`` and ``--dtypes`` this op knows and ignore the others (:func:`plan_ops` checked them)."""
    dtypes = _split(args.dtypes)
    providers = _split(args.providers)
    if lenient:
        dtypes = [d for d in dtypes if d in mod.DTYPES]
        providers = [n for n in providers if n in mod.PROVIDERS]
    for d in dtypes:
        mod.dtype_of(d)  # validate early
    for name in providers:
        if name not in mod.PROVIDERS:
            raise SystemExit(f"unknown provider {name!r}; expected some of {', '.join(mod.PROVIDERS)}")
    if args.sizes:
        default_provs = mod.CUDA_PROVIDERS if device == "cuda" else mod.CPU_PROVIDERS
        cases = [mod.Case(_parse_size(mod, s), d, tuple(default_provs))
                 for s in _split(args.sizes) for d in (dtypes or ["fp32"])]
    else:
        cases = mod.default_cases(device, quick=args.quick, large=args.large)
        if dtypes:
            cases = [c for c in cases if c.dtype in dtypes]
    if providers:
        cases = [mod.Case(c.size, c.dtype, tuple(providers)) for c in cases]
    return cases


def plan_threads(args) -> list[int]:
    n = _usable_cores()
    if args.thread_sweep:
        ts, t = [], 1
        while t < n:
            ts.append(t)
            t *= 2
        return ts + [n]
    return sorted(set(args.threads)) if args.threads else [n]


def default_mem_cap(device: str) -> int:
    if device == "cuda":
        import torch

        return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)


# =============================================================================================
# Stamps

from .._info import _cpu_model  # noqa: E402  (one reader of the CPU model, shared with vqkernels.info)


def _cpu_isa() -> str:
    """The SIMD/matrix extensions that decide CPU kernel speed (from /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    want = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
                            "amx_tile"]
                    return " ".join(w for w in want if w in flags)
    except OSError:
        pass
    return ""


def _repo_root() -> Path | None:
    """The source checkout this package runs from (it has benchmarks/), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() and (root / "vqkernels").is_dir() else None


def _git_sha() -> tuple[str, bool | None]:
    cwd = _repo_root() or Path.cwd()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            return "unknown", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return sha, dirty
    except Exception:  # noqa: BLE001 -- no git, not a checkout
        return "unknown", None


def _version(mod_name: str) -> str | None:
    try:
        return importlib.import_module(mod_name).__version__
    except Exception:  # noqa: BLE001
        return None


def collect_meta(device: str, args, argv_repr: str) -> dict:
    """Where and with what this run was made: device, cores, versions, git sha, date (UTC)."""
    import torch

    import vqkernels
    from vqkernels import _backend

    gpu = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory,
               "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    sha, dirty = _git_sha()
    cpu = _cpu_model()
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": gpu["name"] if gpu else cpu,
        "cpu_model": cpu,
        "cpu_isa": _cpu_isa(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "faiss": _version("faiss"),
        "numpy": _version("numpy"),
        "vqkernels": vqkernels.__version__,
        "vqkernels_C": _backend.build_info() if _backend.c_extension() is not None else None,
        "vqkernels_C_error": _backend.c_extension_error(),
        "git_sha": sha,
        "git_dirty": dirty,
        "platform": platform.platform(),
        "command": argv_repr,
        "isolation": "subprocess" if args.isolate else "in-process",
        "repeats": args.repeats, "warmup": args.warmup, "min_time_s": args.min_time,
        "timeout_s": args.timeout, "mem_cap_bytes": args.mem_cap_bytes, "seed": args.seed,
    }


def device_slug(meta: dict) -> str:
    """'amd-epyc-2c' for a CPU run, 'nvidia-h100-80gb-hbm3' for a GPU run."""
    name = meta["device_name"]
    slug = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", "", name, flags=re.I) if meta["device"] == "cpu" else name
    slug = re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-") or "unknown"
    if meta["device"] == "cpu":
        slug += f"-{meta['usable_cores']}c"
    return slug


def default_out_dir(meta: dict) -> Path:
    root = _repo_root()
    base = root / "benchmarks" / "results" if root else Path.cwd() / "vqkernels-bench-results"
    return base / f"{meta['date_utc'][:10]}-{device_slug(meta)}"


# =============================================================================================
# One measurement (runs in the child process, or here with --in-process)

def _proc_status_kb(key: str, pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _MemoryMeter:
    """Peak extra memory of what runs between start() and peak(), above the inputs."""

    def __init__(self, device: str):
        self.device = device
        self.method = ""

    def start(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda max_memory_allocated"
            return
        gc.collect()
        self.reset_ok = _reset_peak_rss()
        self.base = (_proc_status_kb("VmRSS") or 0) * 1024
        self.method = "VmHWM-VmRSS" if self.reset_ok else "VmHWM-VmRSS (VmHWM not reset)"
        if _proc_status_kb("VmHWM") is None:
            import resource

            self.method = "ru_maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def restart_cuda_peak(self):
        """CUDA: count from here (after the warm-up), so one-off autotuning does not count."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        if self.method == "ru_maxrss":
            import resource

            return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)
        return max(0, (_proc_status_kb("VmHWM") or 0) * 1024 - self.base)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(Exception):
        import faiss

        faiss.omp_set_num_threads(n)


def _timed_call(fn, device: str):
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


def measure(spec: dict) -> dict:
    """Measure one (op, provider, N, K, D, dtype, device, threads); never raises for a provider's failure."""
    import torch

    mod = _op_module(spec["op"])
    prov = mod.PROVIDERS[spec["provider"]]
    N, K, D, dtype = spec["N"], spec["K"], spec["D"], spec["dtype"]
    device = prov.data_device or spec["device"]
    res = {"status": "ok", "reason": "", "device": device}
    _set_threads(spec["threads"])
    reasons = prov.reasons(N, K, D, dtype, device)
    if reasons:
        return {**res, "status": "skipped", "reason": "; ".join(reasons)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        # Load lazy libraries, JIT paths and thread pools on tiny inputs, before the memory baseline.
        xs, cbs = mod.make_inputs(min(N, 64), min(K, 64), D, dtype, device, spec["seed"] + 1)
        prov.build(xs, cbs)()
        sync()
        del xs, cbs
        x, cb = mod.make_inputs(N, K, D, dtype, device, spec["seed"])
        fn = prov.build(x, cb)
        meter = _MemoryMeter(device)
        meter.start()  # baseline: inputs created and touched, nothing run at full size yet
        for _ in range(spec["warmup"]):
            fn()
            sync()
        meter.restart_cuda_peak()
        times, out = [], None
        while len(times) < spec["repeats"] or (sum(times) < spec["min_time"] and len(times) < MAX_REPEATS):
            out = None  # free the previous result before the next call (it would count in the peak)
            t, out = _timed_call(fn, device)
            times.append(t)
        peak = meter.peak()
    except Exception as e:  # noqa: BLE001 -- a provider's failure is a result, not a crash
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        status = "oom" if "out of memory" in str(e).lower() else "error"
        return {**res, "status": status, "reason": " ".join(msg)[:500]}

    t_med = statistics.median(times)
    res.update(time_s=t_med, time_min_s=min(times), time_max_s=max(times), times_s=times, repeats=len(times),
               warmup=spec["warmup"], vectors_per_s=N / t_med, gflops=mod.flops(N, K, D) / t_med / 1e9,
               peak_mem_bytes=peak, peak_mem_mb=peak / 2**20, mem_method=meter.method)

    # Correctness of the last result, after the memory reading (the check allocates). An op module may
    # say which result to check (check_call: indices + extra values) and whose answer is the reference.
    if spec["check"] and prov.returns_indices:
        try:
            idx, info = (mod.check_call(prov, x, cb, fn, out) if hasattr(mod, "check_call") else (out, {}))
            res.update(info)
            own = spec["provider"] == getattr(mod, "REFERENCE_PROVIDER", "torch")
            ref = _reference(mod, spec, x, cb, idx if own else None)
            res["correct_frac"] = mod.correct_fraction(x, cb, idx, ref)
        except Exception as e:  # noqa: BLE001
            res["correct_frac"] = None
            res["reason"] = f"correctness check failed: {type(e).__name__}: {e}"[:500]
    return res


def _reference(mod, spec, x, cb, own):
    """The reference indices for these inputs: computed once per input, cached on disk for the others."""
    import torch

    path = None
    if spec.get("ref_cache"):
        path = Path(spec["ref_cache"]) / (f"{spec['op']}-{spec['N']}x{spec['K']}x{spec['D']}-{spec['dtype']}-"
                                           f"{x.device.type}-s{spec['seed']}.pt")
        if own is None and path.exists():
            return torch.load(path).to(x.device)
    ref = own if own is not None else mod.reference_indices(x, cb)
    if path is not None:
        torch.save(ref.cpu(), path)
    return ref


def _child_main(argv) -> int:
    """Internal: ``python -m vqkernels.bench.runner _child SPEC.json OUT.json``."""
    spec = json.loads(Path(argv[0]).read_text())
    res = measure(spec)
    Path(argv[1]).write_text(json.dumps(res))
    return 0


# =============================================================================================
# Running the measurements

@contextlib.contextmanager
def _clean_env():
    """In-process runs: no backend override, no output poisoning (the tests set it)."""
    saved = {k: os.environ.pop(k) for k in ("VQKERNELS_BACKEND", "VQKERNELS_POISON_OUTPUTS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _child_env(threads: int, allow_interpreter: bool) -> dict:
    env = dict(os.environ)
    for k in ("VQKERNELS_BACKEND", "VQKERNELS_POISON_OUTPUTS"):
        env.pop(k, None)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    if allow_interpreter:
        env["VQKERNELS_BENCH_ALLOW_INTERPRETER"] = "1"
    # The child imports this very package, wherever it was imported from.
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run_subprocess(spec: dict, timeout: float, rss_cap: int | None, workdir: Path) -> dict:
    """One measurement in a fresh interpreter, killed past ``timeout`` or past ``rss_cap`` bytes of RSS."""
    tag = f"{spec['op']}-{spec['provider']}-{spec['N']}x{spec['K']}x{spec['D']}-{spec['dtype']}-t{spec['threads']}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "vqkernels.bench.runner", "_child", str(spec_path), str(out_path)]
    log = open(workdir / f"{tag}.log", "w+")
    proc = subprocess.Popen(cmd, env=_child_env(spec["threads"], spec.get("allow_interpreter", False)),
                            stdout=log, stderr=subprocess.STDOUT)
    t0, killed = time.monotonic(), None
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                killed = ("timeout", f"killed after the {timeout:.0f} s timeout (--timeout)")
            elif rss_cap is not None:
                rss = (_proc_status_kb("VmRSS", str(proc.pid)) or 0) * 1024
                if rss > rss_cap:
                    killed = ("too_big", f"killed: RSS {rss / 2**30:.1f} GiB passed the memory cap "
                                         f"{rss_cap / 2**30:.1f} GiB (--mem-cap-gb, +1 GiB)")
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
    except BaseException:  # Ctrl-C: do not leave the child running
        proc.kill()
        proc.wait()
        raise
    if killed:
        return {"status": killed[0], "reason": killed[1]}
    if proc.returncode != 0 or not out_path.exists():
        log.seek(0)
        tail = " | ".join(log.read().strip().splitlines()[-3:])
        return {"status": "error", "reason": f"subprocess exited {proc.returncode}: {tail}"[:500]}
    return json.loads(out_path.read_text())


def _fmt_time(t):
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def run_suite(args, mod, device: str, cases, threads_list, workdir: Path, log=print) -> list[dict]:
    op = mod.OP
    rows = []
    n_jobs = sum(len(c.providers) for c in cases) * len(threads_list)
    j = 0
    for threads in threads_list:
        for case in cases:
            s = case.size
            for name in case.providers:
                j += 1
                prov = mod.PROVIDERS[name]
                row = {"op": op, "case": case.label, "N": s.N, "K": s.K, "D": s.D, "dtype": case.dtype,
                       "provider": name, "kind": prov.kind, "device": prov.data_device or device,
                       "threads": threads}
                # Cheap checks here, so an unavailable provider costs no subprocess.
                reasons = prov.reasons(s.N, s.K, s.D, case.dtype, prov.data_device or device)
                need = mod.nk_bytes(prov, s.N, s.K, case.dtype)
                if reasons:
                    res = {"status": "skipped", "reason": "; ".join(reasons)}
                elif need > args.mem_cap_bytes:
                    res = {"status": "too_big",
                           "reason": f"its N x K matrices need ~{need / 2**30:.1f} GiB, over the memory cap "
                                     f"{args.mem_cap_bytes / 2**30:.1f} GiB (--mem-cap-gb)"}
                else:
                    spec = {"op": op, "provider": name, "N": s.N, "K": s.K, "D": s.D, "dtype": case.dtype,
                            "device": device, "threads": threads, "seed": args.seed, "repeats": args.repeats,
                            "warmup": args.warmup, "min_time": args.min_time, "check": args.check,
                            "ref_cache": str(workdir), "allow_interpreter": args.allow_interpreter}
                    if args.isolate:
                        cap = args.mem_cap_bytes + 2**30 if device == "cpu" else None
                        res = _run_subprocess(spec, args.timeout, cap, workdir)
                    else:
                        if args.allow_interpreter:
                            os.environ["VQKERNELS_BENCH_ALLOW_INTERPRETER"] = "1"
                        import torch

                        saved_threads = torch.get_num_threads()
                        try:
                            with _clean_env():
                                res = measure(spec)
                        finally:
                            torch.set_num_threads(saved_threads)
                row.update(res)
                rows.append(row)
                if hasattr(mod, "progress_line"):
                    shown = mod.progress_line(row)
                else:
                    shown = (f"{_fmt_time(row.get('time_s'))}, {row.get('gflops', 0):.0f} GFLOP/s, "
                             f"{row.get('peak_mem_mb', 0):.1f} MB" if row["status"] == "ok"
                             else f"{row['status']}: {row['reason'][:110]}")
                log(f"[{j}/{n_jobs}] {name:>13} {case.label:<22} t={threads}  {shown}")
    _add_ratios(rows)
    if hasattr(mod, "add_ratios"):
        mod.add_ratios(rows)
    return rows


def _group_key(r):
    return (r["threads"], r["N"], r["K"], r["D"], r["dtype"])


def _best_peer(group):
    """The fastest peer that ran and answered correctly (a fast but wrong peer is no bar)."""
    peers = [r for r in group if r["kind"] == "peer" and r["status"] == "ok"
             and (r.get("correct_frac") is None or r["correct_frac"] >= 0.999)]
    return min(peers, key=lambda r: r["time_s"]) if peers else None


def _add_ratios(rows):
    groups = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    for group in groups.values():
        best = _best_peer(group)
        for r in group:
            r["best_peer"] = best["provider"] if best else None
            r["speedup_vs_best_peer"] = (best["time_s"] / r["time_s"]
                                         if best and r["status"] == "ok" else None)


# =============================================================================================
# Output: CSV, JSON, plot, table

def write_outputs(rows, meta, out_dir: Path, op: str, plot: bool, columns=None) -> dict:
    columns = columns or CSV_COLUMNS
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{op}.csv", "json": out_dir / f"{op}.json"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            row = {**{k: meta.get(k) for k in STAMP_COLUMNS}, "isolation": meta["isolation"], **r}
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "columns": columns, "results": rows}, f, indent=1, default=str)
    if plot:
        try:
            paths["png"] = out_dir / f"{op}.png"
            plot_times(rows, meta, paths["png"], op)
        except Exception as e:  # noqa: BLE001 -- a missing matplotlib must not lose the numbers
            paths.pop("png", None)
            print(f"(no plot: {type(e).__name__}: {e})")
    return paths


# One colour per provider in every plot (tab10 indices), so plots of different runs read alike.
PLOT_COLORS = {"cpu": 3, "cuda": 3, "triton": 1, "torch": 2, "taming": 0, "vqtorch": 4, "faiss": 5,
               "torch_mm": 7, "cublas_matmul": 7,
               "vqkernels": 3, "vqkernels-torch": 2, "vqkernels-ema": 6, "vqtorch-ema": 8}


def plot_times(rows, meta, path: Path, op: str) -> None:
    """Grouped bars: time per provider per case, log scale; one panel per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    cases = list(dict.fromkeys(r["case"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows if r["status"] == "ok"))  # bars only for what ran
    fig, axes = plt.subplots(len(threads), 1, figsize=(max(8, 1.6 * len(cases) + 4), 4.2 * len(threads)),
                             squeeze=False)
    width = 0.8 / max(1, len(provs))
    cmap = plt.get_cmap("tab10")
    for ax, t in zip(axes[:, 0], threads):
        for i, p in enumerate(provs):
            xs, ys = [], []
            for ci, c in enumerate(cases):
                m = [r for r in rows if r["threads"] == t and r["case"] == c and r["provider"] == p
                     and r["status"] == "ok"]
                if m:
                    xs.append(ci - 0.4 + width * (i + 0.5))
                    ys.append(m[0]["time_s"])
            if xs:
                ax.bar(xs, ys, width, label=p, color=cmap(PLOT_COLORS.get(p, 9)))
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace(" ", "\n") for c in cases], fontsize=8)
        ax.set_ylabel("time per call (s, log)")
        ax.set_title(f"{op}: {meta['device_name']}, {t} thread(s)" if meta["device"] == "cpu"
                     else f"{op}: {meta['device_name']}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.suptitle(f"N x K x D dtype -- torch {meta['torch']}, git {meta['git_sha'][:10]}, {meta['date_utc']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows, meta) -> str:
    """A readable table per case, with the speed-up against the best peer and the floor."""
    lines = [f"device: {meta['device_name']} ({meta['device']}), {meta['usable_cores']} cores usable; "
             f"torch {meta['torch']}, triton {meta['triton']}, faiss {meta['faiss']}; git {meta['git_sha'][:12]}; "
             f"{meta['date_utc']}"]
    groups = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    hdr = f"  {'provider':<14}{'kind':<10}{'time':>10}{'vectors/s':>12}{'GFLOP/s':>9}{'peak mem':>11}" \
          f"{'correct':>9}{'vs best peer':>14}"
    for (t, N, K, D, dt), group in groups.items():
        lines += ["", f"N={N} K={K} D={D} {dt}, {t} thread(s)", hdr]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"  {r['provider']:<14}{r['kind']:<10}{r['status']}: {r['reason'][:95]}")
                continue
            cf = r.get("correct_frac")
            sp = r.get("speedup_vs_best_peer")
            lines.append(
                f"  {r['provider']:<14}{r['kind']:<10}{_fmt_time(r['time_s']):>10}"
                f"{r['vectors_per_s'] / 1e6:>10.3g} M{r['gflops']:>9.1f}"
                f"{r['peak_mem_mb']:>8.1f} MB{('n/a' if cf is None else f'{cf:.4f}'):>9}"
                f"{('-' if sp is None else f'{sp:.3g}x'):>14}")
        best = _best_peer(group)
        floor = next((r for r in group if r["kind"] == "floor" and r["status"] == "ok"), None)
        for r in group:
            if r["kind"] not in ("ours", "reference") or r["status"] != "ok":
                continue
            parts = []
            if best:
                parts.append(f"{r['provider']} vs {best['provider']}: {best['time_s'] / r['time_s']:.3g}x")
            if floor:
                parts.append(f"{r['time_s'] / floor['time_s']:.3g}x the time of the bare matmul ({floor['provider']})")
            if parts:
                lines.append("  -> " + "; ".join(parts))
    lines += ["", "vs best peer = time of the fastest correct peer / this time (> 1: faster than every peer)."]
    return "\n".join(lines)


def run(args) -> int:
    """Run the suites described by ``args`` (from :func:`add_arguments`), one op after the other; returns an
    exit status (1 when some measurement failed and none ran)."""
    argv_repr = " ".join(sys.argv)
    ops = plan_ops(args)
    device = _resolve_device(args.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    # Defaults that depend on --quick.
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 0.2
    if args.isolate is None:
        args.isolate = not args.quick
    args.mem_cap_bytes = int(args.mem_cap_gb * 2**30) if args.mem_cap_gb else default_mem_cap(device)
    mods = {op: _op_module(op) for op in ops}
    plans = {op: plan_cases(args, mods[op], device, lenient=len(ops) > 1) for op in ops}
    threads_list = plan_threads(args)

    if args.list:
        for op in ops:
            _print_plan(op, mods[op], plans[op], device, threads_list)
        return 0

    meta = collect_meta(device, args, argv_repr)
    out_dir = args.out or default_out_dir(meta)
    all_rows = []
    for i, op in enumerate(ops):
        if i:
            print()
        all_rows += run_op(args, op, mods[op], plans[op], device, threads_list, meta, out_dir)
    bad = [r for r in all_rows if r["status"] in ("error", "oom")]
    return 1 if bad and not any(r["status"] == "ok" for r in all_rows) else 0


def _print_plan(op, mod, cases, device, threads_list) -> None:
    print(f"providers ({op}):")
    w = max([14] + [len(p.name) + 2 for p in mod.PROVIDERS.values()])
    for p in mod.PROVIDERS.values():
        print(f"  {p.name:<{w}}{p.kind:<10}{p.doc}")
    print("named sizes:")
    for n, s in mod.SIZES.items():
        print(f"  {n:<12}{s.label:<20}{s.note}")
    print(f"planned on {device}, threads {threads_list}:")
    for c in cases:
        print(f"  {c.label:<24}{', '.join(c.providers)}")


def run_op(args, op, mod, cases, device, threads_list, meta, out_dir: Path) -> list[dict]:
    """One op's suite: measure its cases, write ``<op>.csv/.json/.png`` into ``out_dir``, print its table."""
    print(f"vqkernels bench: {op} on {meta['device_name']} ({device}), threads {threads_list}, "
          f"{args.repeats} repeats; {'subprocess per measurement' if args.isolate else 'in-process'}; "
          f"memory cap {args.mem_cap_bytes / 2**30:.1f} GiB")
    workdir = Path(tempfile.mkdtemp(prefix="vqkernels-bench-"))
    try:
        rows = run_suite(args, mod, device, cases, threads_list, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    paths = write_outputs(rows, meta, out_dir, op, args.plot, getattr(mod, "CSV_COLUMNS", None))
    print()
    print(mod.format_table(rows, meta) if hasattr(mod, "format_table") else format_table(rows, meta))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
