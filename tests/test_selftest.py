"""`vqkernels selftest` and the self-check gate (VQKERNELS_SELFCHECK): a wrong kernel is caught by both, the
verdicts are cached across processes and invalidated by a new build, and attention on CUDA tensors falls back to
PyTorch's SDPA when our GPU kernels cannot serve.

Wrong kernels are made at runtime: a Python function registered through ``torch.library`` for a C++ op's CPU
dispatch key replaces the built kernel (in a subprocess, so no other test sees it).
"""
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import vqkernels
from vqkernels import BackendNotSupported, _backend, selftest
from vqkernels.ops import attention as att
from vqkernels.ops import code_stats as cs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_c = pytest.mark.skipif(not _backend.has_cpu_kernels(), reason="needs vqkernels._C's CPU kernels")


def _env(tmp_path, **extra):
    env = dict(os.environ, VQKERNELS_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    env.update(extra)
    return env


def _run(code, tmp_path, timeout=300, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def gate(monkeypatch, tmp_path):
    """A fresh gate in this process, its cache in tmp_path; the mode set by the returned function."""
    monkeypatch.setenv("VQKERNELS_CACHE_DIR", str(tmp_path / "cache"))

    def set_mode(mode):
        monkeypatch.setenv("VQKERNELS_SELFCHECK", mode)
        _backend.reset_selfcheck()

    set_mode("auto")
    yield set_mode
    _backend.reset_selfcheck()


# ---------------------------------------------------------------------------------------------------------
# The command.

def test_selftest_on_this_cpu_passes_every_op_in_budget(tmp_path):
    # The budget (2 minutes on this 2-core CPU) is held against the command's CPU time: its wall time on a CI
    # machine shared with other jobs says more about them than about it.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "vqkernels.selftest", "--device", "cpu", "--json"], cwd=ROOT,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["summary"]["failed"] == 0
    lines = out["results"]
    # every op `vqkernels info` lists has lines; every op with cases passed on some backend here
    listed = {k.split("[")[0] for k in vqkernels.info()["backend_choice"] if "not chosen" not in k}
    assert listed <= {r["op"] for r in lines}
    for op in selftest.CASES:
        if op in listed:
            ran = [r for r in lines if r["op"] == op and r["status"] == "passed"]
            assert ran or op == "vector_quantize" and not _backend.cpu_has_avx512(), f"no backend of {op} passed"
    # every runnable (op, backend, dtype): passed, or skipped with a reason
    for r in lines:
        assert r["status"] in ("passed", "skipped") and (r["status"] == "passed" or r["detail"]), r
    assert {r["backend"] for r in lines if r["status"] == "passed"} >= {"torch", "sdpa"} | (
        {"cpu"} if _backend.has_cpu_kernels() else set()) | ({"triton"} if _backend.triton_interpreter() else set())
    assert cpu_seconds < 120, f"selftest took {cpu_seconds:.0f} s of CPU time ({seconds:.0f} s wall; budget 2 min)"
    assert seconds < 600, f"selftest took {seconds:.0f} s"
    # the passes went to the cache file, for the gate of later processes
    cache = json.loads((tmp_path / "cache" / "selfcheck.json").read_text())
    assert any(k.startswith("nearest_code|torch|") for k in cache["passed"])


def test_text_output_and_op_filter(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vqkernels.selftest", "--device", "all", "--op", "code_usage"],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert all(line.startswith("code_usage") for line in lines[:-1])
    assert any(" passed " in line and " torch " in line for line in lines)
    if not torch.cuda.is_available():
        assert any("cuda" in line and "skipped" in line and "no CUDA device" in line for line in lines)
    assert lines[-1].startswith("selftest: ") and "none failed" in lines[-1]
    if not torch.cuda.is_available():  # asked for the GPU and there is none: not a pass
        nogpu = subprocess.run([sys.executable, "-m", "vqkernels.selftest", "--device", "cuda", "--op", "code_usage"],
                               cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert nogpu.returncode == 2 and "no CUDA device" in nogpu.stderr, nogpu.stdout + nogpu.stderr
    bad = subprocess.run([sys.executable, "-m", "vqkernels.selftest", "--op", "no_such_op"], cwd=ROOT,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown op" in (bad.stdout + bad.stderr)


def test_an_op_without_cases_is_reported():
    _backend.declare("selftest_dummy_op", primary="x", torch=_backend.Capability())
    try:
        rs = selftest.run(["selftest_dummy_op"], "cpu")
    finally:
        del _backend._SPECS["selftest_dummy_op"]
    assert [(r.op, r.status, r.detail) for r in rs] == [("selftest_dummy_op", "skipped", "no selftest cases")]
    assert selftest.check("selftest_dummy_op", "torch", "cpu", torch.float32).detail == "no selftest cases"


# ---------------------------------------------------------------------------------------------------------
# Wrong kernels: a wrong answer, a kernel that raises, one that returns NaN.

WRONG_KERNELS = """
    import warnings, torch
    from vqkernels import _backend
    _backend.c_extension()
    LIB = torch.library.Library("vqkernels_C", "IMPL")

    def wrong_nearest(x, cb, metric, allow_tf32):  # every row: code 0
        n = x.shape[0]
        return torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.float32)

    def nan_stats(z, indices, num_codes):  # right counts, NaN sums
        counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
        return counts, torch.full((num_codes, z.shape[-1]), float("nan"), dtype=torch.float32)

    def raising_usage(indices, num_codes):
        raise RuntimeError("deliberately broken kernel")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch warns that a kernel is overridden)
        LIB.impl("nearest_code", wrong_nearest, "CPU")
        LIB.impl("code_stats", nan_stats, "CPU")
        LIB.impl("code_usage", raising_usage, "CPU")
"""


@needs_c
def test_selftest_catches_wrong_raising_and_nan_kernels(tmp_path):
    p = _run(WRONG_KERNELS + """
    import json
    from vqkernels import selftest
    rs = selftest.run(["nearest_code", "code_stats", "code_usage"], "cpu")
    print(json.dumps([(r.op, r.backend, r.dtype, r.status, r.detail) for r in rs]))
    """, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rs = json.loads(p.stdout.strip().splitlines()[-1])
    by = {(op, b, dt): (st, d) for op, b, dt, st, d in rs}
    for dt in ("float32", "float16", "bfloat16"):
        st, d = by[("nearest_code", "cpu", dt)]
        assert st == "failed" and "not nearest" in d, (dt, st, d)
        st, d = by[("code_stats", "cpu", dt)]
        assert st == "failed" and "non-finite" in d, (dt, st, d)
        assert by[("nearest_code", "torch", dt)][0] == "passed"
    st, d = by[("code_usage", "cpu", "int64")]
    assert st == "failed" and "deliberately broken kernel" in d
    # the command: exit status 1, the failing kernel named
    p = _run(WRONG_KERNELS + """
    import argparse, sys
    from vqkernels import selftest
    sys.exit(selftest.main(argparse.Namespace(op=["code_usage"], device="cpu", json=False)))
    """, tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert any(line.startswith("code_usage") and " cpu " in line and "FAILED" in line and "deliberately" in line
               for line in p.stdout.splitlines()), p.stdout


@needs_c
def test_gate_passes_over_a_wrong_kernel_with_one_warning(tmp_path):
    p = _run(WRONG_KERNELS + """
    import vqkernels
    from vqkernels import BackendNotSupported, nearest_code, code_usage
    x, cb = torch.randn(50, 16), torch.randn(30, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idx = nearest_code(x, cb)  # auto: cpu fails its check -> the next backend
        idx2 = nearest_code(x, cb)
        counts, _ = code_usage(torch.tensor([0, 2, 2]), 4)
    msgs = [str(w.message) for w in caught if issubclass(w.category, _backend.SelfCheckFailed)]
    assert torch.equal(idx, torch.cdist(x.double(), cb.double()).argmin(1)), "wrong answer served"
    assert torch.equal(idx, idx2) and counts.tolist() == [1, 0, 2, 0]
    assert len([m for m in msgs if "nearest_code" in m]) == 1, msgs  # one warning, not one per call
    m = [m for m in msgs if "nearest_code" in m][0]
    assert "the cpu kernel of nearest_code failed its self-check on cpu" in m and "float32" in m, m
    assert any("code_usage" in m and "deliberately broken" in m for m in msgs), msgs
    info = vqkernels.info(as_text=True)
    assert "nearest_code/cpu/cpu/float32" in info and "FAILED" in info, info[-2000:]
    try:
        nearest_code(x, cb, backend="cpu")
    except BackendNotSupported as e:
        assert "failed the self-check" in str(e) and "not nearest" in str(e), e
    else:
        raise AssertionError("a named backend that failed must raise")
    # selftest in the same process checks the failed kernel again (the gate's verdict does not skip it)
    from vqkernels import selftest
    r = selftest.check("nearest_code", "cpu", "cpu", torch.float32)
    assert r.status == "failed" and "not nearest" in r.detail, r
    print("OK", _backend.CHECKS_RUN)
    """, tmp_path, VQKERNELS_SELFCHECK="always")
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# The gate in this process: modes, the cache file, compile.

def _usage(backend=None):
    return vqkernels.code_usage(torch.tensor([0, 1, 1, 3]), 5, backend=backend)


@needs_c
def test_gate_checks_once_and_remembers(gate):
    gate("always")
    n = len(_backend.CHECKS_RUN)
    _usage()
    assert _backend.CHECKS_RUN[n:] == [("code_usage", "cpu", torch.device("cpu"), torch.int64)]
    _usage()
    _usage(backend="cpu")
    assert len(_backend.CHECKS_RUN) == n + 1, "a check ran twice"
    assert _backend.selfcheck_results()["code_usage/cpu/cpu/int64"]["status"] == "passed"


@needs_c
def test_modes(gate, monkeypatch):
    gate("auto")  # CPU backends are not checked under auto; torch never is
    n = len(_backend.CHECKS_RUN)
    _usage()
    _usage(backend="torch")
    assert len(_backend.CHECKS_RUN) == n
    assert not _backend.gated("cpu", torch.device("cpu")) and _backend.gated("cuda", torch.device("cuda", 0))
    assert _backend.gated("triton", torch.device("cuda", 0)) and not _backend.gated("sdpa", torch.device("cuda", 0))
    gate("never")
    _usage()
    assert len(_backend.CHECKS_RUN) == n and not _backend.gated("cuda", torch.device("cuda", 0))
    gate("always")
    assert _backend.gated("cpu", torch.device("cpu")) and not _backend.gated("torch", torch.device("cpu"))
    monkeypatch.setenv("VQKERNELS_SELFCHECK", "sometimes")
    _backend.reset_selfcheck()
    with pytest.raises(ValueError, match="VQKERNELS_SELFCHECK"):
        _usage()


@needs_c
def test_cache_is_reused_across_processes_and_invalidated_by_a_new_build(tmp_path):
    code = """
    import torch, vqkernels
    from vqkernels import _backend
    vqkernels.code_usage(torch.tensor([0, 1, 1]), 4)
    print(len(_backend.CHECKS_RUN))
    """
    first = _run(code, tmp_path, VQKERNELS_SELFCHECK="always")
    assert first.returncode == 0 and first.stdout.split()[-1] == "1", first.stdout + first.stderr
    second = _run(code, tmp_path, VQKERNELS_SELFCHECK="always")
    assert second.returncode == 0 and second.stdout.split()[-1] == "0", "the cached pass was not reused"
    # another version (or build: the same fingerprint carries both) makes every cached verdict stale
    bumped = _run("import vqkernels; vqkernels.__version__ = '999.0'\n" + textwrap.dedent(code), tmp_path,
                  VQKERNELS_SELFCHECK="always")
    assert bumped.returncode == 0 and bumped.stdout.split()[-1] == "1", bumped.stdout + bumped.stderr
    data = json.loads((tmp_path / "cache" / "selfcheck.json").read_text())
    assert data["about"]["vqkernels"] == "999.0"  # rewritten for the new build, the old entries dropped


@needs_c
def test_build_fingerprint_covers_the_kernels_sources(gate, monkeypatch):
    gate("always")
    fp = _backend.build_fingerprint()
    assert set(fp) >= {"vqkernels", "build", "torch", "cuda", "driver", "triton"}
    _usage()
    assert _backend._disk_passes()
    real_hash = _backend._hash_file

    def changed(h, path):  # any kernel source (or _C) changing changes the build hash
        real_hash(h, path)
        if path.endswith("code_stats/triton.py"):
            h.update(b"an edit")

    monkeypatch.setattr(_backend, "_hash_file", changed)
    _backend.reset_selfcheck()
    gate("always")
    assert _backend.build_fingerprint()["build"] != fp["build"]
    assert not _backend._disk_passes()
    n = len(_backend.CHECKS_RUN)
    _usage()
    assert len(_backend.CHECKS_RUN) == n + 1


@needs_c
@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"format": 1, "passed": 7}', ""])
def test_corrupt_cache_is_ignored_with_a_warning(gate, tmp_path, garbage):
    path = tmp_path / "cache" / "selfcheck.json"
    path.parent.mkdir(parents=True)
    path.write_text(garbage)
    gate("always")
    with pytest.warns(_backend.SelfCheckCacheWarning, match="ignoring the self-check cache"):
        counts, _ = _usage()
    assert counts.tolist() == [1, 2, 0, 1, 0]
    data = json.loads(path.read_text())  # rewritten, valid
    assert any(k.startswith("code_usage|cpu|") for k in data["passed"])


@needs_c
def test_no_check_runs_under_torch_compile(gate):
    gate("always")
    n = len(_backend.CHECKS_RUN)
    fn = torch.compile(lambda i: vqkernels.code_usage(i, 5)[0], fullgraph=True, backend="eager")
    with pytest.warns(RuntimeWarning, match="serves unverified.*torch.compile"):
        got = fn(torch.tensor([0, 1, 1, 3]))
    assert got.tolist() == [1, 2, 0, 1, 0]
    assert len(_backend.CHECKS_RUN) == n, "a check ran while Dynamo traced"
    _usage()  # the first eager call checks it
    assert len(_backend.CHECKS_RUN) == n + 1


# ---------------------------------------------------------------------------------------------------------
# SDPA: what attention falls back to on CUDA tensors.

def _fake_cuda_attention_args(dtype=torch.float16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 9, 64, device="cuda", dtype=dtype)
        k = torch.empty(2, 2, 13, 64, device="cuda", dtype=dtype)
        lens = torch.empty(2, dtype=torch.int32, device="cuda")
    return (dict(q=q, k=k, v=k, causal=True, scale=0.125),
            dict(q=q[:, :, :1], k_cache=k, v_cache=k, cache_seqlens=lens, scale=0.125))


def test_attention_on_cuda_falls_back_to_sdpa_when_our_kernels_cannot_run(monkeypatch):
    args, dec = _fake_cuda_attention_args()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton then cannot take CUDA tensors
    monkeypatch.setattr(_backend, "has_cuda_kernels", lambda: False)
    assert _backend.select(att.OP, None, **args) == "sdpa"
    assert _backend.select(att.OP_DECODE, None, **dec) == "sdpa"
    # float64: SDPA is not declared for it; the reference serves
    a64, _ = _fake_cuda_attention_args(torch.float64)
    assert _backend.select(att.OP, None, **a64) == "torch"
    # the other ops fall back to what they did before
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        z = torch.empty(2, 8, 16, device="cuda")
        i = torch.empty(2, 8, dtype=torch.int64, device="cuda")
    assert _backend.select(cs.OP, None, z=z, indices=i, num_codes=4) == "torch"


def test_attention_on_cuda_passes_over_failed_kernels_to_sdpa(gate, monkeypatch):
    args, dec = _fake_cuda_attention_args()
    gate("auto")
    # our kernels as if built and runnable here, and as if they had failed their check on this GPU
    for op in (att.OP, att.OP_DECODE):
        spec = _backend._SPECS[op]
        for b in ("cuda", "triton"):
            monkeypatch.setitem(spec.backends, b, _backend.Capability(devices=("cuda",)))
            for dtype in (torch.float16,):
                _backend._VERDICTS[(op, b, torch.device("cuda", 0), dtype)] = f"its float16 kernel failed ({b})"
    assert _backend.select(att.OP, None, **args) == "sdpa"
    assert _backend.select(att.OP_DECODE, None, **dec) == "sdpa"
    with pytest.raises(BackendNotSupported, match=r"backend 'cuda' cannot run attention.*failed \(cuda\)"):
        _backend.select(att.OP, "cuda", **args)
    # with SDPA named away too, auto's error lists the failed checks among its reasons
    monkeypatch.setitem(_backend._SPECS[att.OP].backends, "sdpa", _backend.Capability(devices=("cpu",)))
    monkeypatch.setitem(_backend._SPECS[att.OP].backends, "torch", _backend.Capability(devices=("cpu",)))
    with pytest.raises(BackendNotSupported, match=r"cuda: its float16 kernel failed \(cuda\) \| triton: its float16"):
        _backend.select(att.OP, None, **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_backend_computes_our_function(dtype):
    """On CPU tensors (SDPA runs there too): forward, backward and decoding against the float64 reference, with
    the edge cases of selftest (bottom-right causal with Tq != Tk, rows that see no key, grouped heads, a partly
    filled cache holding NaN past each length)."""
    for op in (att.OP, att.OP_DECODE):
        r = selftest.check(op, "sdpa", "cpu", dtype)
        assert r.status == "passed" and r.cases == len(
            selftest.ATTENTION_CASES if op == att.OP else selftest.DECODE_CASES), r


def test_sdpa_backend_compiles_fullgraph():
    q = torch.randn(1, 4, 7, 16)
    k = torch.randn(1, 2, 19, 16)
    want = vqkernels.attention(q, k, k, causal=True, backend="torch")
    got = torch.compile(lambda a, b: vqkernels.attention(a, b, b, causal=True, backend="sdpa"), fullgraph=True,
                        backend="eager")(q, k)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_wrong_triton_launcher_is_caught(monkeypatch):
    """The other way to replace a kernel: patch a Triton launcher (here under the interpreter, as in CI)."""
    if _backend.not_supported_reasons(cs.OP_USAGE, "triton", indices=torch.zeros(3, dtype=torch.int64), num_codes=4):
        pytest.skip("Triton cannot run on this machine's tensors here")
    from vqkernels.ops.code_stats import triton as tr

    real = tr.code_usage_triton

    def off_by_one(indices, num_codes):
        counts, perplexity = real(indices, num_codes)
        return counts + 1, perplexity

    monkeypatch.setattr(tr, "code_usage_triton", off_by_one)
    r = selftest.check(cs.OP_USAGE, "triton", "cpu" if _backend.triton_interpreter() else "cuda", torch.int64)
    assert r.status == "failed" and "counts: not equal to the reference" in r.detail, r
    monkeypatch.setattr(tr, "code_usage_triton", real)
    assert selftest.check(cs.OP_USAGE, "triton", "cpu" if _backend.triton_interpreter() else "cuda",
                          torch.int64).status == "passed"


@needs_c
def test_info_reports_the_gate(gate):
    gate("always")
    _usage()
    d = vqkernels.info()
    assert d["selfcheck"]["mode"] == "always"
    assert d["selfcheck"]["results"]["code_usage/cpu/cpu/int64"]["status"] == "passed"
    text = vqkernels.info(as_text=True)
    assert "self-check (VQKERNELS_SELFCHECK=always" in text and "code_usage/cpu/cpu/int64" in text
    assert "attention has no sdpa" not in text and "nearest_code has no sdpa" not in text
