"""The staged GPU check (scripts/gpu_check.sh) is well formed: its plan, most valuable first (the build and
`vqkernels selftest` on the GPU), fits the device time a task gets (15 minutes with the machine's start: 12 by
default) in commands of at most 10 minutes, every stage names files that exist and arguments that parse, and the
sanitizer workload runs. The rehearsal of the test stages without the peer packages runs in CI (.ci/run)."""
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


def _stages(*args):
    """([(stage, budget)] planned, [(stage, budget)] past the budget, the listing)."""
    out = _run("--list", *args).stdout
    planned, past = out.split("past the budget")
    pat = r"^(\S+)\s+(\d+)s\s"
    return re.findall(pat, planned, flags=re.M), re.findall(pat, past, flags=re.M), out


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_plan_fits_the_device_time():
    stages, past, out = _stages()
    assert len(stages) >= 4, out
    budgets = [int(b) for _, b in stages]
    assert all(int(b) <= 540 for _, b in stages + past), "every stage must end well inside a 10-minute command"
    assert sum(budgets) <= 12 * 60, f"the plan ({sum(budgets)} s) must fit 12 minutes (15 less the start)"
    assert sum(budgets) + 120 <= 15 * 60
    assert stages[0][0] == "selftest" and int(stages[0][1]) <= 300, "a verdict on every kernel comes first"
    assert "vqkernels selftest --device cuda --json" in out
    for name, _ in stages + past:
        assert f"bash scripts/gpu_check.sh {name}" in out, f"--list must give the exact command for {name}"
    # the budget decides which stages are planned, the order stays the value's
    small, small_past, _ = _stages("--budget-min", "5")
    assert [n for n, _ in small] == ["selftest"] and sum(int(b) for _, b in small) <= 300
    assert [n for n, _ in small + small_past] == [n for n, _ in stages + past]
    assert _run("--list", "--budget-min", "soon").returncode != 0


def test_selftest_stage_runs_the_command():
    out = _run("--dry-run", "selftest").stdout
    assert "python -m vqkernels.selftest --device cuda --json" in out
    text = SCRIPT.read_text()
    assert "timeout -s INT" in text, "stages stop themselves at the budget with SIGINT, so they still write results"


def test_every_stage_is_well_formed():
    stages, past, _ = _stages()
    for name, _ in stages + past:
        r = _run("--dry-run", name)
        assert r.returncode == 0, f"stage {name}: {r.stdout}\n{r.stderr}"


def test_each_stage_names_only_existing_test_files():
    stages, past, _ = _stages()
    missing = []
    for name, _ in stages + past:
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


def _probe_broken_peers(tmp_path, **env):
    (tmp_path / "broken_dependency.py").write_text("raise ImportError('a broken dependency of ours')\n")
    t = tmp_path / "test_probe.py"
    t.write_text("import importlib.util, pytest\n"
                 "def test_peer_found_but_broken():\n"
                 "    assert importlib.util.find_spec('taming') is not None  # installed...\n"
                 "    pytest.importorskip('taming.modules.vqvae.quantize')   # ...but broken: skips\n"
                 "def test_other_peer():\n"
                 "    pytest.importorskip('vector_quantize_pytorch')\n"
                 "def test_ours_still_errors():\n"
                 "    with pytest.raises(ImportError, match='broken dependency of ours'):\n"
                 "        pytest.importorskip('broken_dependency')\n")
    e = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests' / 'plugins'}:{ROOT / 'tests'}:{tmp_path}", VQK_PEERS="broken",
             **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "hide_peers", "-p", "conftest",
                           "-p", "no:cacheprovider", str(t)], capture_output=True, text=True, env=e, cwd=tmp_path,
                          timeout=120)


def test_a_broken_peer_skips_its_comparisons_and_is_reported(tmp_path):
    """A peer that is installed but raises a plain ImportError (a broken install): its comparisons skip with the
    error as the reason, the summary names it; our own modules' ImportErrors still fail."""
    r = _probe_broken_peers(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 skipped" in r.stdout and "1 passed" in r.stdout, r.stdout
    assert "installed but does not import (a broken install)" in r.stdout
    assert "broken peer installs" in r.stdout and "taming: ImportError" in r.stdout, r.stdout
    strict = _probe_broken_peers(tmp_path, VQKERNELS_STRICT_PEERS="1")
    assert strict.returncode != 0 and "2 failed" in strict.stdout, strict.stdout
