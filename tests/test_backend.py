"""Backend dispatch: the override order, explicit errors with reasons, and what info() reports."""
import os
import subprocess
import sys

import pytest
import torch

import vqkernels
from vqkernels import BackendNotSupported, _backend, nearest_code, use_backend
from vqkernels.ops import nearest_code as nc


def _args(dtype=torch.float32, device="cpu"):
    return dict(x=torch.empty(4, 8, dtype=dtype, device=device), codebook=torch.empty(3, 8, dtype=dtype, device=device),
                metric=0, allow_tf32=False)


def test_auto_picks_the_c_kernel_on_cpu_when_built():
    want = "cpu" if _backend.has_cpu_kernels() else None
    got = _backend.select(nc.OP, None, **_args())
    if want:
        assert got == "cpu"
    else:
        assert got in ("triton", "torch")


def test_override_order(monkeypatch):
    monkeypatch.setenv("VQKERNELS_BACKEND", "torch")
    assert _backend.select(nc.OP, None, **_args()) == "torch"
    with use_backend("auto"):
        assert _backend.requested_backend() == "auto"
        with use_backend("torch"):
            assert _backend.select(nc.OP, None, **_args()) == "torch"
    assert _backend.requested_backend("torch") == "torch"  # the argument beats context and env
    monkeypatch.setenv("VQKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="VQKERNELS_BACKEND"):
        _backend.select(nc.OP, None, **_args())
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
        _backend.select(nc.OP, None, x=x, codebook=cb, metric=0, allow_tf32=False)


def test_explain_lists_reasons_per_backend():
    r = _backend.explain(nc.OP, **_args(torch.float64))
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


def test_info_lists_every_declared_op():
    d = vqkernels.info()
    text = vqkernels.info(as_text=True)
    ops = _backend.declared_ops()
    for op in ("nearest_code", "vq_loss", "vector_quantize", "code_stats", "code_usage"):
        assert op in ops
    for op in ops:
        assert f"{op}[cpu," in text, f"info does not report {op}"
    assert d["backend_choice"]["vq_loss[cpu,float32]"] in _backend.BACKENDS


def test_declared_capabilities_give_the_reasons():
    """A toy op declared as data: the reasons come from the declaration, the limit sees named arguments."""
    op = "test_backend_toy_op"
    _backend.declare(
        op, primary="a", fallback=None,
        torch=_backend.Capability(),
        cpu=_backend.Capability(devices=("cpu",), dtypes=(torch.float32,),
                                limit=lambda a, n: [f"n={n} is odd"] if n % 2 else []),
    )
    try:
        a32, a64 = torch.empty(3), torch.empty(3, dtype=torch.float64)
        assert _backend.not_supported_reasons(op, "cpu", a=a32, n=2) == []
        assert _backend.not_supported_reasons(op, "cpu", a=a32, n=3) == ["n=3 is odd"]
        assert any("float64" in r for r in _backend.not_supported_reasons(op, "cpu", a=a64, n=2))
        assert _backend.not_supported_reasons(op, "cuda", a=a32, n=2) == [f"{op} has no cuda implementation"]
        assert _backend.select(op, None, a=a32, n=3) == "torch"
        with pytest.raises(BackendNotSupported, match="n=3 is odd"):
            _backend.select(op, "cpu", a=a32, n=3)
        with pytest.raises(TypeError):
            _backend.not_supported_reasons(op, "cpu", a32, 2)  # declared ops take their arguments by name
    finally:
        _backend._SPECS.pop(op)


def test_fallback_is_chosen_where_no_backend_can_run():
    from vqkernels.ops import vq_loss as vl

    z = torch.empty(2, 3, 8, dtype=torch.float64)
    cb = torch.empty(5, 8, dtype=torch.float64)
    assert _backend.select(vl.OP_VQ, None, z=z, codebook=cb) == "compose"
    assert _backend.select(vl.OP_VQ, "torch", z=z, codebook=cb) == "compose"


def test_first_cpu_call_imports_no_compiler_stack():
    """A CPU-only call must not import torch._dynamo (and with it sympy and triton): ~0.9 s and ~150 MB."""
    code = ("import sys, torch, vqkernels; "
            "x, cb = torch.randn(40, 8), torch.randn(16, 8); "
            "vqkernels.nearest_code(x, cb); vqkernels.vector_quantize(x.requires_grad_(), cb)[1].backward(); "
            "vqkernels.code_usage(vqkernels.nearest_code(x, cb), 16); "
            "loaded = [m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules]; "
            "assert not loaded, f'a CPU call imported {loaded}'")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VQKERNELS_BACKEND")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_shared_checks_name_the_argument():
    from vqkernels.ops import _checks as C

    q = torch.randn(2, 3, 4)
    assert C.check_tensor(q, "q", dims=3, floating=True, dtype=C.KERNEL_DTYPES, device=q.device) is q
    cases = [
        (lambda: C.check_tensor([1.0], "q"), TypeError, "q must be a torch.Tensor, got list"),
        (lambda: C.check_tensor(q, "q", dims=4, layout="(B, H, T, Dh)"), ValueError,
         r"q must be 4-D \(B, H, T, Dh\), got shape \(2, 3, 4\)"),
        (lambda: C.check_tensor(q[0, 0, 0], "k", min_dims=1), ValueError, "k must have at least one dimension"),
        (lambda: C.check_tensor(q.long(), "v", floating=True), TypeError, "v must be a floating-point tensor"),
        (lambda: C.check_tensor(q.double(), "q", dtype=C.KERNEL_DTYPES), TypeError,
         "q must be float32, float16 or bfloat16, got torch.float64"),
        (lambda: C.check_tensor(q, "k", device="meta", device_of="q"), ValueError,
         r"k must be on the device of q \(meta\)"),
        (lambda: C.check_same_dtype(q, q.half(), ("q", "k")), TypeError, "q and k must share a dtype"),
        (lambda: C.check_shape(q, "k", (2, 3, 5), "q.shape"), ValueError, r"k must have shape q.shape = \(2, 3, 5\)"),
        (lambda: C.check_range(1.5, "decay", 0.0, 1.0), ValueError, r"decay must be in \[0.0, 1.0\], got 1.5"),
        (lambda: C.check_num_codes(True), TypeError, "num_codes must be an int"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_new_output_is_poisoned_under_the_test_flag(monkeypatch):
    monkeypatch.setenv("VQKERNELS_POISON_OUTPUTS", "1")
    assert torch.isnan(_backend.new_output((5,), torch.float32, "cpu")).all()
    assert (_backend.new_output((5,), torch.int64, "cpu") == -0x7EADBEEF).all()


def test_nearest_code_prefers_triton_for_few_rows_on_cuda():
    """The CUDA nearest_code kernel does not split over codes: auto takes Triton first for small N on CUDA
    (shapes only). Checked on the declared priority, which needs no GPU."""
    import torch

    from vqkernels.ops import nearest_code as nc

    x = torch.empty(4096, 64, device="meta")
    cb = torch.empty(16384, 64, device="meta")
    assert nc._priority("cuda", x=x, codebook=cb)[0] == "triton"
    assert nc._priority("cuda", x=torch.empty(65536, 64, device="meta"), codebook=cb) is None
    assert nc._priority("cuda", x=x, codebook=torch.empty(512, 64, device="meta")) is None
    assert nc._priority("cpu", x=x, codebook=cb) is None


def test_cuda_priority_puts_sdpa_before_the_reference():
    order = _backend.PRIORITY["cuda"]
    assert order.index("cuda") < order.index("triton") < order.index("sdpa") < order.index("torch")
    assert "sdpa" not in _backend.PRIORITY["cpu"], "on CPU tensors our kernels and the reference serve"
    # only attention declares sdpa; asking another op for it is refused with the reason
    with pytest.raises(BackendNotSupported, match="nearest_code has no sdpa implementation"):
        nearest_code(torch.randn(4, 8), torch.randn(3, 8), backend="sdpa")


def test_selfcheck_mode_is_validated(monkeypatch):
    monkeypatch.setenv("VQKERNELS_SELFCHECK", "maybe")
    _backend.reset_selfcheck()
    try:
        with pytest.raises(ValueError, match="VQKERNELS_SELFCHECK must be one of"):
            _backend.selfcheck_mode()
    finally:
        monkeypatch.undo()
        _backend.reset_selfcheck()
