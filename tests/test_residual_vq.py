"""residual_vq (the op) on every backend against its reference, and vqkernels.ResidualVQ against
vector-quantize-pytorch's ResidualVQ (the real package; only those comparisons skip without it).

The op: integer-valued inputs make every score exact in float32, so every backend must return exactly the
reference's indices (ties included: the lowest index), codes, squared errors and statistics; on random
inputs each stage's choice must be optimal for the residual the backend itself built (float64 truth, a
small tolerance for float32 rounding), the sums/errors consistent with those choices, and the fused
backward equal to the reference's (itself checked by gradcheck in float64). The module: same weights,
inputs and random state -> same indices, outputs, losses, gradients and buffers over several training steps.
"""
from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import ResidualVQ, _backend
from vqkernels.ops.residual_vq import _residual_vq_op, residual_vq
from vqkernels.ops.residual_vq.reference import residual_vq_backward_reference, residual_vq_reference
from vqkernels.nn.residual_vq import _UNSUPPORTED_RVQ_OPTIONS

from helpers import BACKENDS, device_for, require

OP = "residual_vq"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int_inputs(N, Q, K, D, seed=0, dup=True):
    """Small integers: every dot product, norm and residual is exact in float32 (so is every score)."""
    g = _gen(seed)
    x = torch.randint(-6, 7, (N, D), generator=g).float()
    cbs = torch.randint(-3, 4, (Q, K, D), generator=g).float()
    if dup and K > 3:
        cbs[:, K - 1] = cbs[:, 1]  # exact duplicates: the lower index must win
    return x, cbs


def _run(backend, x, cbs, **kw):
    dev = device_for(backend)
    x, cbs = x.to(dev), cbs.to(dev)
    require(OP, backend, x=x, codebooks=cbs)
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in residual_vq(x, cbs, backend=backend, **kw)]


SHAPES = [(1, 1, 1, 1), (37, 3, 19, 5), (130, 4, 70, 33), (257, 2, 300, 130), (64, 9, 1024, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exact_inputs_match_reference_exactly(backend, shape):
    N, Q, K, D = shape
    if backend == "triton" and N * K * D > 2_000_000:
        pytest.skip("the interpreter is slow; smaller shapes cover the triton kernel")
    x, cbs = _int_inputs(*shape)
    idx, quant, err, counts, sums = _run(backend, x, cbs, return_stats=True)
    ridx, rquant, rerr, rcounts, rsums = residual_vq_reference(x.double(), cbs.double(), True)
    assert idx.dtype == torch.int64 and idx.shape == (N, Q)
    assert torch.equal(idx, ridx)
    assert torch.equal(quant, rquant.float())
    assert torch.equal(err, rerr)
    assert torch.equal(counts, rcounts) and torch.equal(sums, rsums)


def _check_stagewise_optimal(x, cbs, idx, quant, err, counts=None, sums=None, tol=1e-4):
    """Each stage's code is nearest (float64) to the residual left by the earlier choices in idx."""
    xd, cd = x.double(), cbs.double()
    r = xd.clone()
    total = torch.zeros_like(xd)
    Q, K, D = cbs.shape
    for q in range(Q):
        d = (r[:, None, :] - cd[q][None]).square().sum(-1)  # (N, K): small test shapes only
        best = d.min(1).values
        chosen = d.gather(1, idx[:, q:q + 1]).squeeze(1)
        scale = r.square().sum(1) + cd[q].square().sum(1).max()
        assert bool((chosen <= best + tol * scale + 1e-6).all()), f"stage {q} chose a code that is not nearest"
        c = cd[q][idx[:, q]]
        torch.testing.assert_close(err[q].double(), (r - c).square().sum(), rtol=1e-4, atol=1e-4)
        if counts is not None:
            torch.testing.assert_close(counts[q].double(), torch.bincount(idx[:, q], minlength=K).double())
            ref_sums = torch.zeros(K, D, dtype=torch.float64).index_add_(0, idx[:, q], r)
            torch.testing.assert_close(sums[q].double(), ref_sums, rtol=1e-4, atol=1e-4)
        total = total + c
        r = r - c
    torch.testing.assert_close(quant.double(), total, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(45, 3, 23, 7), (300, 5, 129, 64), (77, 2, 513, 257)],
                         ids=lambda s: "x".join(map(str, s)))
def test_random_inputs_choose_the_nearest_code_at_every_stage(backend, shape):
    N, Q, K, D = shape
    g = _gen(1)
    x = torch.randn(N, D, generator=g)
    cbs = torch.randn(Q, K, D, generator=g) * torch.linspace(1.0, 0.2, Q)[:, None, None]
    idx, quant, err, counts, sums = _run(backend, x, cbs, return_stats=True)
    _check_stagewise_optimal(x, cbs, idx, quant, err, counts, sums)
    ridx = residual_vq_reference(x, cbs)[0]
    assert (idx == ridx).float().mean() > 0.98  # equal but for float32 near-ties (and what follows them)


@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_with_nan_never_win(backend):
    x, cbs = _int_inputs(29, 3, 11, 6, seed=3)
    cbs[:, 0] = float("nan")
    cbs[1, 4, 2] = float("inf")
    idx = _run(backend, x, cbs)[0]
    assert bool((idx != 0).all()) and bool((idx[:, 1] != 4).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotation", [False, True], ids=["straight-through", "rotation"])
def test_backward_matches_reference(backend, rotation):
    N, Q, K, D = 53, 3, 17, 9
    g = _gen(2)
    x = torch.randn(N, D, generator=g)
    cbs = torch.randn(Q, K, D, generator=g) * 0.7
    go = torch.randn(N, D, generator=g)
    ge = torch.randn(Q, generator=g)
    dev = device_for(backend)
    require(OP, backend, x=x.to(dev), codebooks=cbs.to(dev))
    xr = x.to(dev).requires_grad_()
    idx, quant, err = residual_vq(xr, cbs.to(dev), rotation_trick=rotation, backend=backend)
    ((quant * go.to(dev)).sum() + (err * ge.to(dev)).sum()).backward()
    want = residual_vq_backward_reference(go.double(), ge.double(), x.double(), cbs.double(), idx.cpu(), rotation)
    torch.testing.assert_close(xr.grad.cpu().double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rotation", [False, True])
def test_reference_backward_is_the_gradient(rotation):
    """The squared errors by gradcheck (float64); quantized's gradient against autograd through the stages
    written out as vector-quantize-pytorch does (straight-through r + sg[c - r], or rotate_to(r, c))."""
    from vqkernels.nn._core import rotate_to

    g = _gen(4)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    cbs = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: residual_vq(x, cbs, rotation_trick=rotation, backend="torch")[2], (x,),
                             eps=1e-7, atol=1e-5)
    idx = residual_vq(x.detach(), cbs, backend="torch")[0]
    r, out = x, 0
    for q in range(3):
        c = cbs[q][idx[:, q]]
        out = out + (rotate_to(r, c) if rotation else r + (c - r).detach())
        r = r - c
    go = torch.randn(7, 5, dtype=torch.float64, generator=g)
    want, = torch.autograd.grad((out * go).sum(), x)
    _, quant, _ = residual_vq(x, cbs, rotation_trick=rotation, backend="torch")
    got, = torch.autograd.grad((quant * go).sum(), x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    x, cbs = _int_inputs(21, 2, 9, 5)
    require(OP, backend, x=x, codebooks=cbs)
    torch.library.opcheck(_residual_vq_op, (x.requires_grad_(), cbs, True, True, backend))
    torch.library.opcheck(_residual_vq_op, (x.detach()[:0], cbs, False, False, backend))


def test_reference_is_chunked_and_chunking_does_not_change_it():
    x, cbs = _int_inputs(100, 3, 40, 6)
    a = residual_vq_reference(x, cbs, True)
    b = residual_vq_reference(x, cbs, True, rows=7)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_input_errors(backend):
    x, cbs = _int_inputs(5, 2, 4, 3)
    with pytest.raises(ValueError, match="codebooks must be 3-D"):
        residual_vq(x, cbs[0], backend=backend)
    with pytest.raises(ValueError, match="x must be 2-D"):
        residual_vq(x[0], cbs, backend=backend)
    with pytest.raises(ValueError, match="last dimension of x"):
        residual_vq(x[:, :2], cbs, backend=backend)
    with pytest.raises(TypeError, match="share a dtype"):
        residual_vq(x.double(), cbs, backend=backend)
    with pytest.raises(ValueError, match="Q=0"):
        residual_vq(x, cbs[:0], backend=backend)
    with pytest.raises(ValueError, match="K=0"):
        residual_vq(x, cbs[:, :0], backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        residual_vq(x.long(), cbs.long(), backend=backend)


def test_c_kernels_check_their_own_arguments():
    require(OP, "cpu", x=torch.zeros(2, 3), codebooks=torch.zeros(1, 2, 3))
    ops = torch.ops.vqkernels_C
    with pytest.raises(RuntimeError, match="codebooks"):
        ops.residual_vq_fwd(torch.zeros(4, 3), torch.zeros(2, 3), False)
    with pytest.raises(RuntimeError, match="float32"):
        ops.residual_vq_fwd(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(1, 2, 3, dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match="indices"):
        ops.residual_vq_bwd(torch.zeros(4, 3), torch.zeros(1), torch.zeros(4, 3), torch.zeros(1, 2, 3),
                            torch.zeros(4, 2, dtype=torch.int64), False)


def test_cpu_kernel_is_thread_count_independent():
    from helpers import with_threads

    g = _gen(5)
    x = torch.randn(700, 48, generator=g)
    cbs = torch.randn(4, 300, 48, generator=g)
    require(OP, "cpu", x=x, codebooks=cbs)
    a, b = with_threads(lambda: residual_vq(x, cbs, backend="cpu"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _screen_inputs(kind, N, Q, K, D, seed):
    """Integer data (every score exact in float32) built to stress a screen's bound: many exact ties
    (duplicate codes, small integers), the first stage far from the origin (offset: ||x|| ||c|| is ~1e3x
    the gaps between scores), or a stage whose codebook holds a NaN code (that stage cannot be screened)."""
    x, cbs = _int_inputs(N, Q, K, D, seed=seed)
    cbs[:, K // 2: K // 2 + 5] = cbs[:, 2:7]  # more exact duplicates, at higher indices
    if kind == "offset":
        x, cbs[0] = x + 40.0, cbs[0] + 40.0  # products < 2^11, sums of D of them < 2^24: still exact
    elif kind == "nan_code":
        cbs[1, 3, 0] = float("nan")
    return x, cbs


@pytest.mark.parametrize("screen", ["int8", "bf16"])
@pytest.mark.parametrize("kind", ["ties", "offset", "nan_code"])
def test_cpu_screened_search_is_exact(screen, kind, monkeypatch):
    """On AVX-512 CPUs the C++ kernel screens each stage's search (int8 on avx512_vnni, bf16 on
    avx512_bf16 with VQKERNELS_CPU_NO_VNNI=1): it must still return exactly the reference's indices,
    lowest index on ties, and the same as its plain fp32 path (VQKERNELS_CPU_NO_SCREEN=1). The search
    counters show that the screen ran, on every stage it can bound."""
    if not _backend.has_cpu_kernels():
        pytest.skip("vqkernels._C was not built")
    C = _backend.c_extension()
    f = C.cpu_features()
    if not f.get("avx512_vnni" if screen == "int8" else "avx512_bf16"):
        pytest.skip(f"the {screen} screen needs this CPU feature")
    monkeypatch.delenv("VQKERNELS_CPU_NO_SCREEN", raising=False)
    if screen == "int8":
        monkeypatch.delenv("VQKERNELS_CPU_NO_VNNI", raising=False)
    else:
        monkeypatch.setenv("VQKERNELS_CPU_NO_VNNI", "1")
    N, Q, K, D = 300, 4, 257, 40  # D >= 32: both screens apply
    x, cbs = _screen_inputs(kind, N, Q, K, D, seed=7)
    require(OP, "cpu", x=x, codebooks=cbs)
    before = dict(C.search_stats())
    idx, quant, err, counts, sums = residual_vq(x, cbs, backend="cpu", return_stats=True)
    after = dict(C.search_stats())
    screened = Q - 1 if kind == "nan_code" else Q
    assert after["screened_rows"] - before["screened_rows"] == N * screened
    assert after["int8_rows"] - before["int8_rows"] == (N * screened if screen == "int8" else 0)
    if kind == "nan_code":
        assert bool((idx[:, 1] != 3).all())
    else:
        ridx, rquant, rerr, rcounts, rsums = residual_vq_reference(x.double(), cbs.double(), True)
        assert torch.equal(idx, ridx)
        assert torch.equal(quant, rquant.float()) and torch.equal(err, rerr)
        assert torch.equal(counts, rcounts) and torch.equal(sums, rsums)
    monkeypatch.setenv("VQKERNELS_CPU_NO_SCREEN", "1")
    plain = residual_vq(x, cbs, backend="cpu", return_stats=True)
    assert dict(C.search_stats())["screened_rows"] == after["screened_rows"]
    for a, b in zip((idx, quant, err, counts, sums), plain):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The module against vector-quantize-pytorch

ATOL, RTOL = 2e-6, 1e-5


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def PeerRVQ(**kw):
    return pytest.importorskip("vector_quantize_pytorch").ResidualVQ(**kw)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = PeerRVQ(**kw)
    torch.manual_seed(seed)
    ours = ResidualVQ(**kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():  # the same random calls at construction: the same weights
        assert torch.equal(ours.state_dict()[k], v), k
    return ref, ours


def _step(mod, x, w, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # one random state for the dropout seed, k-means and restarts on both sides
    q, idx, losses = mod(x)
    ((q * w).sum() + losses.sum()).backward()
    return q, idx, losses, x.grad


def _compare_training(ref, ours, shape, steps=3, atol=ATOL):
    ref.train(), ours.train()
    g = _gen(123)
    for s in range(steps):
        x = torch.randn(*shape, generator=g)
        w = torch.randn(*shape, generator=g)
        a = _step(ref, x, w, 1000 + s)
        b = _step(ours, x, w, 1000 + s)
        assert b[1].shape == a[1].shape and b[0].shape == a[0].shape and b[2].shape == a[2].shape
        assert torch.equal(b[1], a[1]), f"indices differ at step {s}"
        close(b[0], a[0], atol=atol)
        close(b[2], a[2].float(), atol=atol)
        close(b[3], a[3], atol=atol)
        sd = ours.state_dict()
        for k, v in ref.state_dict().items():
            close(sd[k], v, atol=atol)


TRAINING_CASES = {
    "defaults": (dict(), (3, 13, 6)),
    "straight-through": (dict(rotation_trick=False, decay=0.95, commitment_weight=0.4), (2, 21, 6)),
    "codebook_dim": (dict(codebook_dim=4, eps=1e-3), (2, 11, 6)),
    # k-means puts codes on batch vectors, so some residuals are exactly 0 after a stage; there the rotation trick's
    # scale |c| / max(|r|, 1e-6) is ~1e6 times rounding noise on both sides (the peer's residual subtracts the
    # rotated code, ours the code): straight-through, where the gradient is well defined
    "kmeans": (dict(kmeans_init=True, kmeans_iters=3, rotation_trick=False), (3, 17, 6)),
    "dead-code": (dict(threshold_ema_dead_code=2.0, decay=0.5), (2, 19, 6)),
    "shared": (dict(shared_codebook=True), (2, 15, 6)),
    "shared-kmeans": (dict(shared_codebook=True, kmeans_init=True, kmeans_iters=2, rotation_trick=False), (1, 40, 6)),
    "dropout": (dict(quantize_dropout=True, quantize_dropout_cutoff_index=1), (2, 9, 6)),
    "dropout-multiple": (dict(quantize_dropout=True, quantize_dropout_multiple_of=2, num_quantizers=5), (2, 9, 6)),
    "no-commitment": (dict(commitment_weight=0.0), (2, 9, 6)),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_matches_peer(case):
    kw, shape = TRAINING_CASES[case]
    kw = dict(dict(dim=6, num_quantizers=3, codebook_size=13), **kw)
    ref, ours = _pair(**kw)
    _compare_training(ref, ours, shape, steps=4 if "dropout" in case else 3)


def test_image_fmap_and_eval_match_peer():
    # the peer's ResidualVQ builds its index and residual stacks from the input shape as if it were channel-last:
    # it runs only with height == width == dim (ours: any size)
    ref, ours = _pair(dim=5, num_quantizers=3, codebook_size=11, accept_image_fmap=True)
    _compare_training(ref, ours, (2, 5, 5, 5), steps=2)
    ref.eval(), ours.eval()
    x = torch.randn(2, 5, 5, 5, generator=_gen(9))
    with torch.no_grad():
        (qa, ia, la), (qb, ib, lb) = ref(x), ours(x)
    assert ib.shape == (2, 5, 5, 3) and torch.equal(ib, ia)
    close(qb, qa)
    close(lb, la.float())
    close(ours.get_codes_from_indices(ib), ref.get_codes_from_indices(ia))
    close(ours.get_output_from_indices(ib), ref.get_output_from_indices(ia))


def test_eval_outputs_indices_and_codes_match_peer():
    ref, ours = _pair(dim=8, num_quantizers=4, codebook_size=16, codebook_dim=5, quantize_dropout=True)
    ref.eval(), ours.eval()
    x = torch.randn(3, 10, 8, generator=_gen(3))
    a = ref(x, return_all_codes=True)
    b = ours(x, return_all_codes=True)
    assert torch.equal(b[1], a[1])
    for u, v in zip(b, a):
        close(u, v.float() if v.dtype != u.dtype else v)
    coarse = b[1][..., :2]  # dropped fine stages: quantize_dropout lets them be left out
    close(ours.get_output_from_indices(coarse), ref.get_output_from_indices(coarse))
    close(ours.codebooks, ref.codebooks)


def test_state_dict_moves_both_ways():
    kw = dict(dim=8, num_quantizers=3, codebook_size=13, codebook_dim=4, kmeans_init=True)
    torch.manual_seed(0)
    ref = PeerRVQ(**kw)
    ref.train()
    ref(torch.randn(2, 9, 8, generator=_gen(1)))
    ours = ResidualVQ(**kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 8, generator=_gen(2))
    ref.eval(), ours.eval()
    with torch.no_grad():
        (qa, ia, _), (qb, ib, _) = ref(x), ours(x)
    assert torch.equal(ia, ib)
    close(qb, qa)
    back = PeerRVQ(**kw)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.codebooks, ours.codebooks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_backends_agree(backend):
    """The module's training step on each backend: the same as on the reference (integer-valued data: exact)."""
    dev = device_for(backend)
    x, _ = _int_inputs(40, 1, 1, 6, seed=7)
    x = x.reshape(4, 10, 6).to(dev)
    outs = []
    for b in ("torch", backend):
        torch.manual_seed(0)
        m = ResidualVQ(dim=6, num_quantizers=3, codebook_size=9, backend=b, rotation_trick=False).to(dev)
        with torch.no_grad():
            for vq in m.layers:
                vq._codebook.embed.copy_(torch.randint(-3, 4, vq._codebook.embed.shape, generator=_gen(8)).float())
        if b == backend:
            require(OP, backend, x=x.reshape(-1, 6), codebooks=m.codebooks)
        xr = x.clone().requires_grad_()
        q, idx, losses = m(xr)
        (q.sum() + losses.sum()).backward()
        outs.append((q, idx, losses, xr.grad, m.codebooks))
    for u, v in zip(*outs):
        close(u, v)


def test_fused_and_stagewise_paths_agree():
    """k-means pending (or shared codebooks with restarts) run stage by stage; afterwards the fused call: the same."""
    torch.manual_seed(0)
    a = ResidualVQ(dim=6, num_quantizers=3, codebook_size=9, kmeans_init=True)
    a.train()
    a(torch.randn(50, 6, generator=_gen(1)))  # initialises every stage
    b = ResidualVQ(dim=6, num_quantizers=3, codebook_size=9)
    b.load_state_dict(a.state_dict())
    x = torch.randn(30, 6, generator=_gen(2))
    (qa, ia, la), (qb, ib, lb) = a(x), b(x)
    assert torch.equal(ia, ib)
    close(qa, qb)
    close(la, lb)


_NON_DEFAULT_RVQ = {"heads": 2, "diveq": True, "implicit_neural_codebook": True, "mlp_kwargs": {"depth": 2},
                    "beam_size": 2, "eval_beam_size": 2, "beam_score_quantizer_weights": [1.0, 2.0],
                    "quant_grad_frac": 0.5, "use_cosine_sim": True, "learnable_codebook": True,
                    "channel_last": False, "orthogonal_reg_weight": 0.1, "stochastic_sample_codes": True}


@pytest.mark.parametrize("name", sorted(_NON_DEFAULT_RVQ))
def test_unsupported_option_raises(name):
    with pytest.raises(NotImplementedError, match=name):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, **{name: _NON_DEFAULT_RVQ[name]})
    ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, **{name: _UNSUPPORTED_RVQ_OPTIONS[name]})


@pytest.mark.parametrize("kw,err,match", [
    (dict(num_quantizers=0), ValueError, "num_quantizers must be >= 1"),
    (dict(num_quantizers=-2), ValueError, "num_quantizers must be >= 1"),
    (dict(num_quantizers=2.0), TypeError, "num_quantizers must be an int"),
    (dict(num_quantizers=None), ValueError, "num_quantizers must be given"),
    (dict(codebook_size=0), ValueError, "codebook_size must be >= 1"),
    (dict(codebook_size=(8, 8, 8)), ValueError, "3 sizes for num_quantizers=2"),
    (dict(codebook_size=(8, 4)), NotImplementedError, "one codebook size"),
    (dict(dim=0), ValueError, "dim must be >= 1"),
    (dict(codebook_dim=0), ValueError, "codebook_dim must be >= 1"),
    (dict(quantize_dropout=True, quantize_dropout_cutoff_index=-1), ValueError, "cutoff_index"),
    (dict(quantize_dropout=True, quantize_dropout_cutoff_index=2), ValueError, "below num_quantizers"),
    (dict(quantize_dropout_multiple_of=0), ValueError, "quantize_dropout_multiple_of must be >= 1"),
    (dict(decay=1.5), ValueError, "decay"),
    (dict(commitment_weight=-1.0), ValueError, "commitment_weight"),
    (dict(threshold_ema_dead_code=-1), ValueError, "threshold_ema_dead_code"),
    (dict(accept_image_fmap=True, codebook_dim=2), ValueError, "accept_image_fmap"),
    (dict(no_such_option=1), TypeError, "no_such_option"),
])
def test_bad_arguments_raise_one_clear_error(kw, err, match):
    kw = dict(dict(dim=4, num_quantizers=2, codebook_size=8), **kw)
    with pytest.raises(err, match=match):
        ResidualVQ(**kw)


def test_bad_forward_input_raises():
    m = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        m(torch.randn(3, 5))
    with pytest.raises(NotImplementedError, match="mask"):
        m(torch.randn(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool))
    img = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, accept_image_fmap=True)
    with pytest.raises(ValueError, match="accept_image_fmap"):
        img(torch.randn(2, 3, 4))


def test_exported():
    assert vqkernels.ResidualVQ is ResidualVQ is vqkernels.nn.ResidualVQ
