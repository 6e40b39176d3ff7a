#!/usr/bin/env python
"""The benchmark runner from a checkout: ``python benchmarks/run.py [options]`` is ``vqkernels bench [options]``.

See ``benchmarks/README.md`` or ``--help``. All the work is in :mod:`vqkernels.bench.runner`.
"""
import sys
from pathlib import Path

try:
    import vqkernels  # noqa: F401  (an installed package, with its built extension, wins)
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqkernels.bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
