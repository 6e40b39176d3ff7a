"""The `vqkernels` command end to end on tiny settings (a few steps, 32x32 crops), and every bad input the
issue lists: one line on stderr, a non-zero exit, no traceback, nothing overwritten."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkernels import cli
from vqkernels import runs as R
from vqkernels import train as T

pytest.importorskip("vqkernels.models.two_stage")
yaml = pytest.importorskip("yaml")

TINY_YAML = """\
crop_size: 32
batch_size: 4
lr: 0.002
num_workers: 0
log_every: 1
image_every: 2
checkpoint_every: 2
model: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 8, embed_dim: 8, n_embed: 32, decay: 0.9,
        threshold_ema_dead_code: 1.0}
loss: {perceptual_weight: 0.0, disc_start: 1, disc_ndf: 8, disc_num_layers: 1}
"""
TINY_GPT_YAML = """\
crop_size: 32
batch_size: 4
num_workers: 0
log_every: 1
image_every: 3
model: {n_layer: 1, n_head: 2, n_embd: 32}
"""


def _images(root, n=8, size=(40, 44), seed=0, classes=None):
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        sub = root / classes[i % len(classes)] if classes else root
        sub.mkdir(exist_ok=True)
        Image.fromarray(low).resize(size[::-1], Image.BICUBIC).save(sub / f"img{i}.png")
    return root


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr); SystemExit (argparse) counts as a return."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny image folder, a 3-step VQGAN run and a 3-step GPT run over it, made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = _images(root / "data", classes=["cats", "dogs"])
    (root / "tiny.yaml").write_text(TINY_YAML)
    (root / "gpt.yaml").write_text(TINY_GPT_YAML)
    torch.manual_seed(0)
    assert cli.main(["train-vqgan", "--config", str(root / "tiny.yaml"), "--data", str(data), "--out",
                     str(root / "vq"), "--steps", "3", "--device", "cpu", "--quiet"]) == 0
    assert cli.main(["train-gpt", "--config", str(root / "gpt.yaml"), "--vqgan", str(root / "vq"), "--data",
                     str(data), "--out", str(root / "gpt"), "--steps", "3", "--device", "cpu", "--conditional",
                     "--quiet"]) == 0
    return root


# -- what works ---------------------------------------------------------------------------------

def test_train_vqgan_writes_a_run(env):
    vq = env / "vq"
    assert (vq / "latest").read_text().strip() == "checkpoints/step_00000003"
    ck = R.checkpoint_dir(vq)
    assert {"config.json", "model.safetensors", "discriminator.safetensors", "trainer.pt",
            "train_config.json"} <= {p.name for p in ck.iterdir()}
    log = [json.loads(line) for line in (vq / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["images_per_s"] > 0 and np.isfinite(r["rec_loss"]) for r in log)
    assert (vq / "images" / "step_00000002.png").is_file() and (vq / "images" / "step_00000003.png").is_file()
    cfg = json.loads((vq / "train_config.json").read_text())
    assert cfg["kind"] == "vqgan" and cfg["steps"] == 3 and cfg["lr"] == 0.002  # flags and YAML merged
    state = torch.load(ck / "trainer.pt", weights_only=True)  # tensors and plain values only
    assert state["step"] == 3 and {"torch", "numpy", "python"} <= set(state["rng"][0])


def test_flags_win_over_yaml(env, capsys, tmp_path):
    rc, out, err = run(capsys, "train-vqgan", "--config", env / "tiny.yaml", "--data", env / "data", "--out",
                       tmp_path / "r", "--steps", "1", "--lr", "0.0005", "--batch-size", "2", "--device", "cpu",
                       "--quiet")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert cfg["lr"] == 0.0005 and cfg["batch_size"] == 2 and cfg["crop_size"] == 32
    assert "1 steps" in out


def test_reconstruct_any_size(env, capsys, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    odd = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)).save(odd)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(rng.integers(0, 256, (16, 20), dtype=np.uint8)).save(gray)
    rc, out, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "rec", "--device",
                       "cpu", odd, gray)
    assert rc == 0, err
    assert Image.open(tmp_path / "rec" / "odd.png").size == (29, 37)
    assert Image.open(tmp_path / "rec" / "gray.png").size == (20, 16)
    assert "odd.png: PSNR" in out and "gray.jpg: PSNR" in out and "dB" in out


def test_reconstruct_tiles_images_larger_than_the_training_size(env, capsys, tmp_path):
    from PIL import Image

    from vqkernels.data import from_image, load_image
    from vqkernels.tiling import reconstruct_tiled

    big = tmp_path / "big.png"
    low = np.random.default_rng(7).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(low).resize((70, 45), Image.BICUBIC).save(big)  # 45x70: larger than the 32x32 training crops
    small = tmp_path / "small.png"
    Image.fromarray(low).resize((30, 20), Image.BICUBIC).save(small)
    model = R.load_model(env / "vq", "vqgan")
    assert model.config.resolution == 32 and model.config.downsample_factor == 2
    x = load_image(big)

    def written(folder, name="big.png"):
        with Image.open(folder / name) as im:
            return from_image(im)

    def as_png(t):  # the reconstruction as reconstruct writes it (uint8)
        return ((t.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1

    # by default: overlapping tiles at the training size (32, overlap 16: half), as vqkernels.tiling gives them
    rc, out, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "a", "--device", "cpu",
                       big, small)
    assert rc == 0, err
    expect = reconstruct_tiled(model, x)
    torch.testing.assert_close(written(tmp_path / "a"), as_png(expect), rtol=0, atol=1.01 / 127.5)
    assert "big.png: PSNR" in out and "dB (70x45, 8 tiles of 32x32, overlap >= 16" in out  # (2 x 4 tiles)
    assert "small.png: PSNR" in out and "(30x20, whole image)" in out  # one tile or less: whole, as before
    # --tile / --overlap: the tiler's own arguments
    rc, out, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "b", "--device", "cpu",
                       "--tile", "16", "--overlap", "2", big)
    assert rc == 0, err
    torch.testing.assert_close(written(tmp_path / "b"), as_png(reconstruct_tiled(model, x, tile=16, overlap=2)),
                               rtol=0, atol=1.01 / 127.5)
    assert "20 tiles of 16x16, overlap >= 2" in out  # (4 x 5 tiles)
    # --no-tile: the whole image at once (the old behaviour)
    rc, out, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "c", "--device", "cpu",
                       "--no-tile", big)
    assert rc == 0, err
    with torch.no_grad():
        whole = model(torch.nn.functional.pad(x[None], (0, 0, 0, 1), mode="reflect"))[0][0, :, :45]
    torch.testing.assert_close(written(tmp_path / "c"), as_png(whole), rtol=0, atol=1.01 / 127.5)
    assert "(70x45, whole image)" in out
    assert not torch.equal(written(tmp_path / "a"), written(tmp_path / "c"))


@pytest.mark.parametrize("flags, needles", [
    (["--tile", "0"], ["--tile", "must be a positive integer, got 0"]),
    (["--tile", "x"], ["--tile", "expected a positive integer"]),
    (["--tile", "15"], ["--tile 15", "multiple of the model's downsampling factor 2"]),
    (["--overlap", "-1"], ["--overlap", "must be an integer >= 0"]),
    (["--overlap", "32"], ["--overlap 32", "smaller than the tile (32)"]),
    (["--tile", "16", "--overlap", "16"], ["--overlap 16", "smaller than the tile (16)"]),
    (["--no-tile", "--tile", "16"], ["--no-tile", "--tile"]),
    (["--no-tile", "--overlap", "4"], ["--no-tile", "--overlap"]),
])
def test_reconstruct_bad_tiling_flags(env, capsys, tmp_path, flags, needles):
    rc, _, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "o", "--device", "cpu",
                     *flags, env / "data" / "cats" / "img0.png")
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "o").exists()  # nothing written


def test_encode_decode_round_trip(env, capsys, tmp_path):
    from PIL import Image

    from vqkernels.data import load_image

    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(img)
    rc, _, err = run(capsys, "encode", "--checkpoint", env / "vq", "--out", tmp_path / "codes", "--device", "cpu", img)
    assert rc == 0, err
    codes = np.load(tmp_path / "codes" / "a.npy")
    assert codes.shape == (12, 16) and codes.dtype == np.int64 and 0 <= codes.min() and codes.max() < 32
    rc, _, err = run(capsys, "decode", "--checkpoint", env / "vq", "--out", tmp_path / "dec", "--device", "cpu",
                     tmp_path / "codes" / "a.npy")
    assert rc == 0, err
    # decode(encode(x)) is the reconstruction of x
    model = R.load_model(env / "vq", "vqgan")
    with torch.no_grad():
        expect = model(load_image(img)[None])[0][0].clamp(-1, 1)
    got = load_image(tmp_path / "dec" / "a.png")
    assert (got - expect).abs().max() <= 2 / 255 + 1e-6  # PNG rounding


def test_train_gpt_and_sample(env, capsys, tmp_path):
    gpt = env / "gpt"
    assert json.loads((gpt / "classes.json").read_text()) == ["cats", "dogs"]
    log = [json.loads(line) for line in (gpt / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    rc, out, err = run(capsys, "sample", "--checkpoint", gpt, "--n", "3", "--class-label", "1", "--out",
                       tmp_path / "s", "--device", "cpu")
    assert rc == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "s" / "sample_002.png").size == (32, 32)
    assert (tmp_path / "s" / "samples.png").is_file()
    assert "class 1 (dogs)" in out and "tokens/s" in out


def test_train_gpt_llama_with_class_dropout_and_sample_with_guidance(env, capsys, tmp_path):
    """issue 24: a class-conditional LLaMA GPT trains from the command line with class dropout, and sample takes
    --cfg-scale / --cfg-interval, the default guidance being the one train-gpt stored."""
    rc, out, err = run(capsys, "train-gpt", "--config", env / "gpt.yaml", "--vqgan", env / "vq", "--data",
                       env / "data", "--out", tmp_path / "llama", "--steps", "2", "--device", "cpu", "--conditional",
                       "--arch", "llama", "--class-dropout", "0.2", "--cfg-scale", "1.5", "--quiet")
    assert rc == 0, err
    cfg = json.loads((R.checkpoint_dir(tmp_path / "llama") / "config.json").read_text())
    gpt = cfg["gpt"]
    assert (gpt["arch"], gpt["num_classes"], gpt["class_dropout_prob"], gpt["cfg_scale"]) == ("llama", 2, 0.2, 1.5)
    rc, out, err = run(capsys, "sample", "--checkpoint", tmp_path / "llama", "--n", "2", "--class-label", "0",
                       "--out", tmp_path / "s", "--device", "cpu")
    assert rc == 0 and "guidance scale 1.5 (the checkpoint's)" in out, err
    rc, out, err = run(capsys, "sample", "--checkpoint", tmp_path / "llama", "--n", "2", "--class-label", "1",
                       "--cfg-scale", "3", "--cfg-interval", "4", "--out", tmp_path / "s3", "--device", "cpu")
    assert rc == 0 and "guidance scale 3" in out and (tmp_path / "s3" / "sample_001.png").is_file(), err
    # guidance needs the llama family's null class: a minGPT checkpoint says so in one line
    rc, _, err = run(capsys, "sample", "--checkpoint", env / "gpt", "--n", "2", "--class-label", "0",
                     "--cfg-scale", "2", "--out", tmp_path / "s4", "--device", "cpu")
    assert_one_line_error(rc, err, "--cfg-scale", "llama")
    # llama needs labels; guidance options need llama
    rc, _, err = run(capsys, "train-gpt", "--config", env / "gpt.yaml", "--vqgan", env / "vq", "--data",
                     env / "data", "--out", tmp_path / "x", "--steps", "1", "--device", "cpu", "--arch", "llama",
                     "--quiet")
    assert_one_line_error(rc, err, "--arch llama is class-conditional")
    rc, _, err = run(capsys, "train-gpt", "--config", env / "gpt.yaml", "--vqgan", env / "vq", "--data",
                     env / "data", "--out", tmp_path / "y", "--steps", "1", "--device", "cpu", "--conditional",
                     "--class-dropout", "0.1", "--quiet")
    assert_one_line_error(rc, err, "for --arch llama")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_python_dash_m_entry_point(env, tmp_path):
    p = subprocess.run([sys.executable, "-m", "vqkernels", "reconstruct", "--checkpoint", str(env / "gpt"),
                        "--out", str(tmp_path), str(env / "data" / "cats" / "img0.png")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert_one_line_error(p.returncode, p.stderr, "GPT checkpoint", "VQGAN")


# -- bad input: one line, non-zero, no traceback, nothing written ---------------------------------

def _train_args(env, tmp_path, *extra):
    return ["train-vqgan", "--config", env / "tiny.yaml", "--data", env / "data", "--out", tmp_path / "run",
            "--steps", "1", "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("case", ["missing", "empty", "no_readable"])
def test_bad_data_folders(env, capsys, tmp_path, case):
    data = tmp_path / "d"
    if case != "missing":
        data.mkdir()
    if case == "no_readable":
        (data / "x.png").write_bytes(b"\x89PNG broken")
        (data / "y.jpg").write_bytes(b"")
    args = _train_args(env, tmp_path)
    args[args.index("--data") + 1] = data
    rc, _, err = run(capsys, *args)
    need = {"missing": "does not exist", "empty": "holds no image", "no_readable": "no readable image"}[case]
    assert_one_line_error(rc, err, need, str(data))
    assert not (tmp_path / "run").exists()  # nothing written


def test_corrupt_image_among_good_ones_is_skipped_and_counted(env, capsys, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(env / "data", data)
    (data / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = _train_args(env, tmp_path)
    args[args.index("--data") + 1] = data
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    warn = [line for line in err.splitlines() if "warning" in line]
    assert len(warn) == 1 and "skipped 1 unreadable" in warn[0]


@pytest.mark.parametrize("argv,needle", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--steps", "0"], "--steps: must be a positive integer"),
    (["--steps", "-3"], "--steps: must be a positive integer"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--lr=-1e-4"], "--lr: must be a positive number"),
    (["--lr", "abc"], "--lr: expected a positive number"),
    (["--precision", "fp8"], "--precision: invalid choice"),
    (["--resume", "--overwrite"], "not allowed with argument"),
])
def test_bad_flags(env, capsys, tmp_path, argv, needle):
    rc, _, err = run(capsys, *_train_args(env, tmp_path, *argv))
    assert rc == 2
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,needle", [
    ("crop_size: [32\nlr: 1", "not valid YAML at line"),
    ("crop_size: 32\nlearning_rate: 0.1\n", "unknown key(s) learning_rate"),
    ("steps: ten\n", "steps must be an integer, got 'ten'"),
    ("lr: [1, 2]\n", "lr must be a number"),
    ("compile: 3\n", "compile must be true or false"),
    ("- a\n- b\n", "expected a mapping"),
    ("lr: 0\n", "lr must be a positive number"),
    ("batch_size: -2\n", "batch_size must be a positive integer"),
    ("model: {ch: 32, bogus_field: 1}\n", "bogus_field"),
])
def test_bad_yaml(env, capsys, tmp_path, text, needle):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    # tiny settings, except for the key under test (a flag would win over the YAML)
    flags = ([] if "steps" in text else ["--steps", "1"]) + ([] if "batch_size" in text else ["--batch-size", "2"])
    rc, _, err = run(capsys, "train-vqgan", "--config", y, "--data", env / "data", "--out", tmp_path / "run",
                     *flags, "--device", "cpu", "--quiet")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists() or not R.has_run(tmp_path / "run")


def test_resume_without_a_checkpoint(env, capsys, tmp_path):
    rc, _, err = run(capsys, *_train_args(env, tmp_path, "--resume"))
    assert_one_line_error(rc, err, "--resume", "does not exist")
    (tmp_path / "run").mkdir()
    rc, _, err = run(capsys, *_train_args(env, tmp_path, "--resume"))
    assert_one_line_error(rc, err, "--resume", "holds no checkpoint")


def test_existing_run_needs_resume_or_overwrite(env, capsys, tmp_path):
    import shutil

    shutil.copytree(env / "vq", tmp_path / "run")
    before = snapshot(tmp_path / "run")
    rc, _, err = run(capsys, *_train_args(env, tmp_path))
    assert_one_line_error(rc, err, "already holds a run", "--resume", "--overwrite")
    assert snapshot(tmp_path / "run") == before
    rc, _, err = run(capsys, *_train_args(env, tmp_path, "--overwrite"))
    assert rc == 0, err
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_00000001"


def test_resume_refuses_a_config_mismatch_and_continues_otherwise(env, capsys, tmp_path):
    import shutil

    shutil.copytree(env / "vq", tmp_path / "run")
    before = snapshot(tmp_path / "run")
    rc, _, err = run(capsys, "train-vqgan", "--out", tmp_path / "run", "--resume", "--lr", "0.01", "--steps", "4",
                     "--quiet")
    assert_one_line_error(rc, err, "does not match", "lr=0.01", "0.002")
    assert snapshot(tmp_path / "run") == before
    rc, out, err = run(capsys, "train-vqgan", "--out", tmp_path / "run", "--resume", "--steps", "4", "--quiet")
    assert rc == 0, err
    assert "4 steps" in out and R.checkpoint_dir(tmp_path / "run").name == "step_00000004"


def test_wrong_kind_of_checkpoint(env, capsys, tmp_path):
    img = env / "data" / "cats" / "img0.png"
    rc, _, err = run(capsys, "reconstruct", "--checkpoint", env / "gpt", "--out", tmp_path / "o", img)
    assert_one_line_error(rc, err, "is a GPT checkpoint", "needs a VQGAN")
    assert not (tmp_path / "o").exists()
    rc, _, err = run(capsys, "sample", "--checkpoint", env / "vq", "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "is a VQGAN checkpoint", "needs a GPT")
    rc, _, err = run(capsys, "train-vqgan", "--out", env / "gpt", "--resume", "--quiet")
    assert_one_line_error(rc, err, "holds a gpt run, not a vqgan run")


@pytest.mark.parametrize("what", ["model.safetensors", "trainer.pt", "config.json"])
def test_truncated_or_corrupt_checkpoint(env, capsys, tmp_path, what):
    import shutil

    shutil.copytree(env / "vq", tmp_path / "run")
    f = R.checkpoint_dir(tmp_path / "run") / what
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path / "run")
    img = env / "data" / "cats" / "img0.png"
    if what == "trainer.pt":
        rc, _, err = run(capsys, "train-vqgan", "--out", tmp_path / "run", "--resume", "--steps", "5", "--quiet")
    else:
        rc, _, err = run(capsys, "reconstruct", "--checkpoint", tmp_path / "run", "--out", tmp_path / "o", img)
    assert_one_line_error(rc, err, str(f.parent))
    assert "truncated or corrupt" in err or "cannot be" in err
    assert snapshot(tmp_path / "run") == before


def test_checkpoint_weights_not_matching_their_config(env, capsys, tmp_path):
    import shutil

    shutil.copytree(env / "vq", tmp_path / "run")
    cfg_file = R.checkpoint_dir(tmp_path / "run") / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["n_embed"] = 64
    cfg_file.write_text(json.dumps(cfg))
    rc, _, err = run(capsys, "reconstruct", "--checkpoint", tmp_path / "run", "--out", tmp_path / "o",
                     env / "data" / "cats" / "img0.png")
    assert_one_line_error(rc, err, "cannot be loaded", "quantize.embedding.weight")


def test_unwritable_output_folder(env, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = _train_args(env, tmp_path)
    args[args.index("--out") + 1] = blocker / "sub"
    rc, _, err = run(capsys, *args)
    assert_one_line_error(rc, err, "cannot write there")
    rc, _, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", blocker,
                     env / "data" / "cats" / "img0.png")
    assert_one_line_error(rc, err, "is a file, not a folder")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(env, capsys, tmp_path):
    args = _train_args(env, tmp_path)
    args[args.index("--device") + 1] = "cuda"
    rc, _, err = run(capsys, *args)
    assert_one_line_error(rc, err, "--device cuda", "CUDA is not available")
    assert not (tmp_path / "run").exists()


def test_bf16_where_unsupported(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_cpu_bf16_autocast_ok", lambda: False)  # a torch build without CPU bf16 autocast
    rc, _, err = run(capsys, *_train_args(env, tmp_path, "--precision", "bf16"))
    assert_one_line_error(rc, err, "--precision bf16", "fp32")
    assert not (tmp_path / "run").exists()


def test_bf16_training_runs_on_the_cpu(env, capsys, tmp_path):
    rc, _, err = run(capsys, *_train_args(env, tmp_path, "--precision", "bf16"))
    assert rc == 0, err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-1]["rec_loss"])


def test_bad_inputs_of_the_model_commands(env, capsys, tmp_path):
    rc, _, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "o", tmp_path / "nope.png")
    assert_one_line_error(rc, err, "nope.png", "no such file")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG nope")
    rc, _, err = run(capsys, "reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "o", bad)
    assert_one_line_error(rc, err, "cannot read image", "bad.png")
    np.save(tmp_path / "c.npy", np.full((4, 4), 999, dtype=np.int64))
    rc, _, err = run(capsys, "decode", "--checkpoint", env / "vq", "--out", tmp_path / "o", tmp_path / "c.npy")
    assert_one_line_error(rc, err, "must lie in [0, 32)")
    rc, _, err = run(capsys, "sample", "--checkpoint", env / "gpt", "--out", tmp_path / "o", "--class-label", "7")
    assert_one_line_error(rc, err, "--class-label 7", "0..1")
    rc, _, err = run(capsys, "reconstruct", "--checkpoint", tmp_path / "none", "--out", tmp_path / "o",
                     env / "data" / "cats" / "img0.png")
    assert_one_line_error(rc, err, "does not exist")


def test_info_is_still_there(capsys):
    rc, out, _ = run(capsys, "info", "--json")
    assert rc == 0 and "torch" in json.loads(out)


def test_inference_commands_do_not_import_the_training_code(env, tmp_path):
    """reconstruct, encode, decode, sample and info need vqkernels.runs, not vqkernels.train (nor the demo)."""
    img = env / "data" / "cats" / "img0.png"
    commands = [["reconstruct", "--checkpoint", env / "vq", "--out", tmp_path / "rec", img],
                ["encode", "--checkpoint", env / "vq", "--out", tmp_path / "codes", img],
                ["decode", "--checkpoint", env / "vq", "--out", tmp_path / "dec", tmp_path / "codes" / "img0.npy"],
                ["sample", "--checkpoint", env / "gpt", "--n", "2", "--class-label", "0", "--out", tmp_path / "s"],
                ["info"]]
    code = ("import json, sys\n"
            "from vqkernels import cli\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    assert cli.main(argv + (['--device', 'cpu'] if argv[0] != 'info' else [])) == 0, argv\n"
            "    loaded = [m for m in ('vqkernels.train', 'vqkernels.demo') if m in sys.modules]\n"
            "    assert not loaded, f'{argv[0]} imported {loaded}'\n")
    p = subprocess.run([sys.executable, "-c", code, json.dumps([[str(a) for a in c] for c in commands])],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "rec" / "img0.png").is_file() and (tmp_path / "s" / "samples.png").is_file()


def test_flags_come_from_the_config_fields(capsys):
    """Every scalar field of a training config is a flag whose --help gives the field's default."""
    from vqkernels.runs import GPTTrainConfig, VQGANTrainConfig, flag_fields

    for cmd, cls in (("train-vqgan", VQGANTrainConfig), ("train-gpt", GPTTrainConfig)):
        rc, out, _ = run(capsys, cmd, "--help")
        assert rc == 0
        text = " ".join(out.split())  # (argparse wraps lines)
        for f, tp, _ in flag_fields(cls):
            assert "--" + f.name.replace("_", "-") in text, f.name
        assert "--steps STEPS total optimizer steps of the run (default: 2000)" in text
        assert "(default: runs/vqgan)" in text if cls is VQGANTrainConfig else "(default: runs/gpt)" in text
    assert "(default: 0.0006)" in text and "(default: cosine)" in text  # (train-gpt's) the GPT's own defaults
    assert {"lr", "steps", "vqgan", "conditional", "pkeep"} <= {f.name for f, _, _ in flag_fields(GPTTrainConfig)}
    assert "model" not in {f.name for f, _, _ in flag_fields(GPTTrainConfig)}  # mappings are YAML-only
    rc, out, _ = run(capsys, "demo", "--help")
    assert rc == 0 and "(default: 10.0)" in out and "(default: vqkernels-demo)" in out
    assert "--digits-minutes" in out and "(default: 4.0)" in out


def test_bench_is_no_longer_a_subcommand(capsys):
    rc, _, err = run(capsys, "bench", "--help")
    assert rc == 2 and "invalid choice: 'bench'" in err


def test_demo_refuses_an_existing_demo(capsys, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    rc, _, err = run(capsys, "demo", "--out", tmp_path, "--minutes", "1")
    assert_one_line_error(rc, err, "already holds a demo", "--overwrite")
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_selftest_and_eval_are_subcommands(capsys, tmp_path):
    from vqkernels.cli import main

    # one small op on the CPU: every backend it has here passes, one line each and a summary
    assert main(["selftest", "--device", "cpu", "--op", "code_usage"]) == 0
    out = capsys.readouterr().out
    assert "code_usage" in out and "selftest:" in out and "FAILED" not in out
    # eval's bad input is one line and status 2, through the same command
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqkernels eval:"), err
