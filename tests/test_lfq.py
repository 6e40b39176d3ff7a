"""lfq_entropy (the op) and vqkernels.LFQ (the module) against brute force and vector-quantize-pytorch 1.32.

The op: every backend against a brute-force float64 softmax over all 2^d codes (values and gradients), float32
error at most a small multiple of the float32 reference's own error plus a floor; odd shapes; several codebooks;
the eps clamp on and off; opcheck. The module: VQP's LFQ with the same weights and inputs gives the same
quantized output, indices, losses and gradients, and the same state_dict keys. VQP's per-sample entropy carries a
1e-5 clamp that ours does not (ours is the exact entropy, see ops/lfq_entropy): the comparisons of the whole loss
run VQP with that one clamp lifted (``_exact_per_sample``), and one test bounds the clamp's effect unlifted.
"""
from __future__ import annotations

import math

import pytest
import torch

import vqkernels
from vqkernels import LFQ, lfq_entropy
from vqkernels.ops.lfq_entropy.reference import bit_matrix

from helpers import BACKENDS, device_for, require


def PeerLFQ(**kw):
    return pytest.importorskip("vector_quantize_pytorch").LFQ(**kw)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The op


def brute_force(x, scale, eps):
    """float64 truth: the softmax over all 2^d codes (VQP's construction, exact per-sample entropy)."""
    N, C, d = x.shape
    codes = bit_matrix(d, torch.float64, x.device) * 2 - 1  # (K, d) in {-1, +1}
    p = (scale / 2 * torch.einsum("ncd,kd->nck", x, codes)).softmax(-1)  # (N, C, K)
    ps = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    pb = p.mean(0)
    cb = -(pb * pb.clamp_min(max(eps, 1e-300)).log()).sum(-1).mean()
    return ps, cb


def truth(x, scale, eps, w=(0.7, -1.3)):
    x64 = x.detach().double().requires_grad_()
    ps, cb = brute_force(x64, scale, eps)
    g, = torch.autograd.grad(w[0] * ps + w[1] * cb, x64)
    return ps.detach(), cb.detach(), g


def run(x, scale, eps, backend, w=(0.7, -1.3)):
    x = x.detach().clone().requires_grad_()
    ps, cb = lfq_entropy(x, scale=scale, eps=eps, backend=backend)
    g, = torch.autograd.grad(w[0] * ps + w[1] * cb, x)
    return ps.detach(), cb.detach(), g


SHAPES = [(37, 1, 5), (50, 2, 6), (13, 3, 1), (123, 1, 9), (5, 1, 2), (64, 2, 11)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.0, 0.02])
def test_reference_float64_matches_brute_force(shape, eps):
    x = randn(*shape, seed=sum(shape), dtype=torch.float64) * 0.4
    want = truth(x, 4.0, eps)
    got = run(x, 4.0, eps, "torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _err(got, want):
    return max(float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [(300, 1, 14)])
@pytest.mark.parametrize("spread", [0.02, 0.5, 5.0])  # near-uniform bits, mixed, confident (underflowing tables)
def test_backend_float32_against_float64(backend, shape, spread):
    dev = device_for(backend)
    x = (randn(*shape, seed=shape[0] + shape[2]) * spread).to(dev)
    require("lfq_entropy", backend, x=x)
    scale, eps = 7.0, 1e-5
    want = [t.to(dev) for t in truth(x, scale, eps)]
    got = run(x, scale, eps, backend)
    ref = run(x, scale, eps, "torch")
    assert all(torch.isfinite(t).all() for t in got)
    # relative to each quantity's magnitude: float32 rounding, a few times the reference's own, + a floor
    assert _err(got, want) <= 4 * _err(ref, want) + 2e-5, (_err(got, want), _err(ref, want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_half_inputs(backend, dtype):
    dev = device_for(backend)
    x = (randn(77, 2, 7) * 0.3).to(dev, dtype)
    require("lfq_entropy", backend, x=x)
    want = [t.to(dev) for t in truth(x.float(), 5.0, 1e-5)]
    ps, cb, g = run(x, 5.0, 1e-5, backend)
    assert ps.dtype == cb.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(ps.double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.double(), want[1], rtol=1e-5, atol=1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # the gradient's rounding to x's dtype
    torch.testing.assert_close(g.double(), want[2], rtol=tol, atol=tol * float(want[2].abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_probs_and_empty(backend):
    dev = device_for(backend)
    x = (randn(41, 2, 6) * 0.5).to(dev)
    require("lfq_entropy", backend, x=x)
    _, _, pbar = lfq_entropy(x, scale=3.0, backend=backend, return_probs=True)
    codes = bit_matrix(6, torch.float64, dev) * 2 - 1
    want = (1.5 * torch.einsum("ncd,kd->nck", x.double(), codes)).softmax(-1).mean(0)
    torch.testing.assert_close(pbar.double(), want, rtol=1e-5, atol=1e-7)
    ps, cb = lfq_entropy(x[:0], scale=3.0, backend=backend)
    assert torch.isnan(ps) and torch.isnan(cb)  # the mean of nothing, as torch's mean


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_leading_dims_and_only_one_gradient(backend):
    dev = device_for(backend)
    x = (randn(3, 5, 2, 4) * 0.5).to(dev).requires_grad_()
    require("lfq_entropy", backend, x=x)
    ps, cb = lfq_entropy(x, scale=3.0, backend=backend)
    g1, = torch.autograd.grad(cb, x)  # per_sample unused: its gradient arrives as None
    want = truth(x.reshape(15, 2, 4), 3.0, 1e-5, w=(0.0, 1.0))[2].reshape(x.shape).to(dev)
    torch.testing.assert_close(g1.double(), want, rtol=1e-4, atol=1e-6)


def test_opcheck():
    x = randn(9, 2, 5) * 0.5
    backends = ["torch"] + (["cpu"] if not vqkernels._backend.not_supported_reasons("lfq_entropy", "cpu", x=x) else [])
    from vqkernels.ops.lfq_entropy import _lfq_entropy_op

    for b in backends:
        torch.library.opcheck(_lfq_entropy_op, (x.clone().requires_grad_(), 3.0, 1e-5, b),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("bad, err, match", [
    (dict(x=torch.zeros(4, 1, 0)), ValueError, r"bits per code, d\) must be in \[1, 30\]"),
    (dict(x=torch.zeros(4, 1, 31)), ValueError, r"must be in \[1, 30\]"),
    (dict(x=torch.zeros(4, 0, 3)), ValueError, "at least one codebook"),
    (dict(x=torch.zeros(4)), ValueError, r"x must have at least two dimensions \(\.\.\., C, d\)"),
    (dict(x=torch.zeros(4, 1, 3, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(scale=0.0), ValueError, "scale must be finite and > 0"),
    (dict(scale=-1.0), ValueError, "scale must be >= 0"),
    (dict(scale=float("nan")), ValueError, "scale must be"),
    (dict(eps=-1e-3), ValueError, r"eps must be in \[0.0, 1.0\]"),
])
def test_bad_arguments(bad, err, match):
    args = dict(x=torch.zeros(4, 1, 3), scale=1.0, eps=1e-5)
    args.update(bad)
    x = args.pop("x")
    with pytest.raises(err, match=match):
        lfq_entropy(x, **args)


# ---------------------------------------------------------------------------------------------
# The module against vector-quantize-pytorch


@pytest.fixture
def vqp_lfq():
    return pytest.importorskip("vector_quantize_pytorch.lookup_free_quantization")


class _exact_per_sample:
    """Lift VQP's 1e-5 clamp from its per-sample entropy only (its first ``entropy`` call of a forward; the
    second, the codebook entropy, keeps it): the one place where ours differs by design."""

    def __init__(self, mod):
        self.mod, self.calls = mod, 0

    def __enter__(self):
        self.orig = self.mod.entropy

        def entropy(prob):
            self.calls += 1
            if self.calls % 2 == 1:
                return -(prob * prob.clamp(min=torch.finfo(prob.dtype).tiny).log()).sum(dim=-1)
            return self.orig(prob)

        self.mod.entropy = entropy
        return self

    def __exit__(self, *exc):
        self.mod.entropy = self.orig


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = PeerLFQ(**kw)
    torch.manual_seed(seed)
    ours = LFQ(**kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(mod, x, inv_temperature=100., breakdown=True):
    x = x.detach().clone().requires_grad_()
    (q, idx, aux), br = mod(x, inv_temperature=inv_temperature, return_loss_breakdown=True)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=q.dtype)
    params = [p for p in mod.parameters()]
    grads = torch.autograd.grad((q * w).sum() + 3.0 * aux, [x] + params, allow_unused=True)
    return q.detach(), idx, aux.detach(), [t.detach() for t in br], grads


CONFIGS = [
    dict(dim=10),
    dict(codebook_size=2**9, entropy_loss_weight=0.3, diversity_gamma=2.5, commitment_loss_weight=0.25),
    dict(dim=13, codebook_size=2**6, num_codebooks=2, commitment_loss_weight=0.1),  # projections
    dict(dim=8, codebook_scale=0.5),
    dict(dim=7, spherical=True, codebook_scale=2.0),
    dict(dim=6, soft_clamp_input_value=2.0, experimental_softplus_entropy_loss=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("spread", [0.01, 1.0])
def test_module_matches_vqp_float64(vqp_lfq, cfg, spread):
    # float64 on both sides (VQP: force_quantization_f32=False): the same function up to float64 rounding.
    cfg = dict(cfg, force_quantization_f32=False)
    ref, ours = _pair(**cfg)
    ref.double(), ours.double()
    x = randn(2, 21, ours.dim, seed=3, dtype=torch.float64) * spread
    with _exact_per_sample(vqp_lfq):
        r = _step(ref, x)
    o = _step(ours, x)
    torch.testing.assert_close(o[0], r[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(o[1], r[1]) and o[1].dtype == r[1].dtype
    torch.testing.assert_close(o[2], r[2], rtol=1e-9, atol=1e-12)
    for a, b in zip(o[3], r[3]):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-9, atol=1e-12)
    for a, b in zip(o[4], r[4]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_module_matches_vqp_float32(vqp_lfq, cfg):
    ref, ours = _pair(**cfg)
    x = randn(3, 17, ours.dim, seed=4) * 0.3
    with _exact_per_sample(vqp_lfq):
        r = _step(ref, x)
    o = _step(ours, x)
    torch.testing.assert_close(o[0], r[0])
    assert torch.equal(o[1], r[1])
    torch.testing.assert_close(o[2], r[2], rtol=1e-5, atol=1e-6)
    for a, b in zip(o[4], r[4]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def test_module_vqp_unpatched_clamp_bound():
    """Against VQP as it is: the codebook entropy and the output agree; the per-sample entropy differs by VQP's
    clamp alone, sum_{p < 1e-5} p log(1e-5 / p) <= 0, which we bound from brute force."""
    ref, ours = _pair(dim=9, force_quantization_f32=False)
    ref.double(), ours.double()
    x = randn(2, 40, 9, seed=8, dtype=torch.float64) * 0.02
    r, o = _step(ref, x), _step(ours, x)
    torch.testing.assert_close(o[3][1], r[3][1].double(), rtol=1e-9, atol=1e-12)
    codes = bit_matrix(9, torch.float64, "cpu") * 2 - 1
    p = (200.0 * x.reshape(-1, 9) @ codes.T).softmax(-1)
    clamp_effect = (p * (p.clamp_min(1e-300) / 1e-5).log()).where(p < 1e-5, torch.zeros(())).sum(-1).mean()
    assert float(clamp_effect) < 0  # the comparison below is not vacuous
    torch.testing.assert_close(r[3][0].double(), o[3][0] + clamp_effect, rtol=1e-9, atol=1e-12)


def test_module_frac_per_sample_entropy_same_draw(vqp_lfq):
    ref, ours = _pair(dim=8, frac_per_sample_entropy=0.4, force_quantization_f32=False)
    ref.double(), ours.double()
    x = randn(2, 30, 8, seed=9, dtype=torch.float64) * 0.1
    torch.manual_seed(11)
    with _exact_per_sample(vqp_lfq):
        r = _step(ref, x)
    torch.manual_seed(11)
    o = _step(ours, x)
    torch.testing.assert_close(o[2], r[2], rtol=1e-9, atol=1e-12)


def test_module_channel_first_eval_and_codes(vqp_lfq):
    ref, ours = _pair(dim=12, codebook_size=2**5, num_codebooks=2)
    x = randn(2, 12, 3, 5, seed=6)
    for m in (ref, ours):
        m.eval()
    (qr, ir, ar), (qo, io, ao) = ref(x), ours(x)
    torch.testing.assert_close(qo, qr)
    assert torch.equal(io, ir) and io.shape == (2, 3, 5, 2)
    assert float(ao) == float(ar) == 0.0
    torch.testing.assert_close(ours.indices_to_codes(io), ref.indices_to_codes(ir))
    ours.train()
    (q, _, _) = ours(x)
    assert q.shape == x.shape


def test_module_state_dict_keys():
    ref, ours = _pair(dim=13, codebook_size=2**6, num_codebooks=2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert list(LFQ(dim=8).state_dict()) == list(PeerLFQ(dim=8).state_dict()) == ["mask"]


@pytest.mark.parametrize("kw, match", [
    (dict(codebook_size=1000), r"codebook_size must be a power of two >= 2.*got 1000 \(suggested 1024\)"),
    (dict(codebook_size=1), "codebook_size must be a power of two"),
    (dict(), "LFQ needs dim or codebook_size"),
    (dict(dim=0), "dim must be a positive int"),
    (dict(dim=8, num_codebooks=0), "num_codebooks must be a positive int"),
    (dict(dim=8, frac_per_sample_entropy=0.0), r"frac_per_sample_entropy must be in \(0, 1\]"),
    (dict(dim=8, soft_clamp_input_value=0.5), "soft_clamp_input_value must be >= codebook_scale"),
    (dict(dim=8, num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim must be True"),
    (dict(codebook_size=2**31), r"at most 2\^30"),
])
def test_module_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LFQ(**kw)


def test_module_wrong_input_dim():
    with pytest.raises(ValueError, match="expected the feature dimension 8"):
        LFQ(dim=8)(torch.zeros(2, 3, 7))


def test_module_large_codebook_without_n_by_k():
    """d = 20 (a million codes): VQP would hold N x 2^20 probabilities (256 tokens: 1 GB); ours holds pbar only."""
    m = LFQ(dim=20)
    x = randn(1, 256, 20, seed=1).requires_grad_()
    q, idx, aux = m(x)
    aux.backward()
    assert torch.isfinite(aux) and torch.isfinite(x.grad).all() and int(idx.max()) < 2**20


def test_cpu_row_blocks_float64():
    """Enough rows for several of the C++ kernel's row blocks (2048 rows at d = 20): float64 against the reference."""
    x = randn(4500, 1, 20, seed=2, dtype=torch.float64) * 0.05
    require("lfq_entropy", "cpu", x=x)
    want = run(x, 9.0, 1e-5, "torch")
    got = run(x, 9.0, 1e-5, "cpu")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
