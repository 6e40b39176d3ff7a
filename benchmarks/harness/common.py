"""What the suites and the harness share: why a provider cannot run here (:func:`device_reasons`,
:func:`importable_reasons`, :func:`backend_reasons`, :func:`interpreter_reasons`), the cores this process may
use, and the number formats and row grouping of the printed tables.

A reason is a sentence for the ``reason`` column; a provider with any is recorded as skipped, never run.
"""
from __future__ import annotations

import math
import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- why a provider cannot run ------------------------------------------------------------------

def device_reasons(device: str) -> list[str]:
    """Why nothing runs on ``device`` here: a CUDA run on a machine without a GPU."""
    if device == "cuda":
        import torch

        try:
            ok = torch.cuda.is_available()
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            return ["no CUDA device here"]
    return []


def importable_reasons(module: str) -> list[str]:
    """Why ``module`` (a peer, or a part of ours) cannot be used: it does not import. The reason names the module
    and the error (a peer that is not installed: ``ModuleNotFoundError``)."""
    try:
        # As the import statement does: every parent package first, so a package that is gone (absent, or hidden
        # as on the GPU image) says so even where one of its submodules was loaded earlier.
        __import__(module)
    except Exception as e:  # noqa: BLE001 -- any failure to import is a reason to skip, with its message
        return [f"{module} is not importable ({type(e).__name__}: {e})"]
    return []


def backend_reasons(op: str, backend: str, **named) -> list[str]:
    """Why ``backend`` cannot run ``op`` on these (named) arguments, from the op's own capability table."""
    from vqkernels import _backend

    try:
        return list(_backend.not_supported_reasons(op, backend, **named))
    except TypeError:  # a table whose reason functions name their arguments differently: pass them in order
        return list(_backend.not_supported_reasons(op, backend, *named.values()))


def interpreter_reasons(backend: str, device: str) -> list[str]:
    """Triton on CPU tensors runs only under its interpreter: not timed unless --allow-interpreter."""
    if (backend == "triton" and device == "cpu"
            and os.environ.get("VQKERNELS_BENCH_ALLOW_INTERPRETER", "0") in ("", "0")):
        return ["Triton runs on CPU tensors only under its interpreter, which is not worth timing "
                "(--allow-interpreter times it anyway)"]
    return []


# --- tables -----------------------------------------------------------------------------------

def group_rows(rows, key) -> dict:
    """Rows grouped by ``key(row)``, in the order the groups first appear."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def fmt_time(t) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def fmt_mem(b) -> str:
    if b is None or b == "":
        return "-"
    return f"{b / 2**20:.1f} MB" if b < 2**30 else f"{b / 2**30:.2f} GB"


def fmt_num(v) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.3g} M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.3g} k"
    return f"{v:.4g}" if abs(v) >= 1e3 else f"{v:.3g}"
