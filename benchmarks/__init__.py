"""The benchmarks of vqkernels, beside the code and outside the installed package (pyproject packages only
``vqkernels*``): :mod:`benchmarks.harness` (the runner and what it measures with), :mod:`benchmarks.suites` (one
module per benchmarked op or model, and the one list of them), the pytest-benchmark modules ``bench_*.py`` and
``run.py``, the command line. Import it from the checkout's root (``python benchmarks/run.py`` puts it on the
path)."""
