"""The VQGAN, its discriminator and its loss against the real taming-transformers (installed from PyPI).

taming 0.0.6 needs stand-ins to import on today's libraries (tests only, see RECIPES.md):
``pytorch_lightning.utilities.distributed`` (rank_zero_only) and ``requests`` (imported by its LPIPS module's
downloader, never called here). Its LPIPS would download VGG16 weights: the tests give it torchvision's
randomly initialised vgg16 instead and copy the same weights into ours.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import types

import pytest
import torch
import torch.nn as nn

yaml = pytest.importorskip("yaml")
pytest.importorskip("safetensors")

from vqkernels.models import NLayerDiscriminator, VQGANConfig, VQGANLoss, VQModel  # noqa: E402
from vqkernels.models._checkpoint import CheckpointError  # noqa: E402
from vqkernels.testing import assert_port_close, check_nearest  # noqa: E402

SMALL_DD = dict(double_z=False, z_channels=64, resolution=64, in_channels=3, out_ch=3, ch=64, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
# taming's configs/imagenet_vqgan... f16 with 1024 codes (vqgan_imagenet_f16_1024)
F16_DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
LOSSCONFIG = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
              "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 250001,
                         "disc_weight": 0.8, "codebook_weight": 1.0}}


# ---------------------------------------------------------------------------------------------
# taming, with its stand-ins

@pytest.fixture(scope="module")
def taming():
    added = []
    try:
        import pytorch_lightning.utilities as plu
    except ImportError:
        pytest.skip("pytorch_lightning (taming's dependency) is not installed")
    if "pytorch_lightning.utilities.distributed" not in sys.modules:
        m = types.ModuleType("pytorch_lightning.utilities.distributed")
        m.rank_zero_only = plu.rank_zero_only
        sys.modules[m.__name__] = m
        added.append(m.__name__)
    try:
        importlib.import_module("requests")
    except ImportError:
        sys.modules["requests"] = types.ModuleType("requests")  # only its downloader uses it
        added.append("requests")
    try:
        vqgan = importlib.import_module("taming.models.vqgan")
        tlpips = importlib.import_module("taming.modules.losses.lpips")
        vqp = importlib.import_module("taming.modules.losses.vqperceptual")
        disc = importlib.import_module("taming.modules.discriminator.model")
    except ImportError as e:
        for name in added:
            sys.modules.pop(name, None)
        pytest.skip(f"taming-transformers does not import: {e}")
    # taming's LPIPS asks torchvision for pretrained VGG16 (a download, and a keyword today's torchvision dropped)
    # and then loads its heads from a download: random weights instead, copied into ours by the tests
    # (only .features is used: built alone, without the 120M-parameter classifier torchvision would initialise)
    from vqkernels.models.lpips import _vgg_features

    fake_models = types.SimpleNamespace(vgg16=lambda pretrained=True: types.SimpleNamespace(features=_vgg_features()))
    saved = (tlpips.models, tlpips.LPIPS.load_from_pretrained)
    tlpips.models = fake_models
    tlpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    yield types.SimpleNamespace(VQModel=vqgan.VQModel, LPIPS=tlpips.LPIPS, Loss=vqp.VQLPIPSWithDiscriminator,
                                NLayerDiscriminator=disc.NLayerDiscriminator, weights_init=disc.weights_init)
    tlpips.models, tlpips.LPIPS.load_from_pretrained = saved
    for name in added:
        sys.modules.pop(name, None)


def _taming_vqmodel(taming, dd, n_embed, embed_dim, seed=0):
    torch.manual_seed(seed)
    return taming.VQModel(dd, {"target": "torch.nn.Identity"}, n_embed, embed_dim).eval()


def _write_lightning_checkpoint(tmp_path, ref, dd, n_embed, embed_dim, extra=None):
    """A Lightning-style last.ckpt (state_dict with loss.* entries, counters) and taming's project YAML."""
    sd = dict(ref.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # a real checkpoint carries its loss
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": sd}
    ckpt.update(extra or {})
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    cfg = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd, "lossconfig": LOSSCONFIG}}}
    ypath = tmp_path / "project.yaml"
    ypath.write_text(yaml.safe_dump(cfg))
    return path, ypath


# ---------------------------------------------------------------------------------------------
# The port rule (vqkernels.testing.assert_port_close): taming's model run in float64 is the truth; ours'
# float32 error must be at most 2x taming's own float32 error (+ a few roundoffs of the output). Both are
# 20-layer float32 stacks whose sums follow the CPU's oneDNN/MKL kernels (Intel and AMD differ), so an
# absolute bound would check the machine, not the port. Stage by stage, because the codes are an argmin:
# a near-tie may go either way in float32 and then the whole-model outputs differ by a code, legitimately.

def assert_vqmodel_port(ours, ref, x):
    """Ours against taming's VQModel on ``x``: encoder, codes (tie-aware), decoder, and the whole model
    where taming's float64 run picks our codes."""
    ref64 = copy.deepcopy(ref).double()
    x64 = x.double()
    with torch.no_grad():
        h = ours.quant_conv(ours.encoder(x))
        assert_port_close(h, ref.quant_conv(ref.encoder(x)), ref64.quant_conv(ref64.encoder(x64)), what="encoder")
        q, diff, (_, _, idx) = ours.encode(x)
        # our codes are a nearest code of our encoding, to the float32 rounding of the distances
        check_nearest(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), ours.quantize.embedding.weight,
                      idx.reshape(-1))
        assert_port_close(ours.decode(q), ref.decode(q), ref64.decode(q.double()), what="decoder")
        q64, diff64, (_, _, idx64) = ref64.encode(x64)
        if torch.equal(idx.reshape(-1), idx64.reshape(-1)):
            rec, d = ours(x)
            rec_ref, d_ref = ref(x)
            rec64, d64 = ref64(x64)
            assert_port_close(rec, rec_ref, rec64, what="reconstruction")
            assert_port_close(d, d_ref, d64, what="codebook loss", floor_eps=16.0)


# ---------------------------------------------------------------------------------------------
# VQModel against taming's

def test_from_taming_matches_taming_small(taming, tmp_path):
    ref = _taming_vqmodel(taming, SMALL_DD, 512, 64)
    ckpt, ycfg = _write_lightning_checkpoint(tmp_path, ref, SMALL_DD, 512, 64)
    ours = VQModel.from_taming(ckpt, ycfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert not ours.training

    torch.manual_seed(1)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        q, l, (perp, none, i) = ours.encode(x)
        assert none is None and perp.dim() == 0
        # the codes taming picks for our encoding are ours (the same search, with ties to the lowest index)
        h = ours.quant_conv(ours.encoder(x))
        q_ref, l_ref, (_, _, i_ref) = ref.quantize(h)
        agree = (i == i_ref).float().mean().item()
        assert agree >= 0.99, f"only {agree:.1%} of the codes agree with taming's quantizer on the same input"
    assert_vqmodel_port(ours, ref, x)

    # and the reverse: our state_dict loads into taming's model, strictly, and computes what taming computed
    back = _taming_vqmodel(taming, SMALL_DD, 512, 64, seed=5)
    back.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(back.encode(x)[2][2], ref.encode(x)[2][2])


def test_from_taming_published_f16_config(taming):
    """taming's f16/1024 ImageNet config: same keys and shapes, and one small forward agrees."""
    ref = _taming_vqmodel(taming, F16_DD, 1024, 256)
    cfg = {"model": {"target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": 256, "n_embed": 1024, "ddconfig": F16_DD, "lossconfig": LOSSCONFIG}}}
    ours = VQModel.from_taming({"state_dict": ref.state_dict()}, cfg)
    assert VQGANConfig.from_taming(cfg) == VQGANConfig.f16_1024()
    rs, os_ = ref.state_dict(), ours.state_dict()
    assert list(rs) == list(os_)
    assert all(rs[k].shape == os_[k].shape for k in rs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    torch.manual_seed(2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1  # 2x2 latents: small, and every block runs
    assert_vqmodel_port(ours, ref, x)


@pytest.mark.parametrize("breakage", ["groupnorm-eps", "no-residual", "no-attention-residual"])
def test_port_rule_catches_a_different_port(taming, breakage):
    """The guard on the rule above: a port that computes other math fails it, on the same inputs."""
    ref = _taming_vqmodel(taming, SMALL_DD, 512, 64)
    ours = VQModel.from_taming({"state_dict": ref.state_dict()}, {"embed_dim": 64, "n_embed": 512, "ddconfig": SMALL_DD})
    torch.manual_seed(1)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert_vqmodel_port(ours, ref, x)  # the faithful port passes
    if breakage == "groupnorm-eps":  # taming's 1e-6 swapped for torch's default 1e-5
        for m in ours.modules():
            if isinstance(m, nn.GroupNorm):
                m.eps = 1e-5
    else:  # drop the skip connection of one block: output - input
        block = ours.decoder.mid.block_1 if breakage == "no-residual" else ours.decoder.mid.attn_1
        block.register_forward_hook(lambda mod, inp, out: out - inp[0])
    with pytest.raises(AssertionError, match="float64 truth"):
        assert_vqmodel_port(ours, ref, x)


def test_checkpoint_with_objects_needs_trust(taming, tmp_path):
    ref = _taming_vqmodel(taming, SMALL_DD, 512, 64)
    ckpt, ycfg = _write_lightning_checkpoint(tmp_path, ref, SMALL_DD, 512, 64,
                                             extra={"hyper_parameters": argparse.Namespace(lr=4.5e-6)})
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        VQModel.from_taming(ckpt, ycfg)
    ours = VQModel.from_taming(ckpt, ycfg, trust_checkpoint=True)
    torch.testing.assert_close(ours.quantize.embedding.weight, ref.quantize.embedding.weight, rtol=0, atol=0)


def test_checkpoint_mismatch_lists_keys_and_shapes(taming):
    other = dict(SMALL_DD, ch_mult=[1, 2])  # one level fewer: missing keys
    ref = _taming_vqmodel(taming, other, 512, 64)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: encoder\.down\.1\.downsample"):
        VQModel.from_taming({"state_dict": ref.state_dict()}, {"embed_dim": 64, "n_embed": 512, "ddconfig": SMALL_DD})
    ref = _taming_vqmodel(taming, SMALL_DD, 256, 64)  # fewer codes: a shape mismatch
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight: \(256, 64\) in the checkpoint, "
                                              r"\(512, 64\) in the model"):
        VQModel.from_taming({"state_dict": ref.state_dict()}, {"embed_dim": 64, "n_embed": 512, "ddconfig": SMALL_DD})


def test_config_errors():
    with pytest.raises(ValueError, match=r"\['attn_res'\] are not taming's"):
        VQGANConfig.from_taming({"embed_dim": 64, "n_embed": 512, "ddconfig": dict(SMALL_DD, attn_res=[16])})
    with pytest.raises(ValueError, match="unknown key"):
        VQGANConfig.from_dict(dict(SMALL_DD, n_embed=512, embed_dim=64, heads=4))
    with pytest.raises(NotImplementedError, match="GumbelQuantize|GumbelVQ"):
        VQGANConfig.from_taming({"model": {"target": "taming.models.vqgan.GumbelVQ",
                                           "params": {"embed_dim": 64, "n_embed": 512, "ddconfig": SMALL_DD}}})
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig(double_z=True)


def test_norm_groups():
    # every GroupNorm of encoder, decoder and mid blocks takes norm_groups; the parameters (and so the state_dict
    # keys and shapes) are those of the default 32 groups, and the forward differs from it
    small = dict(SMALL_DD, ch=32, ch_mult=[1, 2], attn_resolutions=[32], n_embed=64, embed_dim=8, resolution=32)
    torch.manual_seed(0)
    a = VQModel(VQGANConfig.from_dict(small)).eval()
    b = VQModel(VQGANConfig.from_dict(dict(small, norm_groups=8))).eval()
    norms = [m for m in b.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, nn.GroupNorm) for m in a.modules()) > 8
    assert {m.num_groups for m in norms} == {8}
    assert {m.num_groups for m in a.modules() if isinstance(m, nn.GroupNorm)} == {32}
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(a(x)[0], b(x)[0])
    assert VQGANConfig.from_dict(dict(small, norm_groups=8)).to_dict()["norm_groups"] == 8
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="norm_groups must be"):
            VQGANConfig.from_dict(dict(small, norm_groups=bad))
    with pytest.raises(ValueError, match=r"multiple of norm_groups \(24"):
        VQGANConfig.from_dict(dict(small, norm_groups=24))


def test_bad_images():
    model = VQModel(VQGANConfig.from_taming({"embed_dim": 64, "n_embed": 512, "ddconfig": SMALL_DD})).eval()
    with pytest.raises(ValueError, match="expected 3 channels"):
        model.encode(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="downsampling factor 4"):
        model(torch.randn(1, 3, 64, 30))
    with pytest.raises(ValueError, match=r"\(B, 64, h, w\)"):
        model.decode(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 512\)"):
        model.decode_code(torch.full((1, 4, 4), 512))


# ---------------------------------------------------------------------------------------------
# VQModel on its own

def _tiny_config(**kw):
    return VQGANConfig(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                                 z_channels=16, n_embed=37, embed_dim=16), **kw})


def test_tokenize_decode_code_roundtrip():
    torch.manual_seed(3)
    model = VQModel(VQGANConfig.from_taming({"embed_dim": 64, "n_embed": 512, "ddconfig": SMALL_DD})).eval()
    x = torch.rand(2, 3, 32, 48) * 2 - 1  # not square, not the config's resolution
    with torch.no_grad():
        idx = model.tokenize(x)
        assert idx.shape == (2, 8, 12) and idx.dtype == torch.int64
        torch.testing.assert_close(model.decode_code(idx), model.decode(model.encode(x)[0]), rtol=0, atol=1e-6)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    torch.manual_seed(4)
    model = VQModel(_tiny_config()).eval()
    model.save_pretrained(tmp_path / "m")
    files = sorted(os.listdir(tmp_path / "m"))
    assert "config.json" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    for f in files:  # the mode a plain open() gives (mkstemp's 0600 would keep others who may read out)
        assert os.stat(tmp_path / "m" / f).st_mode & 0o777 == 0o666 & ~umask, f
    back = VQModel.from_pretrained(tmp_path / "m")
    assert back.config == model.config and not back.training
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])
    # a folder whose weights do not fit its config says what is wrong
    other = VQModel(_tiny_config(n_embed=12))
    other.save_pretrained(tmp_path / "o")
    (tmp_path / "o" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="quantize.embedding.weight"):
        VQModel.from_pretrained(tmp_path / "o")


def test_torch_compile_forward():
    torch.manual_seed(5)
    model = VQModel(_tiny_config()).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref, ref_loss = model(x)
        # fullgraph: no graph breaks anywhere (the ops are torch.library ops with fake kernels). aot_eager traces
        # through dynamo and AOTAutograd as inductor does, without minutes of C++ compilation on a CPU runner
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out, loss = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)


def test_training_step_gradients_reach_every_parameter():
    torch.manual_seed(6)
    model = VQModel(_tiny_config()).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, qloss = model(x)
    ((rec - x).abs().mean() + qloss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# the discriminator and the loss against taming's

@pytest.mark.parametrize("use_actnorm", [False, True])
def test_discriminator_matches_taming(taming, use_actnorm):
    torch.manual_seed(7)
    ref = taming.NLayerDiscriminator(input_nc=3, ndf=16, n_layers=3, use_actnorm=use_actnorm).apply(taming.weights_init)
    ours = NLayerDiscriminator(input_nc=3, ndf=16, n_layers=3, use_actnorm=use_actnorm)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 48, 48)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    ya.square().mean().backward()
    yb.square().mean().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-8)
    for (n, pa), pb in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=n)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict())  # ActNorm init / BN running stats


_LOSS_CACHE = {}


def _loss_pair(taming, **kw):
    """taming's loss and ours with the same weights (built once per argument set: VGG16 is large)."""
    key = tuple(sorted(kw.items()))
    if key not in _LOSS_CACHE:
        torch.manual_seed(8)
        ref = taming.Loss(**kw)
        ours = VQGANLoss(**kw, lpips_weights="random")
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        _LOSS_CACHE[key] = (ref, ours)
    ref, ours = _LOSS_CACHE[key]
    ref.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    # the discriminators' BatchNorm running statistics move with every call: start both from the same state
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


class _Gen(nn.Module):
    """A stand-in generator: features -> last conv -> images, plus a codebook-like loss on the features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.feat = nn.Parameter(torch.randn(2, 8, 32, 32) * 0.5)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self):
        return self.conv_out(self.feat), 0.1 * self.feat.square().mean()


@pytest.mark.parametrize("disc_loss, global_step, train", [
    ("hinge", 0, True),  # disc_start 5: the discriminator off
    ("hinge", 10, True),  # ... and on
    ("vanilla", 10, True),
    ("vanilla", 0, False),  # eval mode: LPIPS' dropout off
])
def test_loss_matches_taming(taming, disc_loss, global_step, train):
    ref, ours = _loss_pair(taming, disc_start=5, disc_weight=0.8, codebook_weight=1.3, disc_loss=disc_loss)
    ref.train(train), ours.train(train)
    torch.manual_seed(10)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ga, gb = _Gen(), _Gen()

    results = []
    for loss_mod, gen in ((ref, ga), (ours, gb)):
        torch.manual_seed(11)  # the same dropout masks in LPIPS (training mode)
        xrec, qloss = gen()
        loss, log = loss_mod(qloss, x, xrec, 0, global_step, last_layer=gen.conv_out.weight)
        loss.backward()
        d_loss, d_log = loss_mod(qloss, x, xrec, 1, global_step, last_layer=gen.conv_out.weight)
        loss_mod.discriminator.zero_grad()
        d_loss.backward()
        results.append((loss, log, d_loss, d_log))
    (la, loga, da, dloga), (lb, logb, db, dlogb) = results
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert list(logb) == list(loga) and list(dlogb) == list(dloga)
    for k in loga:
        torch.testing.assert_close(logb[k].float(), loga[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    assert loga["train/disc_factor"].item() == (1.0 if global_step >= 5 else 0.0)
    assert logb["train/d_weight"].item() > 0
    for (n, pa), pb in zip(ga.named_parameters(), gb.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=n)
    torch.testing.assert_close(db, da, rtol=1e-5, atol=1e-6)
    for k in dloga:
        torch.testing.assert_close(dlogb[k], dloga[k], rtol=1e-5, atol=1e-6, msg=k)
    for (n, pa), pb in zip(ref.discriminator.named_parameters(), ours.discriminator.parameters()):
        if global_step < 5:
            assert not pa.grad.abs().sum() and not pb.grad.abs().sum()
        else:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_adaptive_weight_matches_taming(taming):
    ref, ours = _loss_pair(taming, disc_start=0, disc_weight=0.5)
    ref.eval(), ours.eval()
    gen = _Gen()
    xrec, _ = gen()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    nll = ((x - xrec).abs() + ref.perceptual_loss(x, xrec)).mean()
    g = -ref.discriminator(xrec).mean()
    w_ref = ref.calculate_adaptive_weight(nll, g, last_layer=gen.conv_out.weight)
    w = ours.calculate_adaptive_weight(nll, g, last_layer=gen.conv_out.weight)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)
    # and the forward's cheaper route gives the same number
    _, log = ours(torch.zeros(()), x, xrec, 0, 0, last_layer=gen.conv_out.weight)
    torch.testing.assert_close(log["train/d_weight"], w_ref, rtol=1e-5, atol=0)


def test_loss_without_gradients_and_bad_arguments(taming):
    ref, ours = _loss_pair(taming, disc_start=0)
    ref.eval(), ours.eval()
    gen = _Gen()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        xrec, q = gen()
        la, loga = ref(q, x, xrec, 0, 3, last_layer=gen.conv_out.weight, split="val")
        lb, logb = ours(q, x, xrec, 0, 3, last_layer=gen.conv_out.weight, split="val")
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert logb["val/d_weight"].item() == 0.0 and list(logb) == list(loga)
    with pytest.raises(ValueError, match="disc_loss"):
        VQGANLoss(0, disc_loss="wgan", lpips_weights="random")
    with pytest.raises(ValueError, match="last_layer"):
        ours(q, x, gen()[0], 0, 0)
    with pytest.raises(ValueError, match="optimizer_idx"):
        ours(q, x, xrec, 2, 0)


def test_loss_state_dict_loads_taming_loss_entries(taming):
    """A taming last.ckpt's loss.* entries (LPIPS + discriminator) load into VQGANLoss unchanged."""
    ref, _ = _loss_pair(taming, disc_start=0)
    sd = {"loss." + k: v for k, v in ref.state_dict().items()}
    ours = VQGANLoss(disc_start=0, lpips_weights="random")
    from vqkernels.models._checkpoint import select_prefix

    ours.load_state_dict(select_prefix(sd, "loss."), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


def test_training_gradients_match_taming(taming):
    """Forward + backward in training mode (L1 + codebook loss): every parameter's gradient is taming's."""
    dd = dict(double_z=False, z_channels=16, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    ref = _taming_vqmodel(taming, dd, 37, 16).train()
    ours = VQModel.from_taming({"state_dict": ref.state_dict()}, {"embed_dim": 16, "n_embed": 37, "ddconfig": dd}).train()
    torch.manual_seed(12)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    for m in (ref, ours):
        rec, qloss = m(x)
        ((rec - x).abs().mean() + qloss).backward()
    for (n, pa), pb in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("shape", [(1, 32, 1, 1), (2, 32, 5, 7), (1, 64, 8, 3)])
def test_upsample_matches_nearest_then_conv(shape):
    """The phase-split upsampling conv computes nearest-2x + conv3x3, values and gradients."""
    from vqkernels.models.vqgan import Upsample

    torch.manual_seed(13)
    m = Upsample(shape[1], with_conv=True)
    x = torch.randn(shape, requires_grad=True)
    ref = m.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = m(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [x, m.conv.weight, m.conv.bias], g),
                    torch.autograd.grad(ref, [x, m.conv.weight, m.conv.bias], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name, dd, n_embed, embed_dim", [
    ("f16-16384", F16_DD, 16384, 256),
    # latent-diffusion's vq-f8 (its first stage; the same architecture, target ldm.models.autoencoder.VQModel)
    ("f8-16384", dict(double_z=False, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0), 16384, 4),
])
def test_published_configs_keys_and_shapes(taming, name, dd, n_embed, embed_dim):
    with torch.device("meta"):  # shapes only: no memory, no init time
        ref = taming.VQModel(dd, {"target": "torch.nn.Identity"}, n_embed, embed_dim)
        target = "ldm.models.autoencoder.VQModel" if name.startswith("f8") else "taming.models.vqgan.VQModel"
        cfg = VQGANConfig.from_taming({"model": {"target": target, "params": {
            "embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd, "lossconfig": LOSSCONFIG}}})
        ours = VQModel(cfg)
    rs, os_ = ref.state_dict(), ours.state_dict()
    assert list(rs) == list(os_)
    assert [tuple(v.shape) for v in rs.values()] == [tuple(v.shape) for v in os_.values()]
