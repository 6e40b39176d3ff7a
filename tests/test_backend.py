"""Backend dispatch: the override order, explicit errors with reasons, and what info() reports."""
import subprocess
import sys

import pytest
import torch

import vqkernels
from vqkernels import BackendNotSupported, _backend, nearest_code, use_backend
from vqkernels.ops import nearest_code as nc


def _args(dtype=torch.float32, device="cpu"):
    return torch.empty(4, 8, dtype=dtype, device=device), torch.empty(3, 8, dtype=dtype, device=device), 0, False


def test_auto_picks_the_c_kernel_on_cpu_when_built():
    want = "cpu" if _backend.has_cpu_kernels() else None
    got = _backend.select(nc.OP, None, *_args())
    if want:
        assert got == "cpu"
    else:
        assert got in ("triton", "torch")


def test_override_order(monkeypatch):
    monkeypatch.setenv("VQKERNELS_BACKEND", "torch")
    assert _backend.select(nc.OP, None, *_args()) == "torch"
    with use_backend("auto"):
        assert _backend.requested_backend() == "auto"
        with use_backend("torch"):
            assert _backend.select(nc.OP, None, *_args()) == "torch"
    assert _backend.requested_backend("torch") == "torch"  # the argument beats context and env
    monkeypatch.setenv("VQKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="VQKERNELS_BACKEND"):
        _backend.select(nc.OP, None, *_args())
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("nope"):
            pass


def test_named_backend_that_cannot_run_raises_with_reasons():
    x, cb = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(BackendNotSupported, match="cuda.*CUDA tensors"):
        nearest_code(x.float(), cb.float(), backend="cuda")
    with use_backend("cpu"):
        with pytest.raises(BackendNotSupported, match="float64"):
            nearest_code(x, cb)


def test_auto_error_lists_every_backend():
    x = torch.empty(4, 8, dtype=torch.int32)
    cb = torch.empty(3, 8, dtype=torch.int32)
    # no backend takes int32 (the public API refuses it earlier with a TypeError)
    with pytest.raises(BackendNotSupported, match=r"no backend can run nearest_code.*cpu: .*torch: .*int32"):
        _backend.select(nc.OP, None, x, cb, 0, False)


def test_explain_lists_reasons_per_backend():
    r = _backend.explain(nc.OP, *_args(torch.float64))
    assert set(r) == set(_backend.BACKENDS)
    assert r["torch"] == []
    assert any("float64" in s for s in r["cpu"])


def test_info_reports_everything():
    d = vqkernels.info()
    for key in ("vqkernels", "torch", "triton", "cpu", "_C", "triton_can_run", "backend_choice"):
        assert key in d
    text = vqkernels.info(as_text=True)
    assert "nearest_code[cpu,float32] ->" in text
    assert ("_C: built with CPU kernels" in text) == (d["_C"] is not None)


def test_import_is_cheap_and_queries_no_gpu():
    code = ("import sys, vqkernels; "
            "assert 'vqkernels._C' not in sys.modules, 'imported _C eagerly'; "
            "assert 'triton' not in sys.modules, 'imported triton eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
