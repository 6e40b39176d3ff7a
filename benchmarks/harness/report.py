"""Reports: a suite's rows as CSV (its own columns + the stamps), JSON (rows, every timing, the metadata), a PNG
(matplotlib) and the printed table (:func:`metric_table` unless the suite formats its own).

It knows a suite only by its attributes (``op``, ``metrics``, ``csv_columns()``, ...), so it imports nothing of
:mod:`.protocol`, which imports it."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .common import fmt_mem, fmt_num, fmt_time, group_rows

# The timing columns every suite's CSV has, and the stamps copied into every row (so a row read alone says
# where it came from); a suite's columns are these around its own (:meth:`.protocol.Suite.csv_columns`).
TIME_COLUMNS = ["status", "reason", "time_s", "time_min_s", "time_max_s", "repeats", "warmup"]
MEMORY_COLUMNS = ["peak_mem_bytes", "peak_mem_mb", "mem_method"]
STAMP_COLUMNS = ["date_utc", "device_name", "cpu_model", "cores", "git_sha", "python", "torch", "triton",
                 "faiss", "vqkernels"]


def write_outputs(suite, rows, meta, out_dir: Path, plot: bool) -> dict:
    columns = suite.csv_columns()
    out_dir.mkdir(parents=True, exist_ok=True)
    op = suite.op
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
            plot_rows(suite, rows, meta, paths["png"])
        except Exception as e:  # noqa: BLE001 -- a missing matplotlib must not lose the numbers
            paths.pop("png", None)
            print(f"(no plot: {type(e).__name__}: {e})")
    return paths


# One colour per provider in every plot (tab10 indices), so plots of different runs read alike.
PLOT_COLORS = {"cpu": 3, "cuda": 3, "triton": 1, "torch": 2, "taming": 0, "vqtorch": 4, "faiss": 5,
               "torch_mm": 7, "cublas_matmul": 7,
               "vqkernels": 3, "vqkernels-torch": 2, "vqkernels-ema": 6, "vqtorch-ema": 8,
               "sdpa": 4, "sdpa-flash": 4, "sdpa-efficient": 5, "sdpa-cudnn": 6, "sdpa-math": 8, "mingpt": 0,
               "flash-attn": 9, "hf-gpt2": 4, "taming-past": 8}


def plot_rows(suite, rows, meta, path: Path) -> None:
    """Grouped bars per case, log scale, one panel per thread count: time, or the suite's ``plot_metric``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((m for m in suite.metrics if m.column == suite.plot_metric), None)
    value = (lambda r: r.get(metric.column)) if metric else (lambda r: r["time_s"])
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
                     and r["status"] == "ok" and value(r)]
                if m:
                    xs.append(ci - 0.4 + width * (i + 0.5))
                    ys.append(value(m[0]))
            if xs:
                ax.bar(xs, ys, width, label=p, color=cmap(PLOT_COLORS.get(p, 9)))
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace(" ", "\n") for c in cases], fontsize=8)
        ax.set_ylabel(f"{metric.unit} (log, higher is better)" if metric else "time per call (s, log)")
        ax.set_title(f"{suite.op}: {meta['device_name']}, {t} thread(s)" if meta["device"] == "cpu"
                     else f"{suite.op}: {meta['device_name']}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.suptitle(f"{' x '.join(suite.Size._fields)} dtype -- torch {meta['torch']}, git {meta['git_sha'][:10]}, "
                 f"{meta['date_utc']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def header_line(suite, meta) -> str:
    return (f"{suite.title or suite.op}: {meta['device_name']} ({meta['device']}), {meta['usable_cores']} cores "
            f"usable; torch {meta['torch']}; git {meta['git_sha'][:12]}; {meta['date_utc']}")


def metric_table(suite, rows, meta) -> str:
    """The generic table: a block per case, a line per provider with its time, metrics, peak memory, check
    columns and its speed-up against the best peer; then a line per (ours, best peer)."""
    lines = [header_line(suite, meta)]
    cols = [(m.column, m.unit) for m in suite.metrics]
    checks = list(suite.check_columns)
    hdr = (f"  {'provider':<16}{'kind':<10}{'time':>10}" + "".join(f"{u:>12}" for _, u in cols)
           + f"{'peak mem':>11}" + "".join(f"{c[:11]:>12}" for c in checks) + f"{'vs best peer':>14}")
    for _, group in group_rows(rows, suite.group_key).items():
        r0 = group[0]
        dims = " ".join(f"{f}={r0[f]}" for f in suite.Size._fields)
        lines += ["", f"{dims} {r0['dtype']}" + (f" {r0['mode']}" if r0.get("mode") else "")
                  + f", {r0['threads']} thread(s)", hdr]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"  {r['provider']:<16}{r['kind']:<10}{r['status']}: {r['reason'][:100]}")
                continue
            sp = r.get("speedup_vs_best_peer")
            lines.append(f"  {r['provider']:<16}{r['kind']:<10}{fmt_time(r['time_s']):>10}"
                         + "".join(f"{fmt_num(r.get(c)):>12}" for c, _ in cols)
                         + f"{fmt_mem(r.get('peak_mem_bytes')):>11}"
                         + "".join(f"{_fmt_check(r.get(c)):>12}" for c in checks)
                         + f"{('-' if sp is None else f'{sp:.3g}x'):>14}")
        best = suite.best_peer(group)
        if best:
            for r in group:
                if r["kind"] == "ours" and r["status"] == "ok":
                    lines.append(f"  -> {r['provider']} vs {best['provider']}: {best['time_s'] / r['time_s']:.3g}x, "
                                 f"peak memory {fmt_mem(r.get('peak_mem_bytes'))} vs "
                                 f"{fmt_mem(best.get('peak_mem_bytes'))}")
    lines += ["", "vs best peer = time of the fastest correct peer / this time (> 1: faster than every peer)."]
    return "\n".join(lines)


def _fmt_check(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)[:11]
