"""Collect the ``bench_*.py`` modules of this folder when pytest is pointed at it.

``pytest benchmarks/ --benchmark-only`` runs them; the main test run never sees them (pyproject's
``testpaths = ["tests"]``), and their file names do not match pytest's ``test_*.py`` pattern.
"""
import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself: do not collect it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
