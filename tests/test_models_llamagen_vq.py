"""LlamaGen's image tokenizer (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py) in our VQModel.

LlamaGen is not a package, so these tests cannot import it: tests/fixtures/llamagen_vq.safetensors records what
its code does (key lists of its named tokenizers, and on fixed seeds its code indices, reconstructions, loss
terms and gradients in float32 and float64), made by scripts/llamagen_fixtures_vq.py from a LlamaGen checkout.
The weights are not in the fixture: that script's ``seeded_weights`` draws them again here, bit for bit (the
fixture's per-tensor sums check it). Float32 outputs follow the house rule: ours' error against LlamaGen's
float64 run at most a small multiple of LlamaGen's own float32 error, plus a small floor.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("safetensors")

from vqkernels._config import ConfigError  # noqa: E402
from vqkernels.models import VQGANConfig, VQModel  # noqa: E402
from vqkernels.models._checkpoint import CheckpointError  # noqa: E402
from vqkernels.models.vqgan import LLAMAGEN_USAGE_WINDOW, codebook_entropy_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "llamagen_vq.safetensors"
SCRIPT = ROOT / "scripts" / "llamagen_fixtures_vq.py"
# near-ties: codes whose float64 distances lie closer than this may come out in either order in float32
TIE_TOL = 1e-4
# the rule's multiple of LlamaGen's own float32 error, and its floor relative to the output's magnitude
MULT, REL_FLOOR = 4.0, 1e-6


def _load_script():
    spec = importlib.util.spec_from_file_location("llamagen_fixtures_vq", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fx():
    from safetensors import safe_open

    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    return SimpleNamespace(t=t, meta=meta, cases=json.loads(meta["cases"]), script=_load_script())


def _config(fx, case) -> VQGANConfig:
    args = fx.cases[case]["args"]
    return VQGANConfig.from_llamagen(case if args is None else args)


def _shapes(fx, case) -> dict:
    return {k: tuple(v) for k, v in json.loads(fx.meta[f"keys.{case}"])}


def _weights(fx, case) -> dict:
    """The case's weights as LlamaGen's state_dict (float32), drawn again with the script's seeded_weights."""
    cfg = _config(fx, case)
    w = fx.script.seeded_weights(_shapes(fx, case), fx.script.case_seed(case), cfg.n_embed)
    sums = torch.stack([w[k].sum() for k in sorted(w)])
    torch.testing.assert_close(sums, fx.t[f"{case}.weight_sums"], rtol=1e-12, atol=1e-9,
                               msg="seeded_weights no longer draws the fixture's weights: rerun the script")
    return {k: v.float() for k, v in w.items()}


def _check_rule(ours, peer32, peer64, what):
    """ours (float32) against LlamaGen's float64 run: within MULT x LlamaGen's float32 error + a floor."""
    peer64 = peer64.double()
    err_ours = float((ours.detach().double() - peer64).abs().max())
    err_peer = float((peer32.double() - peer64).abs().max())
    floor = REL_FLOOR * float(peer64.abs().max())
    assert err_ours <= MULT * err_peer + floor, (
        f"{what}: our float32 error {err_ours:.3g} vs LlamaGen's float64 > {MULT} x LlamaGen's own float32 error "
        f"{err_peer:.3g} + {floor:.3g}")


def _assert_same_codes(ours, ref, gap, what):
    """Exactly LlamaGen's indices, except where its best two codes are a near-tie (either may win)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)}, LlamaGen's {tuple(ref.shape)}"
    wrong = (ours != ref) & (gap >= TIE_TOL)
    assert not wrong.any(), f"{what}: {int(wrong.sum())} of {ref.numel()} indices differ from LlamaGen's away from ties"


EVAL_CASES = ["l2", "plain", "dropout", "VQ-8", "VQ-16"]
# the named tokenizers' full runs draw ~70M weights each
EVAL_PARAMS = ["l2", "plain", "dropout"] + [pytest.param(c, marks=pytest.mark.slow) for c in ("VQ-8", "VQ-16")]


# ---------------------------------------------------------------------------------------------
# keys

@pytest.mark.parametrize("case", EVAL_CASES)
def test_state_dict_keys_are_llamagens(fx, case):
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VQModel(_config(fx, case)).state_dict().items()}
    theirs = _shapes(fx, case)
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    assert ours == theirs
    assert list(ours) == list(theirs)  # in LlamaGen's order, too


# ---------------------------------------------------------------------------------------------
# eval: indices and reconstructions

@pytest.mark.parametrize("case", EVAL_PARAMS)
def test_tokenize_and_decode_match_llamagen(fx, case, tmp_path):
    t = fx.t
    sd = _weights(fx, case)
    if case == "l2":  # through a file, as LlamaGen's vq_train.py writes it (the weights under "model")
        path = tmp_path / "0001000.pt"
        torch.save({"model": sd, "optimizer": {}, "steps": 1000}, path)
        model = VQModel.from_llamagen(path, fx.cases[case]["args"])
    else:
        model = VQModel.from_llamagen({"model": sd}, _config(fx, case))
    assert not model.training
    x = t[f"{case}.x"]
    with torch.no_grad():
        idx = model.tokenize(x)
        _assert_same_codes(idx, t[f"{case}.idx64"], t[f"{case}.gap64"], f"{case} tokenize vs float64")
        _assert_same_codes(idx, t[f"{case}.idx32"], t[f"{case}.gap64"], f"{case} tokenize vs float32")
        rec = model.decode_code(t[f"{case}.idx32"])
        _check_rule(rec, t[f"{case}.rec32"], t[f"{case}.rec64"], f"{case} decode_code")
        if torch.equal(idx, t[f"{case}.idx64"]):  # (a near-tie decided otherwise changes the whole output)
            out, _ = model(x)
            _check_rule(out, t[f"{case}.fwd32"], t[f"{case}.fwd64"], f"{case} forward")


# ---------------------------------------------------------------------------------------------
# training: the loss terms, their gradients and the codebook_used window

@pytest.mark.parametrize("case", ["l2", "plain"])
def test_training_loss_matches_llamagen(fx, case):
    t, cfg = fx.t, _config(fx, case)
    assert cfg.entropy_loss_ratio > 0
    sd = _weights(fx, case)
    model = VQModel.from_llamagen(sd, cfg).train()
    x = t[f"{case}.x"]
    quant, loss, (_, _, idx) = model.encode(x)
    # LlamaGen's training adds vq_loss + commit_loss + entropy_loss: ours is that sum
    _check_rule(loss, t[f"{case}.train_loss32"].sum(), t[f"{case}.train_loss64"].sum(), f"{case} loss")
    loss.backward()
    _check_rule(model.quantize.embedding.weight.grad, t[f"{case}.grad_codebook32"], t[f"{case}.grad_codebook64"],
                f"{case} codebook gradient")
    _check_rule(model.quant_conv.weight.grad, t[f"{case}.grad_quant_conv32"], t[f"{case}.grad_quant_conv64"],
                f"{case} quant_conv gradient")
    if cfg.codebook_show_usage:
        tail = t[f"{case}.codebook_used_tail64"]
        n = tail.numel()
        assert n == idx.numel()
        before = sd["quantize.codebook_used"]
        if torch.equal(idx.reshape(-1), t[f"{case}.idx64"].reshape(-1)):
            expected = torch.cat([before[n:], tail.float()])
            assert torch.equal(model.quantize.codebook_used, expected)
            assert model.codebook_usage() == float(t[f"{case}.usage64"])


def test_codebook_used_window_rolls_as_llamagens():
    """LlamaGen: codebook_used[:-n] = codebook_used[n:]; codebook_used[-n:] = indices (a batch of n codes), here
    against a plain Python list, with a batch larger than the window too."""
    cfg = VQGANConfig.from_llamagen({"encoder_ch_mult": [1], "decoder_ch_mult": [1], "codebook_size": 1000,
                                     "z_channels": 32})
    model = VQModel(cfg)
    window = [0.0] * LLAMAGEN_USAGE_WINDOW
    g = torch.Generator().manual_seed(3)
    for n in (7, 1000, 70001, 5):
        idx = torch.randint(0, 1000, (n,), generator=g)
        model._record_usage(idx)
        window = (window + idx.tolist())[-LLAMAGEN_USAGE_WINDOW:]
        assert model.quantize.codebook_used.tolist() == window
    assert model.codebook_usage() == len(set(window)) / 1000


# ---------------------------------------------------------------------------------------------
# float64 references of the same math

def _entropy_reference(z, codebook, cosine, temperature=0.01):
    """LlamaGen's compute_entropy_loss(-d), written out."""
    if cosine:
        z, codebook = F.normalize(z, p=2, dim=-1), F.normalize(codebook, p=2, dim=-1)
    d = torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(codebook ** 2, dim=1) - 2 * z @ codebook.T
    a = -d / temperature
    probs = F.softmax(a, dim=-1)
    log_probs = F.log_softmax(a + 1e-5, dim=-1)
    avg_probs = probs.mean(0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("N,K,D", [(37, 53, 5), (1, 7, 8), (123, 300, 3)])
def test_entropy_loss_against_float64(cosine, N, K, D):
    g = torch.Generator().manual_seed(N * K + D)
    scale = 1.0 if cosine else 0.3  # raw distances / 0.01: keep the softmax away from a one-hot
    z = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    cb = torch.randn(K, D, generator=g, dtype=torch.float64) * scale
    ref64 = _entropy_reference(z, cb, cosine)
    ref32 = _entropy_reference(z.float(), cb.float(), cosine)
    ours32 = codebook_entropy_loss(z.float(), cb.float(), cosine=cosine)
    _check_rule(ours32, ref32, ref64, "entropy loss")
    # the same function in float64, gradients included
    z.requires_grad_(True)
    cb.requires_grad_(True)
    ours64 = codebook_entropy_loss(z, cb, cosine=cosine)
    g_ours = torch.autograd.grad(ours64, (z, cb))
    g_ref = torch.autograd.grad(_entropy_reference(z, cb, cosine), (z, cb))
    torch.testing.assert_close(ours64, ref64.detach(), rtol=1e-10, atol=1e-10)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("B,h,w,K,D", [(2, 5, 3, 61, 8), (1, 1, 1, 7, 3), (3, 4, 7, 300, 5)])
def test_code_search_against_float64(l2, B, h, w, K, D):
    """The quantizer of a from_llamagen config on random inputs: indices as LlamaGen's formula in float64 (argmin of
    |z|^2 + |e|^2 - 2 z.e, on unit vectors with codebook_l2_norm), away from near-ties; codes, loss value as its."""
    cfg = VQGANConfig.from_llamagen({"encoder_ch_mult": [1], "decoder_ch_mult": [1], "codebook_size": K,
                                     "codebook_embed_dim": D, "codebook_l2_norm": l2, "codebook_show_usage": False,
                                     "z_channels": 32, "commit_loss_beta": 0.3})
    q = VQModel(cfg).quantize.train()
    g = torch.Generator().manual_seed(B * K + D)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(K, D, generator=g))
    zin = torch.randn(B, D, h, w, generator=g)
    zq, loss, (_, _, idx) = q(zin)
    z = zin.double().permute(0, 2, 3, 1).reshape(-1, D)
    e = q.embedding.weight.detach().double()
    if l2:
        z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)
    d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.T
    two = d.topk(2, dim=1, largest=False)
    _assert_same_codes(idx, two.indices[:, 0], two.values[:, 1] - two.values[:, 0], "code search")
    zq_ref = e[idx]  # LlamaGen's z_q (unit codes with l2), straight-through value
    torch.testing.assert_close(zq.double().permute(0, 2, 3, 1).reshape(-1, D), zq_ref, rtol=0, atol=2e-6)
    mse = ((zq_ref - z) ** 2).mean()
    torch.testing.assert_close(loss.double(), (1 + 0.3) * mse, rtol=2e-5, atol=1e-7)  # vq_loss + beta * commit


def test_exact_ties_take_the_lowest_index():
    """LlamaGen's torch.argmin returns the first of equal distances: duplicated codes give the lower index."""
    cfg = VQGANConfig.from_llamagen({"encoder_ch_mult": [1], "decoder_ch_mult": [1], "codebook_size": 9,
                                     "codebook_embed_dim": 4, "z_channels": 32, "codebook_show_usage": False})
    q = VQModel(cfg).quantize.eval()
    cb = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    cb[6] = cb[2]
    # the same direction: the same unit code. A power of two, so that l2-normalising gives the same bits (3x
    # gave a unit code 1 ulp away, whose score could win on one CPU's kernel and not on another's)
    cb[8] = cb[2] * 2.0
    with torch.no_grad():
        q.embedding.weight.copy_(cb)
    zin = (cb[2] * 0.5).view(1, 4, 1, 1).expand(2, 4, 1, 1).contiguous()
    _, _, (_, _, idx) = q(zin)
    assert idx.tolist() == [2, 2]


# ---------------------------------------------------------------------------------------------
# config and loading

def test_named_configs():
    c16 = VQGANConfig.from_llamagen("VQ-16")
    assert (c16.ch, c16.ch_mult, c16.num_res_blocks, c16.z_channels, c16.n_embed, c16.embed_dim) == \
        (128, (1, 1, 2, 2, 4), 2, 256, 16384, 8)
    assert c16.use_cosine_sim and c16.codebook_show_usage and not c16.legacy and c16.beta == 0.25
    assert c16.layout == "llamagen" and c16.decoder_ch_mult is None and c16.attn_resolutions == (16,)
    assert c16.downsample_factor == 16
    c8 = VQGANConfig.from_llamagen("VQ-8", codebook_size=4096, codebook_embed_dim=16)  # as VQ_8(**kwargs)
    assert (c8.ch_mult, c8.n_embed, c8.embed_dim, c8.downsample_factor) == ((1, 2, 2, 4), 4096, 16, 8)

    @dataclasses.dataclass
    class ModelArgs:  # a stand-in for LlamaGen's dataclass, with some of its fields
        codebook_size: int = 1024
        decoder_ch_mult: list = dataclasses.field(default_factory=lambda: [1, 1, 2, 2, 4])
        dropout_p: float = 0.1

    c = VQGANConfig.from_llamagen(ModelArgs())
    assert (c.n_embed, c.dropout, c.decoder_ch_mult) == (1024, 0.1, None)
    assert VQGANConfig.from_llamagen(c) is c


def test_config_errors():
    with pytest.raises(ValueError, match="unknown LlamaGen tokenizer 'VQ-32'"):
        VQGANConfig.from_llamagen("VQ-32")
    with pytest.raises(ValueError, match="unknown LlamaGen tokenizer ModelArgs field.*codebook_sizes"):
        VQGANConfig.from_llamagen({"codebook_sizes": 5})
    with pytest.raises(NotImplementedError, match="different lengths"):
        VQGANConfig.from_llamagen({"encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2, 2]})
    with pytest.raises(TypeError, match="LlamaGen tokenizer name"):
        VQGANConfig.from_llamagen(16)
    with pytest.raises(ValueError, match="decoder_ch_mult must be positive ints, as many as ch_mult"):
        VQGANConfig(decoder_ch_mult=(1, 2))
    with pytest.raises(ValueError, match="entropy_loss_ratio"):
        VQGANConfig(entropy_loss_ratio=-0.1)
    with pytest.raises(ConfigError, match="layout must be one of 'taming', 'llamagen'"):
        VQGANConfig.from_dict({"layout": "maskgit"})
    with pytest.raises(ConfigError, match="ch must be an integer"):
        VQGANConfig.from_dict({"ch": "128"})
    with pytest.raises(ValueError, match="needs layout='llamagen'"):
        VQModel.from_llamagen({}, VQGANConfig())
    with pytest.raises(ValueError, match="codebook_show_usage=True"):
        VQModel(VQGANConfig(ch=32, ch_mult=(1,), attn_resolutions=(), n_embed=8, embed_dim=4)).codebook_usage()


TINY = {"encoder_ch_mult": [1], "decoder_ch_mult": [1], "codebook_size": 16, "z_channels": 32}


def test_checkpoint_forms(tmp_path):
    sd = VQModel(VQGANConfig.from_llamagen(TINY)).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    for ckpt in ({"model": sd}, {"module": sd}, {"state_dict": sd}, sd):
        m = VQModel.from_llamagen(ckpt, TINY)
        assert torch.equal(m.quant_conv.weight, sd["quant_conv.weight"])
    m = VQModel.from_llamagen({"model": sd, "ema": ema}, TINY, ema=True)
    assert torch.equal(m.quant_conv.weight, ema["quant_conv.weight"])
    with pytest.raises(CheckpointError, match="expected the weights under 'ema'"):
        VQModel.from_llamagen({"model": sd}, TINY, ema=True)
    # LlamaGen keeps codebook_used in its state_dict (codebook_show_usage, its default): required, strictly
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: quantize\.codebook_used"):
        VQModel.from_llamagen({k: v for k, v in sd.items() if k != "quantize.codebook_used"}, TINY)
    with pytest.raises(CheckpointError, match=r"unexpected: quantize\.codebook_used"):
        VQModel.from_llamagen(sd, {**TINY, "codebook_show_usage": False})
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight: \(16, 8\) in the checkpoint, \(32, 8\)"):
        VQModel.from_llamagen(sd, {**TINY, "codebook_size": 32})
    # vq_train.py also saves its argparse args: refused unless trusted
    path = tmp_path / "0000100.pt"
    torch.save({"model": sd, "steps": 100, "args": argparse.Namespace(vq_model="VQ-16")}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        VQModel.from_llamagen(path, TINY)
    m = VQModel.from_llamagen(path, TINY, trust_checkpoint=True)
    assert torch.equal(m.quantize.codebook_used, sd["quantize.codebook_used"])


def test_save_pretrained_round_trip(tmp_path):
    cfg = VQGANConfig.from_llamagen({**TINY, "encoder_ch_mult": [1, 2], "decoder_ch_mult": [2, 1],
                                     "entropy_loss_ratio": 0.1})
    model = VQModel(cfg)
    model._record_usage(torch.arange(5))
    model.save_pretrained(tmp_path / "tok")
    back = VQModel.from_pretrained(tmp_path / "tok")
    assert back.config == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert VQGANConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_llamagen_init_gives_unit_codes_taming_unchanged():
    m = VQModel(VQGANConfig.from_llamagen(TINY))
    torch.testing.assert_close(m.quantize.embedding.weight.norm(dim=1), torch.ones(16))
    taming = VQModel(VQGANConfig(ch=32, ch_mult=(1, 2), attn_resolutions=(), n_embed=8, embed_dim=4))
    keys = list(taming.state_dict())
    assert any(k.startswith("encoder.down.1.block.0.") for k in keys)
    assert any(k.startswith("decoder.up.0.block.2.") for k in keys)
    assert "encoder.mid.block_1.conv1.weight" in keys and "quantize.codebook_used" not in keys
    assert float(taming.quantize.embedding.weight.detach().abs().max()) <= 1 / 8
    assert math.isclose(VQGANConfig().entropy_loss_ratio, 0.0) and VQGANConfig().layout == "taming"
