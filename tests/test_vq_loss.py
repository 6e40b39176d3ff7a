"""vq_loss, vector_quantize, code_stats, ema_update_, code_usage: every backend against the spec.

The oracle is taming-transformers' VectorQuantizer2 arithmetic (its loss and straight-through
expression, through autograd) in float64 on the dtype-rounded inputs, and vector-quantize-pytorch's
EuclideanCodebook EMA arithmetic (one-hot einsum, lerp_, Laplace smoothing) for the EMA. The same
test bodies run every backend that can run here (torch reference, C++ cpu, Triton under its
interpreter on CPU or compiled on a GPU); a backend that cannot is skipped with the dispatcher's reasons.
"""

import pytest
import torch
import torch.nn.functional as F

import vqkernels
from vqkernels import BackendNotSupported, _backend, code_stats, code_usage, ema_update_, vector_quantize, vq_loss
from vqkernels.ops import code_stats as cs
from vqkernels.ops import vq_loss as vl
from vqkernels.ops._layout import as_btd
from vqkernels.ops.code_stats import reference as cs_ref
from vqkernels.ops.vq_loss import reference as ref
from vqkernels.testing import check_nearest, make_inputs

from helpers import BACKENDS, device_for, require  # noqa: E402

LOW = [torch.float16, torch.bfloat16]
DTYPE_ID = lambda d: str(d).replace("torch.", "")  # noqa: E731


def require_loss(backend, z, cb, idx):
    require(vl.OP, backend, z=z.reshape(-1, z.shape[-1]), codebook=cb, indices=idx.reshape(-1))


def inputs(N, K, D, dtype, device, *, seed, lead=(), noncontiguous=False, grad=True):
    z, cb = make_inputs(N, K, D, dtype, device, seed=seed, lead=lead, noncontiguous=noncontiguous)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, K, (*lead, N), generator=g).to(device)
    gzq = torch.randn(*lead, N, D, generator=g).to(device=device, dtype=dtype)
    if grad:
        z.requires_grad_(True)
        cb.requires_grad_(True)
    return z, cb, idx, gzq


def taming_oracle(z, cb, idx, gzq, gloss, beta=0.25, legacy=True):
    """taming VectorQuantizer2's loss + straight-through, in float64 autograd on the rounded inputs."""
    z64 = z.detach().double().requires_grad_(True)
    c64 = cb.detach().double().requires_grad_(True)
    zq = c64[idx]
    if legacy:
        loss = torch.mean((zq.detach() - z64) ** 2) + beta * torch.mean((zq - z64.detach()) ** 2)
    else:
        loss = beta * torch.mean((zq.detach() - z64) ** 2) + torch.mean((zq - z64.detach()) ** 2)
    zst = z64 + (zq - z64).detach()
    ((zst * gzq.double()).sum() + gloss * loss).backward()
    return zq.detach(), loss.detach(), z64.grad, c64.grad


def run_loss(backend, z, cb, idx, gzq, gloss, **kw):
    zq, loss = vq_loss(z, cb, idx, backend=backend, **kw)
    gz, gcb = torch.autograd.grad((zq.float() * gzq.float()).sum() + gloss * loss, (z, cb))
    return zq, loss, gz, gcb


def assert_close(got, want, dtype, what, scale=None):
    """got (any dtype) against the float64 oracle: float32 accumulation, rounded once to ``dtype``."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    mag = want.abs().max().item() if scale is None else scale
    eps = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float64: 2**-50}[dtype]
    # one rounding to the output dtype (relative) + float32 accumulation (absolute on the magnitude)
    # (+ the dtype's subnormal spacing: float16 gradients of a mean over N*D elements are often subnormal)
    tiny = torch.finfo(dtype).smallest_normal * eps
    tol = 2 * eps * want.abs() + 64 * 2**-24 * max(mag, 1e-30) + 2 * tiny + 1e-30
    err = (got - want).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{got.numel()} off; flat {i}: got {got.reshape(-1)[i]:.9g}, "
                             f"want {want.reshape(-1)[i]:.9g} (tol {tol.reshape(-1)[i]:.3g})")


# (N, K, D): N 0, 1, 333; K 1, 17, 1000; D 1, 3, 8, 255, 256
SHAPES = [
    (0, 17, 8), (1, 1, 1), (1, 17, 3), (1, 1000, 256), (333, 1, 8), (333, 17, 1), (333, 17, 3),
    (333, 17, 256), (333, 1000, 8), (333, 1000, 255), (333, 1, 255),
]


def _skip_low_interp(backend, dtype):
    if backend == "triton" and device_for("triton") == "cpu" and dtype != torch.float32:
        pytest.skip("fp16/bf16 Triton kernels run on a GPU only (the interpreter runs float32)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d-K%d-D%d" % s)
def test_vq_loss_matches_taming(backend, shape):
    N, K, D = shape
    dev = device_for(backend)
    z, cb, idx, gzq = inputs(N, K, D, torch.float32, dev, seed=N * 7 + K * 3 + D)
    require_loss(backend, z, cb, idx)
    zq, loss, gz, gcb = run_loss(backend, z, cb, idx, gzq, 1.7)
    assert zq.dtype == torch.float32 and loss.dtype == torch.float32 and loss.shape == ()
    assert torch.equal(zq, cb.detach()[idx]), "z_q must be exactly codebook[indices]"
    if N == 0:
        assert float(loss.detach()) == 0.0 and gz.shape == (0, D)
        assert torch.count_nonzero(gcb) == 0
        return
    wq, wl, wgz, wgcb = taming_oracle(z, cb, idx, gzq, 1.7)
    assert_close(loss, wl, torch.float32, "loss")
    assert_close(gz, wgz, torch.float32, "grad z")
    assert_close(gcb, wgcb, torch.float32, "grad codebook")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("beta", [0.25, 1.3])
def test_beta_legacy_batch_dims_and_strides(backend, legacy, beta):
    dev = device_for(backend)
    z, cb, idx, gzq = inputs(37, 50, 24, torch.float32, dev, seed=3, lead=(2, 3), noncontiguous=True)
    assert z.shape == (2, 3, 37, 24) and not z.is_contiguous()
    require_loss(backend, z, cb, idx)
    zq, loss, gz, gcb = run_loss(backend, z, cb, idx, gzq, -0.6, beta=beta, legacy=legacy)
    assert zq.shape == z.shape and gz.shape == z.shape
    _, wl, wgz, wgcb = taming_oracle(z, cb, idx, gzq, -0.6, beta=beta, legacy=legacy)
    assert_close(loss, wl, torch.float32, "loss")
    assert_close(gz, wgz, torch.float32, "grad z")
    assert_close(gcb, wgcb, torch.float32, "grad codebook")
    # a non-contiguous codebook and a non-contiguous upstream gradient too
    cbt = cb.detach().T.contiguous().T.requires_grad_(True)
    zq2, loss2, gz2, gcb2 = run_loss(backend, z, cbt, idx, gzq.transpose(0, 1).contiguous().transpose(0, 1), -0.6,
                                     beta=beta, legacy=legacy)
    assert_close(gz2, wgz, torch.float32, "grad z (strided)")
    assert_close(gcb2, wgcb, torch.float32, "grad codebook (strided)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(2, 5, 7), (1, 1, 1), (3, 1, 4)], ids=lambda s: "B%dH%dW%d" % s)
def test_channel_first_feature_map_in_place(backend, lead):
    """A (B, C, H, W) map permuted to (B, H, W, C): read in place, z_q and grad_z in the map's layout."""
    B, H, W = lead
    C, K = 24, 40
    dev = device_for(backend)
    g = torch.Generator().manual_seed(B * H * W)
    x = torch.randn(B, C, H, W, generator=g).to(dev).requires_grad_(True)
    cb = torch.randn(K, C, generator=g).to(dev).requires_grad_(True)
    idx = torch.randint(0, K, (B, H, W), generator=g).to(dev)
    gout = torch.randn(B, C, H, W, generator=g).to(dev)
    z = x.permute(0, 2, 3, 1)
    require_loss(backend, z, cb, idx)
    z3 = as_btd(z)
    assert z3.data_ptr() == z.data_ptr(), "the permuted map must be viewed, not copied"
    zq, loss = vq_loss(z, cb, idx, backend=backend)
    assert zq.shape == z.shape
    zq_map = zq.permute(0, 3, 1, 2)
    assert zq_map.is_contiguous(), "z_q must come back in z's (channel-first) layout"
    torch.autograd.backward([zq_map, loss], [gout, torch.tensor(0.8, device=dev)])
    assert x.grad.is_contiguous()
    _, wl, wgz, wgcb = taming_oracle(z, cb, idx, gout.permute(0, 2, 3, 1), 0.8)
    assert_close(zq, cb.detach()[idx], torch.float32, "z_q")
    assert_close(loss, wl, torch.float32, "loss")
    assert_close(x.grad.permute(0, 2, 3, 1), wgz, torch.float32, "grad z")
    assert_close(cb.grad, wgcb, torch.float32, "grad codebook")
    # statistics read the map in place too
    if not _backend.not_supported_reasons(cs.OP, backend, z=z3, indices=idx.reshape(z3.shape[:2]), num_codes=K):
        counts, sums = code_stats(z, idx, K, backend=backend)
        want = torch.zeros(K, C, dtype=torch.float64).index_add_(0, idx.reshape(-1).cpu(),
                                                                 z.detach().reshape(-1, C).double().cpu())
        torch.testing.assert_close(sums.double().cpu(), want, rtol=1e-6, atol=1e-5)


def test_as_btd_views_or_copies():
    t = torch.randn(4, 6, 5, 3)
    for v in (t, t.permute(0, 2, 1, 3), t[:, ::2], t.transpose(0, 1), t[0, 0, 0], t[..., :1, :]):
        b = as_btd(v)
        assert b.dim() == 3 and b.shape[-1] == v.shape[-1]
        assert torch.equal(b.reshape(-1, v.shape[-1]), v.reshape(-1, v.shape[-1]))
    fmap = torch.randn(4, 3, 5, 6)  # (B, C, H, W)
    assert as_btd(fmap.permute(0, 2, 3, 1)).data_ptr() == fmap.data_ptr()
    assert as_btd(fmap.permute(0, 2, 3, 1)).shape == (4, 30, 3)
    odd = t.permute(2, 0, 1, 3)  # (5, 4, 6, 3) with strides no split can merge
    assert torch.equal(as_btd(odd).reshape(-1, 3), odd.reshape(-1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_ID)
@pytest.mark.parametrize("shape", [(333, 17, 3), (333, 1000, 256), (1, 1, 1)], ids=lambda s: "N%d-K%d-D%d" % s)
def test_low_precision_accumulates_in_float32(backend, dtype, shape):
    _skip_low_interp(backend, dtype)
    N, K, D = shape
    dev = device_for(backend)
    z, cb, idx, gzq = inputs(N, K, D, dtype, dev, seed=N + K + D)
    require_loss(backend, z, cb, idx)
    zq, loss, gz, gcb = run_loss(backend, z, cb, idx, gzq, 1.0)
    assert zq.dtype == dtype and loss.dtype == torch.float32
    assert gz.dtype == dtype and gcb.dtype == dtype
    assert torch.equal(zq, cb.detach()[idx])
    _, wl, wgz, wgcb = taming_oracle(z, cb, idx, gzq, 1.0)
    assert_close(loss, wl, torch.float32, "loss")  # a float32 sum, not a low-precision one
    assert_close(gz, wgz, dtype, "grad z")
    assert_close(gcb, wgcb, dtype, "grad codebook")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_where_asked(backend):
    """EMA codebooks (no grad) get no scatter; a frozen z still gives the codebook its gradient."""
    dev = device_for(backend)
    z, cb, idx, gzq = inputs(50, 9, 6, torch.float32, dev, seed=5, grad=False)
    require_loss(backend, z, cb, idx)
    _, wl, wgz, wgcb = taming_oracle(z, cb, idx, gzq, 1.0)
    zr = z.clone().requires_grad_(True)
    zq, loss = vq_loss(zr, cb, idx, backend=backend)
    assert zq.requires_grad and loss.requires_grad
    ((zq * gzq).sum() + loss).backward()
    assert_close(zr.grad, wgz, torch.float32, "grad z")
    cr = cb.clone().requires_grad_(True)
    zq, loss = vq_loss(z, cr, idx, backend=backend)
    (g_from_zq,) = torch.autograd.grad((zq * gzq).sum(), cr, retain_graph=True)
    assert torch.count_nonzero(g_from_zq) == 0, "nothing from z_q may reach the codebook"
    loss.backward()
    assert_close(cr.grad, wgcb, torch.float32, "grad codebook")
    zq, loss = vq_loss(z, cb, idx, backend=backend)
    assert not zq.requires_grad and not loss.requires_grad


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, reference). The straight-through estimator and the stop-gradients are, on
# purpose, not the derivative of the forward value; with the other term's weight at 0 each half of
# the loss gradient IS the true derivative, so gradcheck verifies it (through F.normalize for cosine).

@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradcheck_reference_float64(metric):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    cb = torch.randn(11, 7, dtype=torch.float64, generator=g, requires_grad=True)
    zc, cbc = z.detach(), cb.detach()

    def f_z(z):  # w_codebook = 0: the commitment gradient
        return vector_quantize(z, cbc, beta=0.0, legacy=True, metric=metric, backend="torch")[1]

    def f_cb(cb):  # w_commit = 0: the codebook gradient
        return vector_quantize(zc, cb, beta=0.0, legacy=False, metric=metric, backend="torch")[1]

    assert torch.autograd.gradcheck(f_z, (z,))
    assert torch.autograd.gradcheck(f_cb, (cb,))
    idx = vqkernels.nearest_code(z.detach(), cbc, metric=metric)
    # and vq_loss itself with explicit indices, both halves at once via linearity in beta
    assert torch.autograd.gradcheck(lambda z: vq_loss(z, cbc, idx, beta=0.0, backend="torch")[1], (z,))
    assert torch.autograd.gradcheck(lambda c: vq_loss(zc, c, idx, beta=0.0, legacy=False, backend="torch")[1], (cb,))


def test_straight_through_in_float64():
    z, cb, idx, gzq = inputs(20, 7, 5, torch.float64, "cpu", seed=9)
    for legacy in (True, False):
        zq, loss, gz, gcb = run_loss("torch", z, cb, idx, gzq.double(), 2.0, beta=0.4, legacy=legacy)
        _, wl, wgz, wgcb = taming_oracle(z, cb, idx, gzq, 2.0, beta=0.4, legacy=legacy)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, wl, rtol=1e-13, atol=0)
        torch.testing.assert_close(gz, wgz, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(gcb, wgcb, rtol=1e-13, atol=1e-15)


def test_reference_chunks_give_the_same_answer():
    z, cb, idx, gzq = inputs(100, 30, 7, torch.float32, "cpu", seed=30, grad=False)
    a = ref.vq_loss_fwd_reference(z, cb, idx, 0.5, max_chunk_elems=5)
    b = ref.vq_loss_fwd_reference(z, cb, idx, 0.5)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
    gl = torch.tensor(1.5)
    a = ref.vq_loss_bwd_reference(gzq, gl, z, cb, idx, 1.0, 0.25, max_chunk_elems=5)
    b = ref.vq_loss_bwd_reference(gzq, gl, z, cb, idx, 1.0, 0.25)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-7)
    a = cs_ref.code_stats_reference(z, idx, 30, max_chunk_elems=5)
    b = cs_ref.code_stats_reference(z, idx, 30)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# vector_quantize: search + loss.

def _search_reasons(backend, z, cb, metric):
    from vqkernels.ops import nearest_code as nc

    return _backend.not_supported_reasons(nc.OP, backend, x=z.reshape(-1, z.shape[-1]), codebook=cb,
                                         metric=nc.METRICS[metric], allow_tf32=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(333, 17, 3), (128, 1000, 64), (1, 1, 8)], ids=lambda s: "N%d-K%d-D%d" % s)
def test_vector_quantize(backend, metric, shape):
    N, K, D = shape
    dev = device_for(backend)
    z, cb, _, gzq = inputs(N, K, D, torch.float32, dev, seed=K + D, lead=(2,))
    require_loss(backend, z, cb, _)
    r = _search_reasons(backend, z, cb, metric)
    if r:
        pytest.skip(f"{backend} cannot run nearest_code here: " + "; ".join(r))
    zq, loss, idx = vector_quantize(z, cb, beta=0.3, metric=metric, backend=backend)
    assert idx.shape == z.shape[:-1] and idx.dtype == torch.int64 and not idx.requires_grad
    gz, gcb = torch.autograd.grad((zq * gzq).sum() + loss, (z, cb))
    # the oracle on the vectors the op quantises (normalised for cosine), with its indices
    z64 = z.detach().double().requires_grad_(True)
    c64 = cb.detach().double().requires_grad_(True)
    zn = F.normalize(z64, dim=-1) if metric == "cosine" else z64
    cn = F.normalize(c64, dim=-1) if metric == "cosine" else c64
    check_nearest(zn.detach().float(), cn.detach().float(), idx, metric="l2")
    q = cn[idx]
    wl = torch.mean((q.detach() - zn) ** 2) + 0.3 * torch.mean((q - zn.detach()) ** 2)
    zst = zn + (q - zn).detach()
    ((zst * gzq.double()).sum() + wl).backward()
    assert_close(zq, q.detach(), torch.float32, "z_q")
    assert_close(loss, wl.detach(), torch.float32, "loss")
    assert_close(gz, z64.grad, torch.float32, "grad z", scale=z64.grad.abs().max().item() * 4)
    assert_close(gcb, c64.grad, torch.float32, "grad codebook", scale=c64.grad.abs().max().item() * 4)


def test_vector_quantize_cpu_loss_with_torch_search():
    """The cpu loss kernel composed with any search (here the reference's) gives the oracle's answer."""
    z, cb, _, gzq = inputs(333, 100, 16, torch.float32, "cpu", seed=4)
    require_loss("cpu", z, cb, _)
    idx = vqkernels.nearest_code(z.detach(), cb.detach(), backend="torch")
    zq, loss, gz, gcb = run_loss("cpu", z, cb, idx, gzq, 1.0)
    zq2, loss2, idx2 = vector_quantize(z, cb, backend="torch")
    assert torch.equal(idx, idx2) and torch.equal(zq, zq2)
    _, wl, wgz, wgcb = taming_oracle(z, cb, idx, gzq, 1.0)
    assert_close(loss, wl, torch.float32, "loss")
    assert_close(gz, wgz, torch.float32, "grad z")
    assert_close(gcb, wgcb, torch.float32, "grad codebook")


# ---------------------------------------------------------------------------------------------
# Determinism of the cpu scatter (owner-computes ordered reduction): bit-identical for any run
# and thread count, even when a few codes take most rows.

def test_cpu_codebook_gradient_is_deterministic():
    z, cb, idx, gzq = inputs(20000, 300, 40, torch.float32, "cpu", seed=12, grad=False)
    idx[: 12000] = torch.randint(0, 3, (12000,))  # a near-collapsed codebook: 3 codes take most rows
    require_loss("cpu", z, cb, idx)
    gl = torch.tensor(0.7)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 2, 1, 3):
            torch.set_num_threads(t)
            gz, gcb = torch.ops.vqkernels_C.vq_loss_bwd(gzq, gl, z, cb, idx, 1.0, 0.25, True, True)
            counts, sums = torch.ops.vqkernels_C.code_stats(z, idx, 300)
            zq, loss = torch.ops.vqkernels_C.vq_loss_fwd(z, cb, idx, 1.0)
            outs.append((gz, gcb, counts, sums, loss))
    finally:
        torch.set_num_threads(old)
    # the strided (transposed-tile) paths give the same bits as the contiguous ones
    zs, gs = z.T.contiguous().T, gzq.T.contiguous().T
    assert zs.stride() == (1, 20000)
    gz, gcb = torch.ops.vqkernels_C.vq_loss_bwd(gs, gl, zs, cb, idx, 1.0, 0.25, True, True)
    counts, sums = torch.ops.vqkernels_C.code_stats(zs, idx, 300)
    zq, loss = torch.ops.vqkernels_C.vq_loss_fwd(zs, cb, idx, 1.0)
    assert zq.stride() == zs.stride() and gz.stride() == zs.stride()
    outs.append((gz.contiguous(), gcb, counts, sums, loss))
    for o in outs[1:]:
        for a, b, name in zip(outs[0], o, ("grad z", "grad codebook", "counts", "sums", "loss")):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name} differs between runs/thread counts"
    wgcb = ref.vq_loss_bwd_reference(gzq, gl, z, cb, idx, 1.0, 0.25)[1]
    torch.testing.assert_close(outs[0][1], wgcb, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# EMA: vector-quantize-pytorch's EuclideanCodebook arithmetic, after several steps.

def vqp_ema_oracle(embed, cluster_size, embed_avg, z, idx, decay, eps):
    """EuclideanCodebook.update_indices -> ema_inplace -> update_ema, as vector-quantize-pytorch writes it."""
    K = embed.shape[0]
    flatten = z.reshape(-1, z.shape[-1]).float()
    onehot = F.one_hot(idx.reshape(-1), K).float()
    new_cluster_size = onehot.sum(0)
    new_embed_sum = flatten.T @ onehot  # (D, K)
    cluster_size.lerp_(new_cluster_size, 1 - decay)
    embed_avg.lerp_(new_embed_sum.T, 1 - decay)
    n = cluster_size.sum(dim=-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    embed.copy_(embed_avg / smoothed[:, None])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zdtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
def test_ema_after_several_steps(backend, zdtype):
    _skip_low_interp(backend, zdtype)
    dev = device_for(backend)
    K, D = 50, 12
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(K, D, generator=g).to(dev)
    require(cs.OP, backend, z=torch.empty(1, D, dtype=zdtype, device=dev),
            indices=torch.empty(1, dtype=torch.long, device=dev), num_codes=K)
    bufs = [embed.clone(), torch.ones(K, device=dev), embed.clone()]
    want = [embed.clone(), torch.ones(K, device=dev), embed.clone()]
    for step in range(6):
        z = torch.randn(3, 70, D, generator=g).to(device=dev, dtype=zdtype)
        idx = vqkernels.nearest_code(z.float(), bufs[0], backend="torch")
        if step == 2:
            idx[:] = 4  # a step where one code takes every vector, the others decay
        ema_update_(*bufs, z, idx, decay=0.8, eps=1e-5, backend=backend)
        vqp_ema_oracle(*want, z, idx, 0.8, 1e-5)
    for got, w, name in zip(bufs, want, ("codebook", "cluster_size", "embed_sum")):
        torch.testing.assert_close(got, w, rtol=2e-6, atol=2e-6, msg=f"{name} after 6 EMA steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_code_stats_and_ema_from_stats(backend):
    dev = device_for(backend)
    z, _, idx, _ = inputs(333, 17, 5, torch.float32, dev, seed=2, lead=(2,), noncontiguous=True, grad=False)
    require(cs.OP, backend, z=z.reshape(-1, 5), indices=idx.reshape(-1), num_codes=17)
    counts, sums = code_stats(z, idx, 17, backend=backend)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert torch.equal(counts.cpu(), torch.bincount(idx.reshape(-1).cpu(), minlength=17).float())
    want = torch.zeros(17, 5, dtype=torch.float64).index_add_(0, idx.reshape(-1).cpu(), z.reshape(-1, 5).double().cpu())
    torch.testing.assert_close(sums.double().cpu(), want, rtol=1e-6, atol=1e-5)
    # ema_update_ == code_stats + ema_update_from_stats_
    a = [torch.randn(17, 5, device=dev), torch.rand(17, device=dev) + 0.5, torch.randn(17, 5, device=dev)]
    b = [t.clone() for t in a]
    ema_update_(*a, z, idx, decay=0.9, backend=backend)
    vqkernels.ema_update_from_stats_(*b, counts, sums, decay=0.9)
    for x, y in zip(a, b):
        if backend in ("torch", "cpu"):  # deterministic sums: the same bits
            assert torch.equal(x, y)
        else:  # atomics: the per-code sums may differ in the last bits between two runs
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    # more codes than used, and K larger than N
    counts, sums = code_stats(z[:1, :3], idx[:1, :3], 1000, backend=backend)
    assert counts.sum() == 3 and sums.shape == (1000, 5)


def test_triton_code_stats_counts_exactly_past_2_24():
    """The Triton counts are int64 atomics: float32 ones stop growing at 2^24 per code (2^24 + 1 rounds back).

    Counting 2^24 rows under the interpreter would take minutes, so the accumulating launcher starts from
    a count of 2^24 already there: the five new rows must all arrive."""
    dev = device_for("triton")
    z = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3).to(dev)
    idx = torch.tensor([0, 2, 0, 0, 1, 0, 0]).to(dev)
    require(cs.OP, "triton", z=z, indices=idx, num_codes=3)
    from vqkernels.ops.code_stats import triton as tr

    counts = torch.tensor([2**24, 0, 2**40], dtype=torch.int64, device=dev)
    sums = torch.zeros(3, 3, device=dev)
    tr.accumulate_code_stats_(z, idx, counts, sums)
    assert counts.cpu().tolist() == [2**24 + 5, 1, 2**40 + 1]
    want = torch.zeros(3, 3).index_add_(0, idx.cpu(), z.cpu())
    assert torch.equal(sums.cpu(), want)  # small integers: exact in any order
    with pytest.raises(TypeError, match="counts must be int64"):
        tr.accumulate_code_stats_(z, idx, counts.float(), sums)


# ---------------------------------------------------------------------------------------------
# code_usage

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("NK", [(0, 5), (1, 1), (333, 17), (5000, 1000)], ids=lambda s: "N%d-K%d" % s)
def test_code_usage_matches_bincount(backend, NK):
    N, K = NK
    dev = device_for(backend)
    g = torch.Generator().manual_seed(N + K)
    idx = torch.randint(0, K, (N,), generator=g)
    idx[: N // 2] = torch.randint(0, max(1, K // 10), (N // 2,), generator=g)
    require(cs.OP_USAGE, backend, indices=idx.to(dev), num_codes=K)
    counts, perplexity = code_usage(idx.to(dev).reshape(1, -1), K, backend=backend)
    assert counts.dtype == torch.int64 and perplexity.dtype == torch.float32 and perplexity.shape == ()
    assert torch.equal(counts.cpu(), torch.bincount(idx, minlength=K))
    if N == 0:
        assert float(perplexity) == 1.0
        return
    # taming's VectorQuantizer perplexity, from its one-hot
    e_mean = F.one_hot(idx, K).double().mean(0)
    want = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
    torch.testing.assert_close(perplexity.double().cpu(), want, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, on every backend.

@pytest.mark.parametrize("backend", BACKENDS + [None])
def test_bad_input_errors(backend):
    z, cb = torch.randn(10, 8), torch.randn(5, 8)
    idx = torch.randint(0, 5, (10,))
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        vq_loss(z, cb[0], idx, backend=backend)
    with pytest.raises(ValueError, match=r"last dimension of z \(7\)"):
        vq_loss(torch.randn(10, 7), cb, idx, backend=backend)
    with pytest.raises(TypeError, match="share a dtype"):
        vq_loss(z, cb.double(), idx, backend=backend)
    with pytest.raises(TypeError, match="z must be a floating-point"):
        vq_loss(torch.ones(10, 8, dtype=torch.int32), cb, idx, backend=backend)
    with pytest.raises(ValueError, match="one device"):
        vq_loss(z, cb.to("meta"), idx, backend=backend)
    with pytest.raises(ValueError, match="at least one code"):
        vq_loss(z, torch.empty(0, 8), idx, backend=backend)
    with pytest.raises(TypeError, match="indices must be int64"):
        vq_loss(z, cb, idx.int(), backend=backend)
    with pytest.raises(ValueError, match=r"indices must have shape z.shape\[:-1\]"):
        vq_loss(z, cb, idx[:9], backend=backend)
    with pytest.raises(ValueError, match="indices must be on the device"):
        vq_loss(z, cb, idx.to("meta"), backend=backend)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        vq_loss(z.numpy(), cb, idx, backend=backend)
    with pytest.raises(ValueError, match="metric must be one of"):
        vector_quantize(z, cb, metric="dot", backend=backend)
    with pytest.raises(ValueError, match="num_codes must be in"):
        code_usage(idx, 0, backend=backend)
    with pytest.raises(TypeError, match="indices must be int64"):
        code_usage(idx.float(), 5, backend=backend)
    with pytest.raises(ValueError, match=r"cluster_size must have shape"):
        ema_update_(cb, torch.ones(4), cb.clone(), z, idx, decay=0.9, backend=backend)
    with pytest.raises(ValueError, match=r"embed_sum must have shape"):
        ema_update_(cb, torch.ones(5), cb[:, :4].clone(), z, idx, decay=0.9, backend=backend)
    with pytest.raises(ValueError, match="decay must be in"):
        ema_update_(cb, torch.ones(5), cb.clone(), z, idx, decay=1.5, backend=backend)
    with pytest.raises(ValueError, match=r"indices must have shape"):
        code_stats(z, idx[:3], 5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [5, -1, 1 << 40])
def test_indices_out_of_range_raise_on_every_backend(backend, bad, monkeypatch):
    dev = device_for(backend)
    # The CUDA kernels check the range on the device without a host sync (a device-side error, tested in
    # tests/test_gpu_only.py); the synchronous IndexError, as on every other backend, is opted into here.
    monkeypatch.setenv("VQKERNELS_SYNC_INDEX_CHECK", "1")
    z, cb, idx, _ = inputs(40, 5, 8, torch.float32, dev, seed=1, grad=False)
    idx[17] = bad
    zr = z.clone().requires_grad_(True)
    checked = 0
    for op, args, call in [
        (vl.OP, dict(z=z, codebook=cb, indices=idx), lambda: vq_loss(zr, cb, idx, backend=backend)),
        (cs.OP, dict(z=z, indices=idx, num_codes=5), lambda: code_stats(z, idx, 5, backend=backend)),
        (cs.OP, dict(z=z, indices=idx, num_codes=5), lambda: ema_update_(cb.clone(), torch.ones(5, device=dev),
                                                                         cb.clone(), z, idx, decay=0.9,
                                                                         backend=backend)),
        (cs.OP_USAGE, dict(indices=idx, num_codes=5), lambda: code_usage(idx, 5, backend=backend)),
    ]:
        if _backend.not_supported_reasons(op, backend, **args):
            continue
        with pytest.raises(IndexError, match=rf"indices out of range: got index {bad}, .*K=5"):
            call()
        checked += 1
    if backend != "cuda" and not checked:
        require(vl.OP, backend, z=z, codebook=cb, indices=idx)
    if not checked:
        pytest.skip(f"{backend} runs none of these ops here")
    # the backward op checks too
    if not _backend.not_supported_reasons(vl.OP, backend, z=z, codebook=cb, indices=idx):
        with pytest.raises(IndexError, match="indices out of range"):
            vl._vq_loss_backward_op(z, torch.tensor(1.0, device=dev), z, cb, idx, 1.0, 0.25, True, True, backend)


def test_triton_index_check_on_cpu_tensors_raises_without_the_sync_switch(monkeypatch):
    # The Triton launchers check CUDA tensors on the device (a device-side assert, no host sync; tests/test_gpu_only.py
    # and tests/test_triton_sm90.py); CPU tensors (the interpreter) get the IndexError whatever the switch says.
    monkeypatch.delenv("VQKERNELS_SYNC_INDEX_CHECK", raising=False)
    z, cb, idx, _ = inputs(40, 5, 8, torch.float32, "cpu", seed=2, grad=False)
    require_loss("triton", z, cb, idx)
    idx[3] = 5
    for call in (lambda: vq_loss(z, cb, idx, backend="triton"), lambda: code_stats(z, idx, 5, backend="triton"),
                 lambda: code_usage(idx, 5, backend="triton")):
        with pytest.raises(IndexError, match="indices out of range: got index 5, .*K=5"):
            call()


def test_named_backend_that_cannot_run_raises_with_reasons():
    z, cb, idx, _ = inputs(4, 3, 8, torch.float64, "cpu", seed=0, grad=False)
    with pytest.raises(BackendNotSupported, match="float64"):
        vq_loss(z, cb, idx, backend="cpu")
    with pytest.raises(BackendNotSupported, match="cuda"):
        vq_loss(z.float(), cb.float(), idx, backend="cuda")
    assert vq_loss(z, cb, idx)[1].dtype == torch.float64  # auto falls back to the reference


def test_c_kernels_check_their_own_arguments():
    if not hasattr(torch.ops.vqkernels_C, "vq_loss_fwd") or _backend.not_supported_reasons(
            vl.OP, "cpu", z=torch.empty(1, 1), codebook=torch.empty(1, 1), indices=torch.empty(1, dtype=torch.long)):
        pytest.skip("the cpu vq_loss kernels were not built")
    ops = torch.ops.vqkernels_C
    z, cb, idx = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="D="):
        ops.vq_loss_fwd(z, torch.randn(5, 4), idx, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.vq_loss_fwd(z, cb.half(), idx, 1.0)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        ops.vq_loss_fwd(z, cb, idx.int(), 1.0)
    with pytest.raises(RuntimeError, match=r"indices must have shape \(N,\)"):
        ops.vq_loss_fwd(z, cb, idx[:3], 1.0)
    with pytest.raises(RuntimeError, match="at least one code"):
        ops.vq_loss_fwd(z, cb[:0], idx, 1.0)
    with pytest.raises(RuntimeError, match="grad_zq must have the shape"):
        ops.vq_loss_bwd(z[:2], torch.tensor(1.0), z, cb, idx, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="num_codes must be >= 1"):
        ops.code_stats(z, idx, 0)
    with pytest.raises(RuntimeError, match="num_codes must be >= 1"):
        ops.code_usage(idx, 0)
    with pytest.raises(IndexError, match="out of range"):
        ops.code_usage(idx - 1, 3)


# ---------------------------------------------------------------------------------------------
# torch.library integration

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = device_for(backend)
    z, cb, idx, gzq = inputs(37, 19, 12, torch.float32, dev, seed=2)
    require_loss(backend, z, cb, idx)
    torch.library.opcheck(vl._vq_loss_op, (z, cb, idx, 1.0, 0.25, backend))
    torch.library.opcheck(vl._vq_loss_op, (z[:0], cb, idx[:0], 0.25, 1.0, backend))
    zm = torch.randn(2, 12, 3, 5, device=dev).permute(0, 2, 3, 1).reshape(2, 15, 12).requires_grad_(True)
    im = torch.randint(0, 19, (2, 15), device=dev)
    torch.library.opcheck(vl._vq_loss_op, (zm, cb, im, 1.0, 0.25, backend))
    gm = torch.randn(2, 12, 15, device=dev).transpose(1, 2)
    torch.library.opcheck(vl._vq_loss_backward_op, (gm, torch.tensor(0.5, device=dev), zm.detach(), cb.detach(), im,
                                                    1.0, 0.25, True, True, backend))
    zd, cd = z.detach(), cb.detach()
    gl = torch.tensor(1.3, device=dev)
    for nz, ncb in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(vl._vq_loss_backward_op, (gzq, gl, zd, cd, idx, 1.0, 0.25, nz, ncb, backend))
    if not _backend.not_supported_reasons(cs.OP, backend, z=zd, indices=idx, num_codes=19):
        torch.library.opcheck(cs._code_stats_op, (zd, idx, 19, backend))
        bufs = (cd.clone(), torch.ones(19, device=dev), cd.clone())
        torch.library.opcheck(cs._ema_update_op, (*bufs, zd, idx, 0.9, 1e-5, backend))
    if not _backend.not_supported_reasons(cs.OP_USAGE, backend, indices=idx, num_codes=19):
        torch.library.opcheck(cs._code_usage_op, (idx, 19, backend))
    bufs = (cd.clone(), torch.ones(19, device=dev), cd.clone())
    torch.library.opcheck(cs._ema_update_from_stats_op, (*bufs, torch.rand(19, device=dev), cd.clone(), 0.9, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    z, cb, idx, gzq = inputs(64, 33, 16, torch.float32, dev, seed=8, lead=(2,))
    require_loss(backend, z, cb, idx)
    search = "torch" if _search_reasons(backend, z, cb, "l2") else backend

    def f(z, cb, idx, cs, es, emb):
        zq, loss = vq_loss(z, cb, idx, beta=0.5, backend=backend)
        i2 = vqkernels.nearest_code(z.detach(), cb.detach(), backend=search)
        counts, perplexity = code_usage(i2, 33, backend=backend)
        ema_update_(emb, cs, es, z.detach(), idx, decay=0.9, backend=backend)
        return (zq * gzq).sum() + loss, perplexity, counts

    def fresh():
        return torch.ones(33, device=dev), cb.detach().clone(), cb.detach().clone()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    b1, b0 = fresh(), fresh()
    out1 = compiled(z, cb, idx, *b1)
    g1 = torch.autograd.grad(out1[0], (z, cb))
    out0 = f(z, cb, idx, *b0)
    g0 = torch.autograd.grad(out0[0], (z, cb))
    torch.testing.assert_close(out1[0], out0[0])
    assert torch.equal(out1[2], out0[2]) and torch.allclose(out1[1], out0[1])
    for a, b in zip(g1 + b1, g0 + b0):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_vector_quantize():
    z, cb, _, gzq = inputs(64, 33, 16, torch.float32, "cpu", seed=8)

    def f(z, cb):
        zq, loss, idx = vector_quantize(z, cb, metric="cosine", backend="torch")
        return (zq * gzq).sum() + loss, idx

    out1 = torch.compile(f, fullgraph=True)(z, cb)
    out0 = f(z, cb)
    torch.testing.assert_close(out1[0], out0[0])
    assert torch.equal(out1[1], out0[1])
    torch.testing.assert_close(torch.autograd.grad(out1[0], (z, cb)), torch.autograd.grad(out0[0], (z, cb)))
