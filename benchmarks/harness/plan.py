"""Planning a run: which suites, which cases (size, dtype, mode, providers), which thread counts, the memory cap."""
from __future__ import annotations

import os
import re

from ..suites import DEFAULT_SUITES, GROUPS, load_suite
from .common import usable_cores
from .protocol import Case


def resolve_device(want: str) -> str:
    if want != "auto":
        return want
    import torch

    try:
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"


def split(items) -> list[str]:
    """["a,b", "c"] -> ["a", "b", "c"]."""
    out = []
    for it in items or []:
        out += [s for s in re.split(r"[,\s]+", it) if s]
    return out


def _parses(suite, token: str) -> bool:
    try:
        suite.parse_size(token)
        return True
    except SystemExit:
        return False


def plan_ops(args) -> list[str]:
    """The suites this run benchmarks: ``--ops`` (``all``: every suite, ``models``: vqgan and gpt; the old ``--op``),
    default ``DEFAULT_SUITES``. With several, a suite that knows none of the ``--providers``, ``--dtypes`` or
    ``--sizes`` named is left out; a name no suite knows is an error."""
    want = args.ops or ([args.op] if args.op else list(DEFAULT_SUITES))
    ops = list(dict.fromkeys(op for name in want for op in GROUPS.get(name, (name,))))
    if len(ops) == 1:
        return ops
    suites = {op: load_suite(op) for op in ops}
    filters = (("--providers", split(args.providers), lambda s, n: n in s.providers),
               ("--dtypes", split(args.dtypes), lambda s, n: n in s.dtypes),
               ("--sizes", split(args.sizes), _parses))
    for flag, names, knows in filters:
        if not names:
            continue
        for n in names:
            if not any(knows(s, n) for s in suites.values()):
                raise SystemExit(f"{flag}: {n!r} is not known to any of the suites {', '.join(ops)}")
        ops = [op for op in ops if any(knows(suites[op], n) for n in names)]
    return ops


def plan_cases(args, suite, device: str, lenient: bool = False) -> list[Case]:
    """The cases this run measures. ``lenient`` (a run of several suites): take the ``--providers``, ``--dtypes``
    and ``--sizes`` this suite knows and ignore the others (:func:`plan_ops` checked them)."""
    dtypes = split(args.dtypes)
    providers = split(args.providers)
    sizes = split(args.sizes)
    modes = split(args.modes)
    if lenient:
        dtypes = [d for d in dtypes if d in suite.dtypes]
        providers = [n for n in providers if n in suite.providers]
        sizes = [s for s in sizes if _parses(suite, s)]
        modes = [m for m in modes if m in suite.modes]
    for d in dtypes:
        suite.dtype_of(d)  # validate early
    for name in providers:
        if name not in suite.providers:
            raise SystemExit(f"unknown {suite.op} provider {name!r}; expected some of {', '.join(suite.providers)}")
    for m in modes:
        if m not in suite.modes:
            raise SystemExit(f"unknown {suite.op} mode {m!r}; expected some of {', '.join(suite.modes) or '(none)'}")
    if sizes:
        cases = suite.cases_for([suite.parse_size(s) for s in sizes], dtypes or [next(iter(suite.dtypes))], device)
    else:
        cases = suite.default_cases(device, quick=args.quick, large=args.large)
        if dtypes:
            cases = [c for c in cases if c.dtype in dtypes]
    if modes:
        cases = [c for c in cases if c.mode in modes]
    if providers:
        cases = [Case(c.size, c.dtype, tuple(providers), c.mode) for c in cases]
    return cases


def plan_threads(args) -> list[int]:
    n = usable_cores()
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

        if not torch.cuda.is_available():  # planning only (--list): an H100's 80 GB
            return int(0.9 * 80 * 2**30)
        return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
