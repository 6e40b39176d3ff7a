#!/usr/bin/env python
"""The benchmark runner: ``python benchmarks/run.py [options]`` (``make bench`` calls it with ``BENCH_ARGS``).

See ``benchmarks/README.md`` or ``--help``. All the work is in :mod:`benchmarks.harness.runner`.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

try:
    import vqkernels  # noqa: F401  (an installed package, with its built extension, wins)
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(ROOT))
# The harness and the suites are the package `benchmarks` of this checkout: its root on the path instead of this
# script's folder (whose modules would otherwise import a second time under other names).
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness.runner import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
