"""What a benchmark suite declares, and what the runner does with it.

A suite (one per benchmarked op or model, each a module of :mod:`benchmarks.suites`, which lists them) is a
:class:`Suite` subclass instance named ``SUITE`` in its module. It says:

- ``Size``: a :class:`typing.NamedTuple` of the benchmark's own dimensions -- ``(N, K, D)`` for the search,
  ``(B, H, T, Dh)`` for attention, ``(config, batch, resolution)`` for the VQGAN -- and ``sizes``, the named
  ones (``NamedSize``: a size and where it comes from);
- ``modes``: what one call does when a suite times several things on one size (``fwd``, ``fwd+bwd``,
  ``decode``; ``train``, ``encode``; empty for a suite with one workload);
- ``metrics``: its throughput columns, each a :class:`Metric` (``GFLOP/s``, ``TFLOP/s``, ``GB/s``,
  ``images/s``, ``tokens/s``): the work of one call of a case divided by its median time;
- ``providers``: the ways of doing the work (:class:`Provider`: ours, the reference, the peers, a floor);
- ``make_inputs``, ``default_cases``, and optionally a correctness check (``reference`` + ``answer`` +
  ``compare``), its own ratio columns (``add_ratios``), table and CSV columns.

Every method has a default here, so a suite overrides what it needs and the runner calls every method
unconditionally.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

from .common import fmt_mem, fmt_num, fmt_time, group_rows
from .report import MEMORY_COLUMNS, STAMP_COLUMNS, TIME_COLUMNS, metric_table

KINDS = ("ours", "reference", "peer", "floor")
STATUSES = ("ok", "skipped", "too_big", "timeout", "error", "oom")


class NamedSize(NamedTuple):
    """A size of a suite's own ``Size`` type, and where it comes from (a real model, a target)."""

    size: Any
    note: str = ""


@dataclass(frozen=True)
class Metric:
    """A throughput column: ``work(case) / time / scale``, or empty where ``work`` is None for a case.

    ``work`` counts what one call of the case does (FLOPs, bytes, images, tokens); ``scale`` turns the rate
    into the unit (1e9 for GFLOP/s)."""

    column: str  # the CSV column: gflops, tflops, gb_per_s, images_per_s, tokens_per_s, vectors_per_s
    unit: str  # as printed: GFLOP/s, TFLOP/s, GB/s, images/s, tokens/s
    work: Callable[["Case"], float | None]
    scale: float = 1.0

    def rate(self, case: "Case", seconds: float) -> float | None:
        w = self.work(case)
        if w is None or not seconds or seconds <= 0:
            return None
        return w / seconds / self.scale


@dataclass(frozen=True)
class Case:
    """One size at one dtype (and one mode), and the providers that run on it."""

    size: Any  # the suite's Size
    dtype: str
    providers: tuple[str, ...]
    mode: str = ""


@dataclass(frozen=True)
class Provider:
    """One way of doing a suite's work.

    ``build(inputs, case) -> fn``: a zero-argument callable, one call of which is what is timed; ``inputs`` is
    what the suite's ``make_inputs`` returned. ``reasons(case, device) -> [str]``: why it cannot run this case
    on this device (empty: it can); cheap, called before any subprocess starts.

    ``isolated``: always measured in a fresh process, even with ``--in-process`` (it puts stand-in modules in
    ``sys.modules``, or needs ``child_path``). ``child_path() -> [str]``: directories put first on the
    measurement process's ``PYTHONPATH`` (a separate install of a peer that cannot share a process with
    another's stand-ins)."""

    name: str
    kind: str  # "ours" | "reference" | "peer" | "floor"
    doc: str
    build: Callable[[Any, Case], Callable[[], Any]]
    reasons: Callable[[Case, str], list]
    checked: bool = True  # its answer is comparable with the reference (a floor's is not)
    data_device: str | None = None  # where it computes when that is not the suite's device (faiss)
    isolated: bool = False
    child_path: Callable[[], list] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"provider {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


def parse_dims(Size, token: str):
    """``"8x8x256x64"`` -> ``Size(8, 8, 256, 64)`` for a size of integer fields (any of x * , : between)."""
    parts = re.split(r"[x*,:]", token.lower())
    if len(parts) != len(Size._fields) or not all(p.isdigit() for p in parts):
        return None
    return Size(*map(int, parts))


class Suite:
    """The protocol, with defaults. Subclasses set the class attributes and override what differs."""

    op: str = ""
    title: str = ""  # one line for the table's header
    Size: type = tuple  # a NamedTuple class of the suite's dimensions
    sizes: dict = {}  # name -> NamedSize
    dtypes: dict = {}  # name -> torch.dtype
    modes: tuple = ()  # empty: one workload, no "mode" column
    metrics: tuple = ()  # Metric, ...
    providers: dict = {}  # name -> Provider
    cpu_providers: tuple = ()  # the providers of --sizes cases, per device
    cuda_providers: tuple = ()
    check_columns: tuple = ()  # what compare() returns, in CSV order
    ratio_columns: tuple = ("best_peer", "speedup_vs_best_peer")
    reference_provider: str | None = None  # whose own answer is the reference (None: reference() computes it)
    plot_metric: str | None = None  # plot this metric instead of time (bars: higher is better)

    # --- sizes and cases -------------------------------------------------------------------------
    def label(self, size) -> str:
        """How a size reads in tables and file names: ``3072x1024x256``."""
        return "x".join(str(v) for v in size)

    def case_label(self, case: Case) -> str:
        return f"{self.label(case.size)} {case.dtype}" + (f" {case.mode}" if case.mode else "")

    def parse_size(self, token: str):
        """A named size or the suite's dimensions written ``AxBxC``; SystemExit with the choices otherwise."""
        if token in self.sizes:
            return self.sizes[token].size
        s = parse_dims(self.Size, token)
        if s is None:
            raise SystemExit(f"bad {self.op} size {token!r}: expected {'x'.join(self.Size._fields)} "
                             f"or one of {', '.join(self.sizes)}")
        return s

    def dtype_of(self, name: str):
        try:
            return self.dtypes[name]
        except KeyError:
            raise ValueError(f"the {self.op} suite runs {tuple(self.dtypes)}, not {name!r}") from None

    def default_cases(self, device: str, quick: bool = False, large: bool = False) -> list[Case]:
        raise NotImplementedError

    def default_providers(self, device: str) -> tuple:
        return self.cuda_providers if device == "cuda" else self.cpu_providers

    def cases_for(self, sizes, dtypes, device: str) -> list[Case]:
        """The cases of ``--sizes`` (every mode the suite has, or its only workload)."""
        provs = tuple(self.default_providers(device))
        return [Case(s, d, provs, m) for s in sizes for d in dtypes for m in (self.modes or ("",))]

    def warmup_case(self, case: Case) -> Case:
        """A tiny case of the same kind, run once before the memory baseline (loads lazy libraries, starts
        thread pools); the default is the case itself."""
        return case

    def with_size(self, case: Case, **dims) -> Case:
        return replace(case, size=case.size._replace(**dims))

    # --- inputs, memory estimate -----------------------------------------------------------------
    def make_inputs(self, case: Case, device: str, seed: int = 0):
        raise NotImplementedError

    def estimate_bytes(self, provider: Provider, case: Case) -> int:
        """What ``provider`` would hold at its peak on ``case`` (0: small), for the memory cap."""
        return 0

    # --- correctness -----------------------------------------------------------------------------
    def reference(self, inputs, case: Case):
        """The oracle's answer for these inputs (computed once per input and cached for the others)."""
        return None

    def answer(self, provider: Provider, inputs, case: Case, fn, out):
        """(what to compare with the reference, extra columns) from the last timed result ``out``."""
        return out, {}

    def compare(self, inputs, case: Case, answer, ref) -> dict:
        """The check columns (``check_columns``) for ``answer`` against ``ref``."""
        return {}

    # --- results ---------------------------------------------------------------------------------
    def csv_columns(self) -> list[str]:
        return (["op", "case", *self.Size._fields, "dtype"] + (["mode"] if self.modes else [])
                + ["provider", "kind", "device", "threads"] + TIME_COLUMNS
                + [m.column for m in self.metrics] + MEMORY_COLUMNS + list(self.check_columns)
                + list(self.ratio_columns) + STAMP_COLUMNS + ["isolation"])

    def group_key(self, row) -> tuple:
        return (row["threads"], *(row[f] for f in self.Size._fields), row["dtype"], row.get("mode", ""))

    def is_correct(self, row) -> bool:
        """Whether an ok row's answer passed the check (a fast but wrong peer is no bar)."""
        return True

    def add_ratios(self, rows) -> None:
        """``best_peer`` and ``speedup_vs_best_peer`` (the fastest correct peer's time / this time)."""
        for group in group_rows(rows, self.group_key).values():
            best = self.best_peer(group)
            for r in group:
                r["best_peer"] = best["provider"] if best else None
                r["speedup_vs_best_peer"] = (best["time_s"] / r["time_s"] if best and r["status"] == "ok"
                                             else None)

    def best_peer(self, group):
        peers = [r for r in group if r["kind"] == "peer" and r["status"] == "ok" and self.is_correct(r)]
        return min(peers, key=lambda r: r["time_s"]) if peers else None

    def progress_line(self, row) -> str:
        if row["status"] != "ok":
            return f"{row['status']}: {row['reason'][:110]}"
        rates = ", ".join(f"{fmt_num(row.get(m.column))} {m.unit}" for m in self.metrics
                          if row.get(m.column) is not None)
        return f"{fmt_time(row['time_s'])}, {rates}, {fmt_mem(row.get('peak_mem_bytes'))}"

    def format_table(self, rows, meta) -> str:
        return metric_table(self, rows, meta)
