"""PackedLinear (vqkernels.ops.linear): the few-row inference linear against its reference (F.linear) in float64, on
every backend.

Accuracy rule: our error against float64 is at most twice the error of PyTorch's own float32 F.linear, plus a small
atol. Outputs are poisoned before the C++ kernel writes them (conftest sets VQKERNELS_POISON_OUTPUTS=1), so a
column or row it misses is NaN here.
"""
import pytest
import torch
import torch.nn.functional as F

from vqkernels import _backend
from vqkernels.ops import linear as lin
from vqkernels.ops.linear import MAX_ROWS, OP, PackedLinear, pack_weight, unpack_weight
from vqkernels.ops.linear.reference import linear_reference

from helpers import with_threads

BACKENDS = ["torch", "cpu"]


def require(backend, weight, bias=None):
    reasons = _backend.not_supported_reasons(OP, backend, weight=weight, bias=bias)
    if reasons:
        pytest.skip(f"{backend} cannot run linear here: " + "; ".join(reasons))


def rel_err(y, ref, scale):
    return ((y.double() - ref) / scale).abs().max().item() if y.numel() else 0.0


def check(pl, x, w, b):
    """Errors relative to the size of the terms, S = |x| |w|^T + |b| (what a sum of K products in float32 can be
    off by scales with it): ours at most twice float32 F.linear's, or a few units of float32 rounding times
    sqrt(K) (a sequential k-order sum, as the C++ kernel's, rounds differently from MKL's blocked one). A wrong
    or missing term is off by ~1/K of S, orders of magnitude more."""
    with torch.no_grad():
        y = pl(x)
    bd = None if b is None else b.double()
    ref = linear_reference(x.double(), w.double(), bd)
    scale = linear_reference(x.double().abs(), w.double().abs(), None if b is None else bd.abs()) + 1e-30
    base = rel_err(F.linear(x, w, b), ref, scale)
    K = w.shape[1]
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any()
    e = rel_err(y, ref, scale)
    assert e <= max(2 * base, 8 * 2.0 ** -24 * K ** 0.5), (tuple(x.shape), tuple(w.shape), e, base)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,K", [(1, 1), (31, 7), (32, 64), (33, 300), (100, 24), (1536, 512)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_matches_float64(backend, N, K, has_bias):
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if has_bias else None
    require(backend, w, b)
    pl = PackedLinear(w, b, backend=backend)
    assert pl.backend == backend
    for M in (1, 3, 8, 9, 17, MAX_ROWS, MAX_ROWS + 5):
        check(pl, torch.randn(M, K, generator=g), w, b)
    check(pl, torch.randn(2, 3, K, generator=g), w, b)  # leading dims
    check(pl, torch.randn(6, 2 * K, generator=g)[:, ::2], w, b)  # a strided view
    check(pl, torch.randn(0, K, generator=g), w, b)  # no rows


def test_cpu_portable_path(monkeypatch):
    # What a CPU without AVX-512 runs (the switch is read by the C++ kernel at each call).
    w, b = torch.randn(70, 45), torch.randn(70)
    require("cpu", w, b)
    monkeypatch.setenv("VQKERNELS_CPU_NO_AVX512", "1")
    pl = PackedLinear(w, b, backend="cpu")
    for M in (1, 5, 8, 13):
        check(pl, torch.randn(M, 45), w, b)


def test_cpu_same_bits_for_any_thread_count():
    w, b = torch.randn(2048, 512), torch.randn(2048)
    require("cpu", w, b)
    pl = PackedLinear(w, b, backend="cpu")
    x = torch.randn(8, 512)
    with torch.no_grad():
        y1, y2 = with_threads(lambda: pl(x))
    assert torch.equal(y1, y2)


def test_pack_roundtrip_and_padding():
    w = torch.randn(45, 7)
    p = pack_weight(w)
    assert p.shape == (2, 7, 32) and p.is_contiguous()
    assert torch.equal(unpack_weight(p, 45), w)
    assert torch.equal(p[1, :, 13:], torch.zeros(7, 19))  # columns past N are zero
    assert torch.equal(p[0, 3], w[:32, 3])


def test_auto_choice_and_gradients():
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    pl = PackedLinear(w, b)
    if not _backend.not_supported_reasons(OP, "cpu", weight=w, bias=b) and _backend.cpu_has_avx512():
        assert pl.backend == "cpu"
    assert PackedLinear(w.detach().bfloat16()).backend == "torch"  # the kernel is float32 only
    # with gradients on, the same function through F.linear: gradients reach weight, bias and x
    x = torch.randn(4, 16, requires_grad=True)
    pl(x).square().sum().backward()
    gx, gw, gb = x.grad, w.grad, b.grad
    x.grad = w.grad = b.grad = None
    F.linear(x, w, b).square().sum().backward()
    torch.testing.assert_close((gx, gw, gb), (x.grad, w.grad, b.grad))


def test_cpu_refuses_other_dtypes():
    w = torch.randn(8, 8, dtype=torch.bfloat16)
    with pytest.raises(_backend.BackendNotSupported, match="cpu"):
        PackedLinear(w, backend="cpu")


def test_bad_input_named():
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        PackedLinear(torch.randn(8))
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        PackedLinear(torch.ones(8, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"bias must be None or a \(8,\) tensor"):
        PackedLinear(w, torch.randn(7))
    with pytest.raises(TypeError, match="bias must match weight's dtype"):
        PackedLinear(w, torch.randn(8, dtype=torch.float64))
    pl = PackedLinear(w)
    with pytest.raises(ValueError, match="in_features = 4"):
        pl(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x must match the weight's dtype"):
        pl(torch.randn(3, 4, dtype=torch.float64))


def test_kernel_checks_its_arguments():
    w = torch.randn(40, 24)
    require("cpu", w)
    pl = PackedLinear(w, backend="cpu")  # loads _C
    op = torch.ops.vqkernels_C.linear_packed
    with pytest.raises(RuntimeError, match="x has K = 23 features"):
        op(torch.randn(2, 23), pl._packed, None, 40)
    with pytest.raises(RuntimeError, match="out_features = 70"):
        op(torch.randn(2, 24), pl._packed, None, 70)
    with pytest.raises(RuntimeError, match="bias must be float32 \\(40,\\)"):
        op(torch.randn(2, 24), pl._packed, torch.randn(39), 40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    # The registered op vqkernels::linear (what a compiled graph holds) on the weight as the backend prepared it.
    w, b = torch.randn(40, 24), torch.randn(40)
    require(backend, w, b)
    pl = PackedLinear(w, b, backend=backend)
    prepared = pl._packed if backend == "cpu" else w
    bias = pl._bias_packed if backend == "cpu" else b
    x = torch.randn(5, 24)
    torch.library.opcheck(lin._linear_op, (x, prepared, bias, 40, backend),
                          test_utils=("test_schema", "test_faketensor"))
    # the op computes what an eager call of the PackedLinear computes, bit for bit
    with torch.no_grad():
        assert torch.equal(lin._linear_op(x, prepared, bias, 40, backend), pl(x))
