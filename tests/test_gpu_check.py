"""The staged GPU check (scripts/gpu_check.sh) is well formed: its plan fits a 30-minute lease in commands of
at most 10 minutes, every stage names files that exist and arguments that parse, and the sanitizer workload
runs. The rehearsal of the test stages without the peer packages runs in CI (.ci/run)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args, env=None, timeout=300):
    e = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, env=e,
                          timeout=timeout)


def _stages():
    out = _run("--list").stdout
    return re.findall(r"^(\S+)\s+(\d+)s\s", out, flags=re.M), out


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_plan_fits_the_lease():
    stages, out = _stages()
    assert len(stages) >= 5, out
    budgets = [int(b) for _, b in stages]
    assert all(b <= 540 for b in budgets), "every stage must end well inside a 10-minute command"
    assert sum(budgets) + 120 <= 30 * 60, f"the plan ({sum(budgets)} s + start) must fit 30 minutes"
    for name, _ in stages:
        assert f"bash scripts/gpu_check.sh {name}" in out, f"--list must give the exact command for {name}"


def test_every_stage_is_well_formed():
    stages, _ = _stages()
    for name, _ in stages:
        r = _run("--dry-run", name)
        assert r.returncode == 0, f"stage {name}: {r.stdout}\n{r.stderr}"


def test_each_stage_names_only_existing_test_files():
    stages, _ = _stages()
    missing = []
    for name, _ in stages:
        out = _run("--dry-run", name).stdout
        missing += [line.split()[2] for line in out.splitlines() if "(not in this checkout)" in line]
    assert not missing, f"stages name test files that do not exist: {missing}"


def test_unknown_stage_is_refused():
    r = _run("no-such-stage")
    assert r.returncode != 0 and "unknown stage" in r.stdout


def test_sanitizer_workload_runs_without_a_gpu(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_sanitize_cases.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(out.read_text())


def test_hide_peers_plugin_hides_them(tmp_path):
    t = tmp_path / "test_probe.py"
    t.write_text("import importlib.util\n"
                 "def test_gone():\n"
                 "    for n in ('taming', 'vector_quantize_pytorch', 'faiss'):\n"
                 "        assert importlib.util.find_spec(n) is None\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "plugins"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "hide_peers", "-p", "no:cacheprovider", str(t)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
