"""vqkernels.evaluate: a tokenizer's reconstruction metrics, and the `vqkernels eval` command's input errors."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from vqkernels import evaluate as ev
from vqkernels.models.vqgan import VQGANConfig, VQModel

PIL = pytest.importorskip("PIL.Image")


def _tiny_vqgan(seed=0) -> VQModel:
    torch.manual_seed(seed)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=32,
                      n_embed=64, embed_dim=16)
    return VQModel(cfg).eval()


def _smooth_images(rng, sizes):
    """Smooth random images (a random model still reconstructs them poorly, but they are photograph-like)."""
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        chans = [np.sin(rng.uniform(1, 6) * xx + rng.uniform(0, 3)) * np.cos(rng.uniform(1, 6) * yy) for _ in range(3)]
        out.append(((np.stack(chans, -1) + 1) * 127.5).clip(0, 255).astype(np.uint8))
    return out


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "vqgan"
    _tiny_vqgan().save_pretrained(path)
    return path


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    arrays = _smooth_images(np.random.default_rng(0), [(16, 16), (16, 16), (24, 40), (19, 23)])
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(d / ("sub" if k == 3 else ".") / f"img{k}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def _args(**kw):
    p = ev.add_arguments(argparse.ArgumentParser(prog="vqkernels eval"))
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not False and v is not None:
            argv += [flag, str(v)]
    return p.parse_args(argv)


def _check_ranges(r, n_images):
    assert r["images"] == n_images
    assert math.isfinite(r["psnr"]) and 0 < r["psnr"] < 100 and math.isfinite(r["psnr_pooled"])
    assert -1 <= r["ssim"] <= 1 and r["ssim_images"] == n_images
    assert 0 < r["codes_used"] <= r["codebook_size"] == 64
    assert r["codebook_usage"] == pytest.approx(r["codes_used"] / 64)


def _same_as_direct(r, model, images):
    """The command's numbers are evaluate_tokenizer's on the same model and images (whose every metric
    test_metrics_match_their_definitions checks against its definition)."""
    d = ev.evaluate_tokenizer(model, images, batch_size=2, lpips=False, fid=False)
    # other batchings sum in other orders: a float32 rounding's difference (as in the test above)
    assert r["psnr"] == pytest.approx(d["psnr"], abs=1e-3) and r["psnr_pooled"] == pytest.approx(d["psnr_pooled"], abs=1e-3)
    assert r["ssim"] == pytest.approx(d["ssim"], abs=1e-4)
    assert r["codes_used"] == d["codes_used"] and r["images"] == d["images"]
    assert r["perplexity"] == pytest.approx(d["perplexity"], rel=1e-6)  # from integer counts


def test_metrics_match_their_definitions():
    model = _tiny_vqgan()
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, 16, 16, generator=g) * 2 - 1 for _ in range(3)] + [torch.rand(3, 21, 31, generator=g) * 2 - 1]
    r = ev.evaluate_tokenizer(model, imgs, batch_size=2, lpips=False, fid=False)
    _check_ranges(r, 4)
    assert r["unavailable"] == {"lpips": "not asked", "rfid": "not asked"} and r["lpips"] is None and r["rfid"] is None
    # the same numbers computed here, image by image (21x31 is padded to 22x32 by reflection, cropped back)
    from skimage.metrics import structural_similarity

    psnrs, ssims, sq, px, codes = [], [], 0.0, 0, []
    with torch.no_grad():
        for x in imgs:
            xp = torch.nn.functional.pad(x[None], (0, (-x.shape[2]) % 2, 0, (-x.shape[1]) % 2), mode="reflect")
            quant, _, (_, _, ind) = model.encode(xp)
            rec = model.decode(quant)[0, :, :x.shape[1], :x.shape[2]]
            a, b = (x * 0.5 + 0.5).double(), (rec * 0.5 + 0.5).clamp(0, 1).double()
            psnrs.append(float(10 * torch.log10(1 / ((a - b) ** 2).mean())))
            sq += float(((a - b) ** 2).sum())
            px += a.numel()
            ssims.append(structural_similarity(b.permute(1, 2, 0).numpy(), a.permute(1, 2, 0).numpy(), channel_axis=2,
                                               data_range=1.0, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False))
            codes.append(ind.reshape(-1))
    # batches of 2 and 1 sum in other orders than one image at a time: a float32 rounding's difference
    assert r["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert r["psnr_pooled"] == pytest.approx(10 * math.log10(px / sq), abs=1e-3)
    assert r["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    counts = torch.bincount(torch.cat(codes), minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    assert r["codes_used"] == int((counts > 0).sum())  # (a tie between codes could flip one; none at these values)
    assert r["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_perfect_reconstruction_and_one_code():
    class Identity(torch.nn.Module):  # a "tokenizer" that gives its input back and uses code 3 everywhere
        def __init__(self):
            super().__init__()
            self.config = VQGANConfig(ch=32, ch_mult=(1,), resolution=8, n_embed=8, embed_dim=3, z_channels=32)
            self.p = torch.nn.Parameter(torch.zeros(()))

        def encode(self, x):
            return x, None, (None, None, torch.full((x.shape[0] * x.shape[2] * x.shape[3],), 3))

        def decode(self, q):
            return q

    imgs = [torch.rand(3, 12, 14) * 2 - 1 for _ in range(2)]
    r = ev.evaluate_tokenizer(Identity(), imgs, lpips=False, fid=False)
    assert r["psnr"] == pytest.approx(100.0) and r["ssim"] == pytest.approx(1.0)  # mse clamped at 1e-10
    assert r["codes_used"] == 1 and r["codebook_usage"] == 1 / 8 and r["perplexity"] == pytest.approx(1.0)


def test_main_text_and_json_every_metric(checkpoint, folder, capsys):
    lpips_ok, _ = ev.lpips_status()
    assert ev.main(_args(checkpoint=checkpoint, data=folder, json=True, device="cpu", batch_size=2)) == 0
    r = json.loads(capsys.readouterr().out)
    _check_ranges(r, 4)
    model = ev.load_tokenizer(checkpoint, "cpu")
    _same_as_direct(r, model, list(ev.open_images(str(folder), model.config.resolution)))
    assert r["data"] == str(folder) and r["device"] == "cpu" and r["tiled"] is False
    if lpips_ok:  # the real weights are on this machine (scripts/fetch_lpips_weights.py)
        assert 0 < r["lpips"] < 2 and r["lpips_images"] == 4 and "lpips" not in r["unavailable"]
    else:
        assert r["lpips"] is None and r["unavailable"]["lpips"] == "not available (run scripts/fetch_lpips_weights.py)"
    fid_ok, _ = ev.fid_status()
    if not fid_ok:  # this machine: no torch-fidelity and no Inception weights; the rest is reported
        assert r["rfid"] is None and r["unavailable"]["rfid"].startswith("not available: pip install torch-fidelity")
    else:
        assert r["rfid"] >= 0


def test_main_text_report_tiled(checkpoint, folder, capsys):
    # the text report: one line per metric; --max-images and --tiled
    assert ev.main(_args(checkpoint=checkpoint, data=folder, max_images=2, tiled=True, no_lpips=True)) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("2 image(s) from") and "tiled" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["psnr", "ssim", "lpips", "codebook", "rfid"]
    assert "lpips     not asked" in out
    # --tile alone implies --tiled (it was silently ignored)
    assert ev.main(_args(checkpoint=checkpoint, data=folder, max_images=2, tile=8, no_lpips=True, json=True)) == 0
    assert json.loads(capsys.readouterr().out)["tiled"] is True


def test_lpips_missing_weights_is_reported(monkeypatch):
    import vqkernels.models.lpips as lp

    monkeypatch.setattr(lp, "find_weights", lambda: None)
    r = ev.evaluate_tokenizer(_tiny_vqgan(), [torch.zeros(3, 16, 16)], fid=False)
    assert r["lpips"] is None and r["unavailable"]["lpips"] == "not available (run scripts/fetch_lpips_weights.py)"


def test_rfid_not_available_without_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ok, msg = ev.fid_status()
    assert not ok
    assert msg == ("not available: pip install torch-fidelity and fetch its Inception weights (FID's "
                   "pt_inception-2015-12-05 network, weights-inception-2015-12-05-6726825d.pth) into "
                   f"{tmp_path / 'hub' / 'checkpoints'}")
    r = ev.evaluate_tokenizer(_tiny_vqgan(), [torch.zeros(3, 16, 16)] * 2, lpips=False)
    assert r["rfid"] is None and r["unavailable"]["rfid"] == msg
    # both conditions are needed: the weight file alone is not enough without torch-fidelity
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ev.FID_WEIGHTS_FILENAME).write_bytes(b"")
    assert ev.fid_status()[0] == (importlib.util.find_spec("torch_fidelity") is not None)


def test_bad_input_one_line_exit_2(checkpoint, folder, tmp_path, capsys):
    def fails(expect, **kw):
        assert ev.main(_args(**kw)) == 2
        cap = capsys.readouterr()
        assert cap.out == ""
        err = cap.err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vqkernels eval: "), err
        assert expect in err, err

    fails("does not exist", checkpoint=tmp_path / "nowhere", data=folder)
    (tmp_path / "empty").mkdir()
    fails("holds no checkpoint", checkpoint=tmp_path / "empty", data=folder)
    fails("data folder", checkpoint=checkpoint, data=tmp_path / "missing")
    fails("holds no image", checkpoint=checkpoint, data=tmp_path / "empty")
    fails("--batch-size", checkpoint=checkpoint, data=folder, batch_size=0)
    fails("tile", checkpoint=checkpoint, data=folder, tiled=True, tile=17)  # not a multiple of the factor 2
    # a GPT (two-stage) checkpoint where a VQGAN is needed
    from vqkernels.models.gpt import GPTConfig
    from vqkernels.models.two_stage import VQGANTransformer, VQGANTransformerConfig

    vq = _tiny_vqgan().config
    gpt = VQGANTransformer(VQGANTransformerConfig(gpt=GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=1,
                                                                n_embd=32), vqgan=vq))
    gpt.save_pretrained(tmp_path / "gpt")
    fails("GPT checkpoint", checkpoint=tmp_path / "gpt", data=folder)
    # a corrupt image in the folder
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    fails("cannot read image", checkpoint=checkpoint, data=folder)


def test_evaluate_tokenizer_bad_input():
    model = _tiny_vqgan()
    with pytest.raises(ev.EvalError, match="no image"):
        ev.evaluate_tokenizer(model, [], lpips=False, fid=False)
    with pytest.raises(ev.EvalError, match=r"item 1 has values in \[0, 255\]"):
        bytes_like = torch.full((3, 8, 8), 255.0).index_fill(1, torch.tensor([0]), 0)  # [0, 255], not [-1, 1]
        ev.evaluate_tokenizer(model, [torch.zeros(3, 8, 8), bytes_like], lpips=False, fid=False)
    with pytest.raises(ev.EvalError, match=r"item 0 is \(8, 8\)"):
        ev.evaluate_tokenizer(model, [torch.zeros(8, 8)], lpips=False, fid=False)
    with pytest.raises(ev.EvalError, match="VQGAN tokenizer"):
        ev.evaluate_tokenizer(torch.nn.Linear(2, 2), [torch.zeros(3, 8, 8)])


def test_dataset_registry_is_pluggable(checkpoint, capsys, monkeypatch):
    seen = []

    def tiny(resolution):
        seen.append(resolution)
        return [torch.zeros(3, resolution, resolution), torch.ones(3, resolution, resolution) * 0.5]

    monkeypatch.setitem(ev.DATASETS, "tiny", tiny)
    assert ev.main(_args(checkpoint=checkpoint, data="tiny", json=True, no_lpips=True, no_fid=True)) == 0
    r = json.loads(capsys.readouterr().out)
    assert seen == [16] and r["images"] == 2 and r["data"] == "tiny"


def test_run_folder_and_embedded_data(tmp_path, capsys, monkeypatch):
    # a run folder: 'latest' names the newest checkpoint folder inside it
    run = tmp_path / "run"
    _tiny_vqgan(seed=1).save_pretrained(run / "checkpoints" / "step_00000010")
    (run / "latest").write_text("checkpoints/step_00000010\n")
    embedded, crops = ev.DATASETS["embedded"], []
    monkeypatch.setitem(ev.DATASETS, "embedded", lambda res: crops.extend(embedded(res)) or crops)
    assert ev.main(_args(checkpoint=run, data="embedded", max_images=3, json=True, no_lpips=True, no_fid=True)) == 0
    r = json.loads(capsys.readouterr().out)
    _check_ranges(r, 3)
    _same_as_direct(r, _tiny_vqgan(seed=1).eval(), crops[:3])
    # the embedded held-out crops are at the model's training size, as training's held-out metrics
    assert len(crops) > 3 and {tuple(c.shape) for c in crops} == {(3, 16, 16)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bad_device_one_line(checkpoint, folder, capsys):
    assert ev.main(_args(checkpoint=checkpoint, data=folder, device="cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vqkernels eval: --device cuda") and "CUDA" in err
