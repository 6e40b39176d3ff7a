"""The benchmark runner's command line: ``python benchmarks/run.py [options]`` (``make bench``) calls :func:`main`.

What the pieces do (a newcomer's map):
  protocol.py  what a suite declares: Size (a NamedTuple of its dimensions), modes, metrics, providers, checks
  plan.py      which suites, cases (size x dtype x mode x providers), thread counts and memory cap
  measure.py   one measurement: warm-up, memory baseline, timed calls, the suite's metrics, the check
  isolate.py   the same measurement in a fresh process (the default on CPU), with a timeout and an RSS watchdog
  memory.py    the peak-memory meter (VmHWM on CPU, max_memory_allocated on CUDA)
  stamps.py    device, CPU ISA, versions, git sha, date: the metadata of every result
  report.py    CSV / JSON / PNG per suite, and the generic table
  common.py    what suites and harness share: why a provider cannot run, number formats
  pytest_bench.py  the same measurement steps for the pytest-benchmark modules (benchmarks/bench_*.py)
The suites are the modules of ``benchmarks/suites/``, listed once in ``benchmarks/suites/__init__.py``.

A provider that cannot run (not built, wrong device or dtype, a peer not installed), whose memory estimate is
over ``--mem-cap-gb``, or that passes ``--timeout`` is recorded as skipped, too big or timed out, with the
reason, and the run goes on.

Output (``--out``, default ``benchmarks/results/<date>-<device-slug>/``): per suite ``<op>.csv``,
``<op>.json`` (the same rows plus every timing and the stamps) and ``<op>.png``; a table is printed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..suites import DEFAULT_SUITES, GROUPS, SUITES, load_suite
from .isolate import clean_env, run_subprocess
from .measure import measure
from .plan import default_mem_cap, plan_cases, plan_ops, plan_threads, resolve_device
from .report import write_outputs
from .stamps import collect_meta, default_out_dir


def build_parser() -> argparse.ArgumentParser:
    """The runner's options."""
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description="The vqkernels benchmark suites.")
    p.add_argument("--ops", nargs="+", choices=list(SUITES) + list(GROUPS), default=None, metavar="OP",
                   help=f"the suites that run, in this order: {', '.join(SUITES)}; or all, or models (vqgan gpt) "
                        f"(default: {', '.join(DEFAULT_SUITES)})")
    p.add_argument("--op", choices=sorted(SUITES), default=None, help=argparse.SUPPRESS)  # old spelling of --ops OP
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when a GPU is present, else cpu (the suite's sizes follow the device)")
    p.add_argument("--sizes", nargs="+", metavar="SIZE",
                   help="a named size or the suite's dimensions (NxKxD for the search, BxHxTxDh for attention; "
                        "see --list); replaces the suite's sizes; comma-separated lists work too")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help="fp32, bf16, fp16: the dtypes for --sizes (default fp32), or a filter on the suite's cases")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="a filter on the suite's modes (attention: fwd, fwdbwd-causal, decode, ...; see --list)")
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
                          "resetting VmHWM and the allocator returning freed memory. Providers that need their "
                          "own process (stand-in modules, a separate install) still get one")
    iso.add_argument("--subprocess", dest="isolate", action="store_true", default=None,
                     help="a fresh subprocess per measurement (the default on CPU, except with --quick; on CUDA the "
                          "default is in-process: its memory reading is exact there and a process costs seconds)")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="skip a provider whose estimated memory exceeds this; a subprocess whose RSS passes "
                        "it (+1 GiB) is killed (default: half the physical RAM on CPU, 90%% of the GPU's memory)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement subprocess (default 300)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the correctness check against the reference")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="time Triton on CPU under TRITON_INTERPRET=1 (slow; skipped by default)")
    p.add_argument("--seed", type=int, default=0, help="input seed")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default benchmarks/results/<date>-<device-slug>/)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw the PNG")
    p.add_argument("--list", action="store_true", help="list providers, sizes and the planned cases, then exit")
    return p


def main(argv=None) -> int:
    """``python benchmarks/run.py``: parse ``argv`` and run."""
    return run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))


def run(args) -> int:
    """Run the suites described by ``args`` (from :func:`build_parser`), one after the other; returns an exit
    status (1 when some measurement failed and none ran)."""
    argv_repr = " ".join(sys.argv)
    ops = plan_ops(args)
    device = resolve_device(args.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available() and not args.list:  # planning (--list) needs no GPU
            raise SystemExit("--device cuda: no CUDA device here")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 0.2
    if args.isolate is None:
        args.isolate = not args.quick and device == "cpu"
    args.mem_cap_bytes = int(args.mem_cap_gb * 2**30) if args.mem_cap_gb else default_mem_cap(device)
    suites = {op: load_suite(op) for op in ops}
    plans = {op: plan_cases(args, suites[op], device, lenient=len(ops) > 1) for op in ops}
    threads_list = plan_threads(args)

    if args.list:
        for op in ops:
            print_plan(suites[op], plans[op], device, threads_list)
        return 0

    meta = collect_meta(device, args, argv_repr)
    out_dir = args.out or default_out_dir(meta)
    all_rows = []
    for i, op in enumerate(ops):
        if i:
            print()
        all_rows += run_op(args, suites[op], plans[op], device, threads_list, meta, out_dir)
    bad = [r for r in all_rows if r["status"] in ("error", "oom")]
    return 1 if bad and not any(r["status"] == "ok" for r in all_rows) else 0


def print_plan(suite, cases, device, threads_list) -> None:
    print(f"providers ({suite.op}):")
    w = max([14] + [len(p.name) + 2 for p in suite.providers.values()])
    for p in suite.providers.values():
        print(f"  {p.name:<{w}}{p.kind:<10}{p.doc}")
    print(f"named sizes ({' x '.join(suite.Size._fields)}):")
    wn = max([12] + [len(n) + 2 for n in suite.sizes])
    ws = max([22] + [len(suite.label(s.size)) + 2 for s in suite.sizes.values()])
    for n, s in suite.sizes.items():
        print(f"  {n:<{wn}}{suite.label(s.size):<{ws}}{s.note}")
    if suite.modes:
        print(f"modes: {', '.join(suite.modes)}")
    print(f"planned on {device}, threads {threads_list}:")
    wc = max([24] + [len(suite.case_label(c)) + 2 for c in cases])
    for c in cases:
        print(f"  {suite.case_label(c):<{wc}}{', '.join(c.providers)}")


def run_op(args, suite, cases, device, threads_list, meta, out_dir: Path) -> list[dict]:
    """One suite: measure its cases, write ``<op>.csv/.json/.png`` into ``out_dir``, print its table."""
    print(f"benchmark {suite.op} on {meta['device_name']} ({device}), threads {threads_list}, "
          f"{args.repeats} repeats; {'subprocess per measurement' if args.isolate else 'in-process'}; "
          f"memory cap {args.mem_cap_bytes / 2**30:.1f} GiB")
    workdir = Path(tempfile.mkdtemp(prefix="vqkernels-bench-"))
    try:
        rows = run_suite(args, suite, device, cases, threads_list, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    paths = write_outputs(suite, rows, meta, out_dir, args.plot)
    print()
    print(suite.format_table(rows, meta))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return rows


def run_suite(args, suite, device: str, cases, threads_list, workdir: Path, log=print) -> list[dict]:
    rows = []
    n_jobs = sum(len(c.providers) for c in cases) * len(threads_list)
    j = 0
    for threads in threads_list:
        for case in cases:
            for name in case.providers:
                j += 1
                prov = suite.providers[name]
                dev = prov.data_device or device
                row = {"op": suite.op, "case": suite.case_label(case), **case.size._asdict(), "dtype": case.dtype,
                       **({"mode": case.mode} if suite.modes else {}),
                       "provider": name, "kind": prov.kind, "device": dev, "threads": threads}
                # Cheap checks here, so an unavailable provider costs no subprocess.
                reasons = prov.reasons(case, dev)
                need = suite.estimate_bytes(prov, case)
                if reasons:
                    res = {"status": "skipped", "reason": "; ".join(reasons)}
                elif need > args.mem_cap_bytes:
                    res = {"status": "too_big",
                           "reason": f"it needs ~{need / 2**30:.1f} GiB, over the memory cap "
                                     f"{args.mem_cap_bytes / 2**30:.1f} GiB (--mem-cap-gb)"}
                else:
                    spec = {"op": suite.op, "provider": name, "size": list(case.size), "dtype": case.dtype,
                            "mode": case.mode, "device": device, "threads": threads, "seed": args.seed,
                            "repeats": args.repeats, "warmup": args.warmup, "min_time": args.min_time,
                            "check": args.check, "ref_cache": str(workdir),
                            "allow_interpreter": args.allow_interpreter}
                    if args.isolate or prov.isolated:
                        cap = args.mem_cap_bytes + 2**30 if device == "cpu" else None
                        extra = prov.child_path() if prov.child_path else ()
                        res = {"isolation": "subprocess", **run_subprocess(spec, args.timeout, cap, workdir, extra)}
                    else:
                        res = {"isolation": "in-process", **_measure_here(spec, args)}
                row.update(res)
                rows.append(row)
                log(f"[{j}/{n_jobs}] {name:>13} {row['case']:<22} t={threads}  {suite.progress_line(row)}")
    suite.add_ratios(rows)
    return rows


def _measure_here(spec, args) -> dict:
    import torch

    if args.allow_interpreter:
        os.environ["VQKERNELS_BENCH_ALLOW_INTERPRETER"] = "1"
    saved_threads = torch.get_num_threads()
    try:
        with clean_env():
            return measure(spec)
    finally:
        torch.set_num_threads(saved_threads)


if __name__ == "__main__":
    raise SystemExit(main())
