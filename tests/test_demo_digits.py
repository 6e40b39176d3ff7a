"""The demo's digits part on a tiny scale: the labelled split, class dropout in the llama GPT's training, sampling
with classifier-free guidance through the two-stage model and `vqkernels sample`, and the classifier's figures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("vqkernels.models.two_stage")

from vqkernels import cli  # noqa: E402
from vqkernels import digits as D  # noqa: E402
from vqkernels import train as T  # noqa: E402
from vqkernels.data import open_dataset  # noqa: E402
from vqkernels.demo import digits_figures  # noqa: E402
from vqkernels.runs import TrainError  # noqa: E402

TINY_VQGAN = dict(batch_size=8, num_workers=0, log_every=1, image_every=100, checkpoint_every=100,
                  model=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                             embed_dim=8, n_embed=16, decay=0.9, threshold_ema_dead_code=1.0),
                  loss=dict(perceptual_weight=0.0, disc_start=10 ** 9, disc_ndf=8, disc_num_layers=1))
TINY_GPT = dict(batch_size=8, num_workers=0, log_every=1, image_every=100, checkpoint_every=100, conditional=True,
                arch="llama", class_dropout=0.25, cfg_scale=2.5, model=dict(n_layer=1, n_head=2, n_embd=32,
                                                                             multiple_of=32))


def test_split_is_fixed_by_index_and_labelled():
    train, held = open_dataset("digits", 16)
    assert (len(train), len(held)) == (1437, 360)
    assert train.classes == [str(k) for k in range(10)]
    x, y = D.digits_arrays(16)
    mask = torch.arange(len(x)) % D.HELD_OUT_EVERY == 0
    assert torch.equal(held.images, x[mask]) and torch.equal(train.labels, y[~mask])
    assert train[0].shape == (3, 16, 16) and -1 <= float(train[0].min()) and float(train[0].max()) <= 1
    train.with_labels = True
    img, label = train[(5, 123)]
    assert label == int(y[~mask][5]) and torch.equal(img, x[~mask][5])
    # the enlargement keeps the digit: averaged back to 8x8 it is the original on the 0..16 scale, blurred by
    # the bilinear weights (so close on average, and strongly correlated)
    from sklearn.datasets import load_digits

    feats, orig = D.digit_features(x[:200]), load_digits().data[:200]
    assert np.abs(feats - orig).mean() < 1.5 and np.corrcoef(feats.ravel(), orig.ravel())[0, 1] > 0.95
    with pytest.raises(Exception, match="integer >= 8"):
        D.digits_arrays(4)


def test_classifier_recognises_held_out_digits_and_not_noise():
    clf = D.DigitClassifier(16)
    assert clf.held_out_accuracy > 0.95  # (about 0.98 with scikit-learn's defaults)
    split = D.digits_split(16)
    fig = D.class_agreement(clf, split.held_out.images, split.held_out.labels)
    assert fig["agreement"] == pytest.approx(clf.held_out_accuracy, abs=1e-4)
    assert set(fig["per_class"]) == {str(k) for k in range(10)} and fig["samples"] == 360
    # the same image asked as every digit: one class right at most, and one distinct image per class
    one = split.held_out.images[:1].expand(10, -1, -1, -1)
    fig = D.class_agreement(clf, one, torch.arange(10))
    assert fig["agreement"] <= 0.1 and set(fig["distinct_per_class"].values()) == {1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    v = T.config_from_dict(T.VQGANTrainConfig, dict(TINY_VQGAN, data="digits", crop_size=16, out=str(root / "vq"),
                                                    steps=2, device="cpu"), "test")
    T.train_vqgan(v, overwrite=True, progress=False)
    g = T.config_from_dict(T.GPTTrainConfig, dict(TINY_GPT, data="digits", crop_size=16, vqgan=str(root / "vq"),
                                                  out=str(root / "gpt"), steps=3, device="cpu"), "test")
    s = T.train_gpt(g, overwrite=True, progress=False)
    return root, s


def test_llama_gpt_trains_with_class_dropout(runs):
    root, s = runs
    two = s["model"]
    gpt = two.transformer
    assert s["steps"] == 3 and gpt.is_llama and gpt.config.num_classes == 10
    assert gpt.config.class_dropout_prob == 0.25 and gpt.config.has_null_class  # the null row CFG needs
    assert gpt.cls_embedding.embedding_table.num_embeddings == 11
    assert gpt.config.cfg_scale == 2.5  # stored as the checkpoint's default guidance
    assert json.loads((root / "gpt" / "classes.json").read_text()) == [str(k) for k in range(10)]
    # in training mode the labels reach the class table as the null class about class_dropout_prob of the time
    seen = []
    h = gpt.cls_embedding.embedding_table.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    two.train()
    torch.manual_seed(1)
    x = D.digits_split(16).train.images[:64]
    with torch.no_grad():
        for _ in range(20):
            two(x, torch.arange(64) % 10)
    h.remove()
    labels = torch.cat(seen)
    frac = float((labels == 10).float().mean())
    assert 0.18 < frac < 0.32, frac  # 1280 draws of p = 0.25
    assert torch.equal(labels[labels != 10], (torch.arange(64) % 10).repeat(20)[labels != 10])
    two.eval()


def test_build_gpt_refuses_what_cannot_work(runs, tmp_path):
    root, _ = runs
    vq = T.load_model(str(root / "vq"), "vqgan", "cpu")
    base = dict(TINY_GPT, data="digits", crop_size=16, vqgan=str(root / "vq"), out=str(tmp_path / "g"))
    with pytest.raises(TrainError, match="class-conditional"):
        T.build_gpt(T.config_from_dict(T.GPTTrainConfig, base, "t"), vq, None)
    with pytest.raises(TrainError, match="arch must be"):
        T.build_gpt(T.config_from_dict(T.GPTTrainConfig, dict(base, arch="gpt2"), "t"), vq, 10)
    with pytest.raises(TrainError, match=r"class_dropout must be in \[0, 1\)"):
        T.build_gpt(T.config_from_dict(T.GPTTrainConfig, dict(base, class_dropout=1.0), "t"), vq, 10)
    with pytest.raises(TrainError, match="for --arch llama"):
        T.build_gpt(T.config_from_dict(T.GPTTrainConfig, dict(base, arch="mingpt"), "t"), vq, 10)
    with pytest.raises(TrainError, match="disagrees"):
        T.build_gpt(T.config_from_dict(T.GPTTrainConfig, dict(base, model={"arch": "mingpt"}), "t"), vq, 10)
    # the model section alone picks the family too
    m = T.build_gpt(T.config_from_dict(T.GPTTrainConfig, dict(base, arch=None, class_dropout=None, cfg_scale=None,
                                                              model={"arch": "llama", "n_layer": 1, "n_head": 2,
                                                                     "n_embd": 32}), "t"), vq, 10)
    assert m.transformer.is_llama and m.transformer.config.class_dropout_prob == 0.1  # LlamaGen's default


def test_figures_with_and_without_guidance(runs):
    _, s = runs
    two = s["model"].eval()
    clf = D.DigitClassifier(16)
    fig = digits_figures(
        two, clf, torch.device("cpu"), 0, 2.5, 3)
    grid = fig.pop("grid")
    assert grid.shape == (30, 3, 16, 16)  # a row of 3 per digit
    assert 0 <= fig["agreement_unguided"] <= 1 and 0 <= fig["agreement_guided"] <= 1
    assert fig["cfg_scale"] == 2.5 and fig["samples_per_class"] == 3
    assert set(fig["distinct_samples_per_class"]) == {str(k) for k in range(10)}
    assert fig["classifier_held_out_accuracy"] == round(clf.held_out_accuracy, 4)
    # guidance changes what is drawn (the same seed, another mix of logits): with a null class far from the
    # others and an output layer away from its zero init (3 steps leave both where they started), the mix
    # uncond + (cond - uncond) * 8 is not the conditional logits
    import copy

    two = copy.deepcopy(two)
    with torch.no_grad():
        two.transformer.output.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        table = two.transformer.cls_embedding.embedding_table.weight
        table[10] += 5 * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    a = two.sample_codes(10, class_label=torch.arange(10), generator=g, cfg_scale=1.0)
    g = torch.Generator().manual_seed(3)
    b = two.sample_codes(10, class_label=torch.arange(10), generator=g, cfg_scale=8.0)
    assert a.shape == b.shape == (10, 8, 8) and not torch.equal(a, b)


def test_sample_command_guidance(runs, tmp_path, capsys):
    root, _ = runs
    argv = ["sample", "--checkpoint", str(root / "gpt"), "--class-label", "7", "--n", "3", "--device", "cpu"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "class 7 (7)" in out and "guidance scale 2.5 (the checkpoint's)" in out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["sample_000.png", "sample_001.png",
                                                                   "sample_002.png", "samples.png"]
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--cfg-scale", "1", "--cfg-interval", "2"]) == 0
    assert "guidance scale 1" in capsys.readouterr().out
    for bad, needle in ((["--cfg-scale", "0.5"], "--cfg-scale must be >= 1"),
                        (["--cfg-interval", "-2"], "--cfg-interval must be >= -1"),
                        (["--class-label", "10"], "classes 0..9")):
        assert cli.main(argv + ["--out", str(tmp_path / "c")] + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_eval_takes_the_digits(runs, capsys):
    root, _ = runs
    assert cli.main(["eval", "--checkpoint", str(root / "vq"), "--data", "digits", "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 360 and np.isfinite(r["psnr"])


def test_run_digits_writes_both_runs_the_grid_and_the_figures(tmp_path, monkeypatch):
    """The demo's digits part, wired end to end on tiny models and a few seconds of budget."""
    import vqkernels.demo as demo

    monkeypatch.setattr(demo, "DIGITS_VQGAN", {**TINY_VQGAN, "lr": 1e-3})
    monkeypatch.setattr(demo, "DIGITS_GPT", {k: v for k, v in TINY_GPT.items() if k != "cfg_scale"}
                        | {"cfg_scale": demo.DIGITS_CFG_SCALE})
    monkeypatch.setattr(demo, "DIGITS_PER_CLASS", 2)
    lines = []
    m = demo.run_digits(tmp_path, 0.1, torch.device("cpu"), 0, progress=False, echo=lines.append)
    for run in ("digits-vqgan", "digits-gpt"):
        assert (tmp_path / run / "latest").is_file()
    from PIL import Image

    w, h = Image.open(tmp_path / "digits_samples.png").size
    assert h > w  # 10 rows of 2
    assert m["samples_per_class"] == 2 and m["cfg_scale"] == demo.DIGITS_CFG_SCALE
    assert {"agreement_unguided", "agreement_guided", "classifier_held_out_accuracy", "held_out_psnr_db"} <= set(m)
    assert m["training"]["vqgan_steps"] >= 1 and m["training"]["gpt_steps"] >= 1
    # the classifier on the held-out digits' reconstructions, recomputed from the written VQGAN
    from vqkernels.digits import DigitClassifier, digits_split
    from vqkernels.runs import load_model

    vq, held = load_model(str(tmp_path / "digits-vqgan"), "vqgan", "cpu"), digits_split(demo.DIGITS_SIZE).held_out
    with torch.no_grad():
        rec = vq(held.images)[0].float().clamp(-1, 1)
    assert m["classifier_on_reconstructions"] == round(DigitClassifier(demo.DIGITS_SIZE).accuracy(rec, held.labels), 4)
    assert any("recognises" in line for line in lines)
    # the run folders are what `sample` takes, with the demo's guidance as the default
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "digits-gpt"), "--class-label", "4", "--n", "2",
                     "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0


def test_training_on_precomputed_codes_is_training_on_the_images(runs):
    """train_gpt encodes a data set without augmentation once (_CodesOf): the same logits as encoding each batch."""
    _, s = runs
    two = s["model"].eval()
    x = D.digits_split(16).train.images[:12]
    c = torch.arange(12) % 10
    a, ta = two(x, c)
    b, tb = two(None, c, codes=two.encode_to_z(x))
    assert torch.equal(ta, tb) and torch.equal(a, b)
    ds = D.digits_split(16).train
    ds.with_labels = True
    coded = T._CodesOf(ds, two, torch.device("cpu"))
    z, label = coded[(7, 99)]
    assert len(coded) == 1437 and label == ds.label(7) and torch.equal(z, two.encode_to_z(ds.images[7:8])[0])
