"""A measurement in a fresh process: the spec goes in as JSON, the result comes back as JSON.

``python -m benchmarks.harness.isolate SPEC.json OUT.json`` (the checkout's root on the path) measures one case
(:func:`.measure.measure`). The parent watches it: killed past the timeout, or (CPU) once its RSS passes the
memory cap. A fresh process gives exact CPU peak memory (no heap kept from earlier cases) and keeps apart what
cannot share a process (a peer's stand-in modules, a second install of a library).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .memory import proc_status_kb

# The test suite's switches that must not reach a measurement (a forced backend, poisoned outputs).
TEST_ENV = ("VQKERNELS_BACKEND", "VQKERNELS_POISON_OUTPUTS")


@contextlib.contextmanager
def clean_env():
    """In-process runs: no backend override, no output poisoning (the tests set them)."""
    saved = {k: os.environ.pop(k) for k in TEST_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def child_env(threads: int, allow_interpreter: bool, extra_path=()) -> dict:
    env = dict(os.environ)
    for k in TEST_ENV:
        env.pop(k, None)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    if allow_interpreter:
        env["VQKERNELS_BENCH_ALLOW_INTERPRETER"] = "1"
    # The child imports the very vqkernels this process runs (an installed one, or the checkout's) and this
    # harness from the checkout it lives in; a provider's own paths come first.
    import vqkernels

    vqkernels_root = str(Path(vqkernels.__file__).resolve().parents[1])
    checkout = str(Path(__file__).resolve().parents[2])
    paths = list(dict.fromkeys([str(p) for p in extra_path] + [vqkernels_root, checkout]))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_subprocess(spec: dict, timeout: float, rss_cap: int | None, workdir: Path, extra_path=()) -> dict:
    """One measurement in a fresh interpreter, killed past ``timeout`` or past ``rss_cap`` bytes of RSS."""
    tag = "".join(ch if ch.isalnum() or ch in "-_." else "_"
                  for ch in f"{spec['op']}-{spec['provider']}-{'x'.join(map(str, spec['size']))}-{spec['dtype']}"
                            f"-{spec.get('mode', '')}-t{spec['threads']}")
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.harness.isolate", str(spec_path), str(out_path)]
    log = open(workdir / f"{tag}.log", "w+")
    proc = subprocess.Popen(cmd, env=child_env(spec["threads"], spec.get("allow_interpreter", False), extra_path),
                            stdout=log, stderr=subprocess.STDOUT)
    t0, killed = time.monotonic(), None
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                killed = ("timeout", f"killed after the {timeout:.0f} s timeout (--timeout)")
            elif rss_cap is not None:
                rss = (proc_status_kb("VmRSS", str(proc.pid)) or 0) * 1024
                if rss > rss_cap:
                    killed = ("too_big", f"killed: RSS {rss / 2**30:.1f} GiB passed the memory cap "
                                         f"{rss_cap / 2**30:.1f} GiB (--mem-cap-gb, +1 GiB)")
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
    except BaseException:  # Ctrl-C: do not leave the child running
        proc.kill()
        proc.wait()
        raise
    if killed:
        return {"status": killed[0], "reason": killed[1]}
    if proc.returncode != 0 or not out_path.exists():
        log.seek(0)
        tail = " | ".join(log.read().strip().splitlines()[-3:])
        return {"status": "error", "reason": f"subprocess exited {proc.returncode}: {tail}"[:500]}
    return json.loads(out_path.read_text())


def child_main(argv) -> int:
    """``python -m benchmarks.harness.isolate SPEC.json OUT.json``."""
    from .measure import measure

    spec = json.loads(Path(argv[0]).read_text())
    res = measure(spec)
    Path(argv[1]).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
