"""The drop-in quantizers against the real packages: taming-transformers' VectorQuantizer2 and
vector-quantize-pytorch's VectorQuantize.

Same weights and inputs -> the same outputs, indices, loss and gradients (to the input and to the
codebook); with EMA, k-means init and dead-code restarts (random choices aligned by seeding both sides
identically before each step) the same codebook and buffers after several steps; state_dicts move both
ways. Tolerances: fp32 rounding only (the peers' straight-through ``z + (q - z).detach()`` is not
bit-exact, ours returns the code itself). Shapes are small and odd so each test runs in about a second.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

import vqkernels
from vqkernels import VectorQuantize, VectorQuantizer
from vqkernels.nn.quantizer import _UNSUPPORTED_VQ_OPTIONS



# The peers are imported by the tests that compare against them (skipping those alone where a peer is missing,
# as on the GPU image); the tests of our modules' own behaviour run everywhere.
def VectorQuantizer2(*args, **kwargs):
    return pytest.importorskip("taming.modules.vqvae.quantize").VectorQuantizer2(*args, **kwargs)


def PeerVQ(*args, **kwargs):
    return pytest.importorskip("vector_quantize_pytorch").VectorQuantize(*args, **kwargs)


ATOL = 2e-6
RTOL = 1e-5


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# VectorQuantizer vs taming's VectorQuantizer2

def _taming_pair(n_e=37, e_dim=5, beta=0.25, seed=0, **kw):
    torch.manual_seed(seed)
    ref = VectorQuantizer2(n_e, e_dim, beta, **kw)
    torch.manual_seed(seed)
    ours = VectorQuantizer(n_e, e_dim, beta, **kw)
    return ref, ours


def _run_taming(mod, z, w):
    z = z.clone().requires_grad_()
    z_q, loss, (perplexity, min_encodings, idx) = mod(z)
    ((z_q * w).sum() + loss).backward()
    return z_q, loss, idx, z.grad, mod.embedding.weight.grad, perplexity, min_encodings


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane_index_shape", [False, True])
def test_vector_quantizer_matches_taming(legacy, sane_index_shape):
    ref, ours = _taming_pair(legacy=legacy, sane_index_shape=sane_index_shape, beta=0.3)
    assert torch.equal(ref.embedding.weight, ours.embedding.weight)  # same init, same random calls
    ours.embedding.weight.data.mul_(30)  # codes spread like the data, so many codes are used
    ref.embedding.weight.data.copy_(ours.embedding.weight.data)
    z, w = randn(3, 5, 7, 6, seed=1), randn(3, 5, 7, 6, seed=2)
    a = _run_taming(ref, z, w)
    b = _run_taming(ours, z, w)
    assert b[0].shape == a[0].shape and b[0].dtype == a[0].dtype
    assert b[2].shape == a[2].shape and torch.equal(b[2], a[2])
    close(b[0], a[0])
    close(b[1], a[1])
    close(b[3], a[3])
    close(b[4], a[4])
    assert b[6] is None and a[6] is None
    # a real perplexity where taming returns None
    p = torch.bincount(a[2].reshape(-1), minlength=37).double() / a[2].numel()
    close(b[5], torch.exp(-(p * torch.log(p + 1e-10)).sum()).float())
    assert b[5].dtype == torch.float32


def test_vector_quantizer_eval_and_codebook_entry_match_taming():
    ref, ours = _taming_pair(n_e=23, e_dim=6, sane_index_shape=True)
    ref.eval(), ours.eval()
    z = randn(2, 6, 5, 3, seed=3) / 20
    with torch.no_grad():
        a, b = ref(z), ours(z)
    close(b[0], a[0])
    close(b[1], a[1])
    assert torch.equal(b[2][2], a[2][2])
    shape = (2, 5, 3, 6)
    close(ours.get_codebook_entry(b[2][2].reshape(-1), shape), ref.get_codebook_entry(a[2][2].reshape(-1), shape))
    close(ours.get_codebook_entry(b[2][2].reshape(-1), None), ref.get_codebook_entry(a[2][2].reshape(-1), None))


@pytest.mark.parametrize("unknown_index", ["random", "extra", 3])
def test_vector_quantizer_remap_matches_taming(tmp_path, unknown_index):
    used = np.array([9, 2, 4, 0, 11, 7, 4, 13], dtype=np.int64)  # unsorted, a duplicate, some codes unused
    path = tmp_path / "used.npy"
    np.save(path, used)
    ref, ours = _taming_pair(n_e=16, e_dim=4, remap=str(path), unknown_index=unknown_index)
    for m in (ref, ours):
        m.embedding.weight.data.copy_(randn(16, 4, seed=4))
    assert ours.re_embed == ref.re_embed and ours.unknown_index == ref.unknown_index
    z = randn(3, 4, 5, 2, seed=5)
    torch.manual_seed(7)
    a = ref(z)
    torch.manual_seed(7)
    b = ours(z)
    assert b[2][2].shape == a[2][2].shape == (30, 1)
    assert torch.equal(b[2][2], a[2][2])
    close(b[0], a[0])
    shape = (3, 5, 2, 4)
    close(ours.get_codebook_entry(b[2][2].clone(), shape), ref.get_codebook_entry(a[2][2].clone(), shape))
    inds = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(8))
    torch.manual_seed(9)
    ra = ref.remap_to_used(inds.clone())
    torch.manual_seed(9)
    rb = ours.remap_to_used(inds.clone())
    assert torch.equal(ra, rb)
    assert torch.equal(ours.unmap_to_all(rb.clone()), ref.unmap_to_all(ra.clone()))


def test_taming_state_dict_loads_unchanged_and_back():
    ref, _ = _taming_pair(n_e=29, e_dim=7, seed=1)
    ours = VectorQuantizer(29, 7, 0.25)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["embedding.weight"]
    ours.load_state_dict(ref.state_dict())  # strict
    z = randn(2, 7, 3, 3, seed=6) / 10
    close(ours(z)[1], ref(z)[1])
    ours.embedding.weight.data.add_(1.0)
    back = VectorQuantizer2(29, 7, 0.25)
    back.load_state_dict(ours.state_dict())  # strict, the other way
    assert torch.equal(back.embedding.weight, ours.embedding.weight)


def test_taming_checkpoint_with_ema_options_loads():
    """A plain taming state_dict loads (strict) into a VectorQuantizer with EMA / k-means / dead-code options."""
    ref, _ = _taming_pair(n_e=11, e_dim=3)
    ours = VectorQuantizer(11, 3, 0.25, decay=0.9, kmeans_init=True, threshold_ema_dead_code=1)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.embedding.weight, ref.embedding.weight)
    assert torch.equal(ours.embed_sum, ref.embedding.weight) and torch.equal(ours.cluster_size, torch.ones(11))
    assert bool(ours.initted)  # a loaded codebook is not re-initialised by k-means
    sd = ours.state_dict()
    assert set(sd) == {"embedding.weight", "cluster_size", "embed_sum", "initted"}
    again = VectorQuantizer(11, 3, 0.25, decay=0.9, kmeans_init=True, threshold_ema_dead_code=1)
    again.load_state_dict(sd)


@pytest.mark.slow
def test_taming_vqmodel_checkpoint_loads_with_our_quantizer():
    """taming's VQModel (its own constructor) with our VectorQuantizer in place of its quantize: its
    state_dict loads unchanged and the model gives the same reconstruction and loss."""
    pytest.importorskip("taming")
    plu = pytest.importorskip("pytorch_lightning.utilities")

    if "pytorch_lightning.utilities.distributed" not in sys.modules:  # taming 0.0.6 imports a module gone today
        stand_in = types.ModuleType("pytorch_lightning.utilities.distributed")
        stand_in.rank_zero_only = plu.rank_zero_only
        sys.modules["pytorch_lightning.utilities.distributed"] = stand_in
    from taming.models.vqgan import VQModel

    dd = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    ref = VQModel(ddconfig=dd, lossconfig={"target": "torch.nn.Identity"}, n_embed=32, embed_dim=8).eval()
    ckpt = ref.state_dict()
    model = VQModel(ddconfig=dd, lossconfig={"target": "torch.nn.Identity"}, n_embed=32, embed_dim=8).eval()
    model.quantize = VectorQuantizer(32, 8, beta=0.25)
    model.load_state_dict(ckpt)  # strict: every key, unchanged
    x = randn(2, 3, 16, 16, seed=1)
    with torch.no_grad():
        (xa, la), (xb, lb) = ref(x), model(x)
    close(xb, xa, atol=1e-5, rtol=1e-4)
    close(lb, la)
    assert set(model.state_dict()) == set(ckpt)


# ---------------------------------------------------------------------------------------------
# VectorQuantize vs vector-quantize-pytorch's VectorQuantize

def _vq_pair(dim=6, codebook_size=19, seed=0, **kw):
    torch.manual_seed(seed)
    ref = PeerVQ(dim=dim, codebook_size=codebook_size, **kw)
    torch.manual_seed(seed)
    ours = VectorQuantize(dim=dim, codebook_size=codebook_size, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():  # same random calls at construction: the same weights
        assert torch.equal(ours.state_dict()[k], v), k
    return ref, ours


def _step(mod, x, w, step_seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(step_seed)  # the same random state for k-means / dead-code draws on both sides
    q, idx, loss = mod(x)
    ((q * w).sum() + loss).backward()
    return q, idx, loss, x.grad


def _compare_training(ref, ours, shape, steps=4, learnable=False, atol=ATOL):
    ref.train(), ours.train()
    g = torch.Generator().manual_seed(123)
    for s in range(steps):
        x = torch.randn(*shape, generator=g)
        w = torch.randn(*shape, generator=g)
        a = _step(ref, x, w, 1000 + s)
        b = _step(ours, x, w, 1000 + s)
        assert b[0].shape == a[0].shape and b[1].shape == a[1].shape
        assert torch.equal(b[1], a[1]), f"indices differ at step {s}"
        close(b[0], a[0], atol=atol)
        close(b[2], a[2], atol=atol)
        assert b[2].dtype == torch.float32
        close(b[3], a[3], atol=atol)
        if learnable:
            close(ours._codebook.embed.grad, ref._codebook.embed.grad, atol=atol)
            ref._codebook.embed.grad = ours._codebook.embed.grad = None
        sd = ours.state_dict()
        for k, v in ref.state_dict().items():
            close(sd[k], v, atol=atol)


@pytest.mark.parametrize("kw", [
    dict(),  # defaults: EMA decay 0.8, rotation trick (dim > 1), commitment weight 1
    dict(decay=0.95, rotation_trick=False, commitment_weight=0.4),
    dict(use_cosine_sim=True),
    dict(codebook_dim=3, eps=1e-3),
    dict(kmeans_init=True, kmeans_iters=3),
    dict(threshold_ema_dead_code=2.0, decay=0.5),
    dict(kmeans_init=True, use_cosine_sim=True, threshold_ema_dead_code=1.5),
], ids=["defaults", "decay-straight-through", "cosine", "codebook_dim", "kmeans", "dead-code", "cosine-kmeans-dead"])
def test_vector_quantize_ema_training_matches(kw):
    ref, ours = _vq_pair(**kw)
    _compare_training(ref, ours, (3, 13, 6))


@pytest.mark.parametrize("kw", [
    dict(rotation_trick=False),
    dict(rotation_trick=True, commitment_weight=0.3),
    dict(rotation_trick=False, threshold_ema_dead_code=1.0, codebook_dim=4, decay=0.6),
], ids=["straight-through", "rotation", "dead-code-projection"])
def test_vector_quantize_learnable_codebook_grads_match(kw):
    ref, ours = _vq_pair(learnable_codebook=True, ema_update=False, **kw)
    assert isinstance(ours._codebook.embed, torch.nn.Parameter)
    _compare_training(ref, ours, (2, 17, 6), learnable=True)


@pytest.mark.parametrize("kw,shape", [
    (dict(accept_image_fmap=True), (2, 6, 3, 5)),
    (dict(channel_last=False), (2, 6, 7)),
    (dict(), (5, 6)),
], ids=["image-fmap", "channel-first", "single-token"])
def test_vector_quantize_layouts_match(kw, shape):
    ref, ours = _vq_pair(**kw)
    _compare_training(ref, ours, shape, steps=2)
    ref.eval(), ours.eval()
    x = randn(*shape, seed=9)
    with torch.no_grad():
        (qa, ia, la), (qb, ib, lb) = ref(x), ours(x)
    assert torch.equal(ib, ia)
    close(qb, qa)
    assert float(lb) == float(la.detach()) == 0.0
    close(ours.get_output_from_indices(ib), ref.get_output_from_indices(ia))


def test_vector_quantize_state_dict_moves_both_ways():
    torch.manual_seed(0)
    ref = PeerVQ(dim=8, codebook_size=13, codebook_dim=4, kmeans_init=True, threshold_ema_dead_code=1)
    ref.train()
    ref(randn(2, 9, 8, seed=1))  # initialised and trained a step: every buffer holds something
    ours = VectorQuantize(dim=8, codebook_size=13, codebook_dim=4, kmeans_init=True, threshold_ema_dead_code=1)
    ours.load_state_dict(ref.state_dict())
    assert bool(ours._codebook.initted)
    x = randn(3, 5, 8, seed=2)
    ref.eval(), ours.eval()
    with torch.no_grad():
        (qa, ia, _), (qb, ib, _) = ref(x), ours(x)
    assert torch.equal(ia, ib)
    close(qb, qa)
    ours._codebook.embed.add_(0.5)
    back = PeerVQ(dim=8, codebook_size=13, codebook_dim=4, kmeans_init=True, threshold_ema_dead_code=1)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back._codebook.embed, ours._codebook.embed)
    assert torch.equal(ours.codebook, ours._codebook.embed[0])


_NON_DEFAULT = {
    "heads": 2, "separate_codebook_per_head": True, "freeze_codebook": True, "sync_kmeans": False,
    "layernorm_after_project_in": True, "accept_3d_fmap": True, "commitment_use_cross_entropy_loss": True,
    "orthogonal_reg_weight": 0.1, "orthogonal_reg_active_codes_only": True, "orthogonal_reg_max_codes": 8,
    "codebook_diversity_loss_weight": 0.1, "codebook_diversity_temperature": 10.0, "stochastic_sample_codes": True,
    "sample_codebook_temp": 0.5, "straight_through": True, "directional_reparam": True,
    "directional_reparam_variance": 1e-2, "sync_affine_param": True, "vq_bridge": torch.nn.Identity(),
    "manual_ema_update": True, "in_place_codebook_optimizer": torch.optim.SGD,
    "manual_in_place_optimizer_update": True, "affine_param": True, "affine_param_batch_decay": 0.5,
    "affine_param_codebook_decay": 0.5, "sync_update_v": 0.5, "return_zeros_for_masked_padding": False,
    "route_gradients_to_input": False,
}


def test_every_unsupported_option_is_listed():
    assert set(_NON_DEFAULT) == set(_UNSUPPORTED_VQ_OPTIONS)


@pytest.mark.parametrize("name", sorted(_NON_DEFAULT))
def test_unsupported_option_raises(name):
    with pytest.raises(NotImplementedError, match=name):
        VectorQuantize(dim=4, codebook_size=8, **{name: _NON_DEFAULT[name]})
    VectorQuantize(dim=4, codebook_size=8, **{name: _UNSUPPORTED_VQ_OPTIONS[name]})  # its default is harmless


def test_bad_options_raise():
    with pytest.raises(TypeError, match="no_such_option"):
        VectorQuantize(dim=4, codebook_size=8, no_such_option=1)
    with pytest.raises(ValueError, match="ema_update=False"):
        VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True)


# ---------------------------------------------------------------------------------------------
# VectorQuantizer's opt-in options, against vector-quantize-pytorch where it has the same thing

def _taming_front_vs_peer(ours_kw, peer_kw, n_e=17, e_dim=6, beta=0.25, steps=4, learnable=False):
    torch.manual_seed(0)
    ours = VectorQuantizer(n_e, e_dim, beta, **ours_kw)
    ref = PeerVQ(dim=e_dim, codebook_size=n_e, accept_image_fmap=True, **peer_kw)
    sd = {k: v for k, v in ref.state_dict().items()}
    codes = randn(n_e, ours.codebook_dim, seed=1)
    if ours.use_cosine_sim:
        codes = torch.nn.functional.normalize(codes, dim=-1)
    sd["_codebook.embed"] = codes[None].clone()
    sd["_codebook.embed_avg"] = codes[None].clone()
    ref.load_state_dict(sd)
    mine = {"embedding.weight": codes.clone()}
    if ours.project_in is not None:
        mine.update({k: v for k, v in sd.items() if k.startswith("project_")})
    if hasattr(ours, "initted"):
        mine["initted"] = sd["_codebook.initted"]  # not initialised yet: k-means runs on both sides
    ours.load_state_dict(mine)  # EMA buffers filled as at construction, like the peer's
    ref.train(), ours.train()
    g = torch.Generator().manual_seed(5)
    for s in range(steps):
        x = torch.randn(2, e_dim, 3, 5, generator=g)
        w = torch.randn(2, e_dim, 3, 5, generator=g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(50 + s)
        qa, ia, la = ref(xa)
        torch.manual_seed(50 + s)
        qb, lb, (_, _, ib) = ours(xb)
        assert torch.equal(ib, ia.reshape(-1)), f"indices differ at step {s}"
        close(qb, qa)
        ((qa * w).sum() + la).backward()
        ((qb * w).sum() + lb).backward()
        close(xb.grad, xa.grad)
        if learnable:  # our taming loss (beta=1, legacy) has twice the value of the peer's mse, the same gradients
            close(lb, 2 * la)
            close(ours.embedding.weight.grad, ref._codebook.embed.grad[0])
        else:
            close(lb, la)
            close(ours.embedding.weight, ref._codebook.embed[0])
            close(ours.cluster_size, ref._codebook.cluster_size[0])
            close(ours.embed_sum, ref._codebook.embed_avg[0])
    return ours, ref


def test_vector_quantizer_ema_matches_peer():
    ours, _ = _taming_front_vs_peer(dict(decay=0.8), dict(decay=0.8, commitment_weight=0.25, rotation_trick=False))
    assert not ours.embedding.weight.requires_grad
    assert set(ours.state_dict()) == {"embedding.weight", "cluster_size", "embed_sum"}


def test_vector_quantizer_kmeans_dead_code_cosine_match_peer():
    _taming_front_vs_peer(
        dict(decay=0.7, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.5, use_cosine_sim=True),
        dict(decay=0.7, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.5, use_cosine_sim=True,
             commitment_weight=0.25, rotation_trick=False))


def test_vector_quantizer_codebook_dim_matches_peer():
    _taming_front_vs_peer(dict(decay=0.9, codebook_dim=3),
                          dict(decay=0.9, codebook_dim=3, commitment_weight=0.25, rotation_trick=False))


def test_vector_quantizer_rotation_trick_matches_peer():
    _taming_front_vs_peer(dict(rotation_trick=True), dict(learnable_codebook=True, ema_update=False, rotation_trick=True),
                          beta=1.0, learnable=True)


def test_vector_quantizer_and_vector_quantize_share_one_core():
    a = VectorQuantizer(8, 4, 0.25, decay=0.9)
    b = VectorQuantize(dim=4, codebook_size=8)
    assert type(a._core) is type(b._core)


# ---------------------------------------------------------------------------------------------
# Mixed precision: distances, loss and EMA statistics in float32 under autocast / low-precision input

def _separated(K=16, D=8, N=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = 4.0 * torch.randn(K, D, generator=g)
    idx = torch.randint(0, K, (N,), generator=g)
    z = codes[idx] + 0.05 * torch.randn(N, D, generator=g)
    return codes, idx, z


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vector_quantizer_autocast_runs_in_fp32(dtype):
    codes, idx, z = _separated()
    zimg = z.reshape(3, 10, 10, 8).permute(0, 3, 1, 2)
    for kw in (dict(), dict(decay=0.9, threshold_ema_dead_code=0.5)):
        m = VectorQuantizer(16, 8, 0.25, **kw)
        m.load_state_dict({"embedding.weight": codes}, strict=False)
        m.train()
        ref = VectorQuantizer(16, 8, 0.25)
        ref.load_state_dict({"embedding.weight": codes})
        _, loss32, (_, _, i32) = ref(zimg)
        with torch.autocast("cpu", dtype=dtype):
            zq, loss, (_, _, ind) = m(zimg)
        assert torch.equal(ind, i32) and torch.equal(ind, idx)
        assert loss.dtype == torch.float32
        if not kw:
            close(loss, loss32)
        for name in ("cluster_size", "embed_sum"):
            if hasattr(m, name):
                buf = getattr(m, name)
                assert buf.dtype == torch.float32 and torch.isfinite(buf).all()
        assert m.embedding.weight.dtype == torch.float32 and torch.isfinite(m.embedding.weight).all()
        # a low-precision input tensor too: the output comes back in its dtype, the loss in float32
        zq, loss, (_, _, ind) = m(zimg.to(dtype))
        assert zq.dtype == dtype and loss.dtype == torch.float32 and torch.equal(ind, idx)


def test_vector_quantize_autocast_ema_stays_fp32():
    codes, idx, z = _separated()
    m = VectorQuantize(dim=8, codebook_size=16, codebook_dim=8, decay=0.9, threshold_ema_dead_code=0.5)
    m._codebook.embed.data.copy_(codes[None])
    m._codebook.embed_avg.data.copy_(codes[None])
    m.train()
    x = z.reshape(3, 100, 8)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, ind, loss = m(x.clone().requires_grad_())
        assert torch.equal(ind.reshape(-1), idx)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        for buf in (m._codebook.embed, m._codebook.embed_avg, m._codebook.cluster_size):
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all()
    # the EMA codebook stays near the true codes (a bf16 statistic would drift by ~1e-2 relative)
    close(m.codebook, codes, atol=0.1, rtol=0.05)


def test_backend_option_reaches_the_ops():
    m = VectorQuantizer(8, 4, 0.25, backend="torch")
    z = randn(2, 4, 3, 3)
    ref = VectorQuantizer(8, 4, 0.25)
    ref.load_state_dict(m.state_dict())
    close(m(z)[1], ref(z)[1])
    with pytest.raises(vqkernels.BackendNotSupported):
        VectorQuantizer(8, 4, 0.25, backend="cuda")(z)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["vq-ema-dead-code", "taming-learnable"])
def test_modules_compile(which):
    """torch.compile gives the eager results, also where the EMA / restarts rewrite the codebook in place
    after the loss saved it for the backward (the copy for the backward is made outside the graph)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if which == "vq-ema-dead-code":
        eager = VectorQuantize(dim=8, codebook_size=32, threshold_ema_dead_code=1)
    else:
        eager = VectorQuantizer(32, 8, 0.25)
    compiled_module = VectorQuantize(dim=8, codebook_size=32, threshold_ema_dead_code=1) \
        if which == "vq-ema-dead-code" else VectorQuantizer(32, 8, 0.25)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module)
    for s in range(3):
        x = randn(2, 8, 4, 4, seed=s)
        if which == "vq-ema-dead-code":
            x = x.flatten(2).transpose(1, 2)
        outs = []
        for m in (eager, compiled):
            xr = x.clone().requires_grad_()
            torch.manual_seed(s)
            o = m(xr)
            loss = o[2] if which == "vq-ema-dead-code" else o[1]
            (o[0].sum() + loss).backward()
            outs.append((o[0], loss, xr.grad))
        for a, b in zip(*outs):
            close(b, a)
    for k, v in eager.state_dict().items():
        close(compiled_module.state_dict()[k], v)
