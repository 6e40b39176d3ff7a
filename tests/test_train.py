"""vqkernels.train: resume bit for bit, atomic checkpoints, Ctrl-C, DDP on 2 CPU processes (tiny configs)."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqkernels import runs as R
from vqkernels import train as T

pytest.importorskip("vqkernels.models.two_stage")

TINY_VQGAN = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=32, decay=0.9,
                  threshold_ema_dead_code=1.0)
TINY_LOSS = dict(perceptual_weight=0.0, disc_start=2, disc_ndf=8, disc_num_layers=1)


def _images(root, n=10, size=(40, 44), seed=0, classes=None):
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # smooth random images (a low-resolution field, upsampled): something an autoencoder can learn
        low = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size[::-1], Image.BICUBIC)
        sub = root / (classes[i % len(classes)] if classes else "")
        sub.mkdir(exist_ok=True)
        img.save(sub / f"img{i}.png")
    return root


def _vq_cfg(data, out, steps, **kw):
    return T.config_from_dict(T.VQGANTrainConfig, {
        **dict(data=str(data), out=str(out), steps=steps, batch_size=4, crop_size=32, lr=2e-3, device="cpu", seed=3,
               log_every=1, image_every=1000, checkpoint_every=1000, num_workers=0, model=dict(TINY_VQGAN),
               loss=dict(TINY_LOSS)), **kw}, "test")


def _tensors(folder):
    from safetensors.torch import load_file

    ck = R.checkpoint_dir(folder)
    out = {f"{f.stem}.{k}": v for f in sorted(ck.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    state = torch.load(ck / "trainer.pt", weights_only=True)
    return out, state


def _assert_same_state(a, b):
    (wa, sa), (wb, sb) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert sa["step"] == sb["step"]
    for name in [k for k in sa if k.startswith("optimizer")]:
        for pid, st in sa[name]["state"].items():
            for key, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[name]["state"][pid][key])), (name, pid, key)
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])


def test_vqgan_resume_is_bit_exact(tmp_path):
    data = _images(tmp_path / "data")
    T.train_vqgan(_vq_cfg(data, tmp_path / "full", 6), progress=False)
    T.train_vqgan(_vq_cfg(data, tmp_path / "half", 3), progress=False)
    cfg = T.resolve_config(T.VQGANTrainConfig, {"steps": 6}, str(tmp_path / "half"), resume=True)
    s = T.train_vqgan(cfg, resume=True, progress=False)
    assert s["steps"] == 6
    full, half = _tensors(tmp_path / "full"), _tensors(tmp_path / "half")
    assert any(k.startswith("discriminator.") for k in full[0])  # the discriminator trained (disc_start=2)
    _assert_same_state(full, half)
    # the resumed run's log continues the first one's, without duplicated steps
    steps = [json.loads(line)["step"] for line in (tmp_path / "half" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_gpt_resume_is_bit_exact(tmp_path):
    data = _images(tmp_path / "data")
    T.train_vqgan(_vq_cfg(data, tmp_path / "vq", 2), progress=False)

    def cfg(out, steps):
        return T.config_from_dict(T.GPTTrainConfig, dict(
            vqgan=str(tmp_path / "vq"), data=str(data), out=str(out), steps=steps, batch_size=4, crop_size=16,
            device="cpu", seed=1, log_every=1, image_every=1000, checkpoint_every=1000, num_workers=0, pkeep=0.7,
            warmup_steps=2, model=dict(n_layer=1, n_head=2, n_embd=32, embd_pdrop=0.1)), "test")

    T.train_gpt(cfg(tmp_path / "full", 4), progress=False)
    T.train_gpt(cfg(tmp_path / "half", 2), progress=False)
    T.train_gpt(T.resolve_config(T.GPTTrainConfig, {"steps": 4}, str(tmp_path / "half"), resume=True),
                resume=True, progress=False)
    _assert_same_state(_tensors(tmp_path / "full"), _tensors(tmp_path / "half"))


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data = _images(tmp_path / "data", n=6)
    cfg = _vq_cfg(data, tmp_path / "run", 2)
    T.train_vqgan(cfg, progress=False)
    before = (tmp_path / "run" / "latest").read_text()
    real_save = torch.save

    def crash(obj, f, *a, **k):  # dies after writing part of the file
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    cfg4 = T.resolve_config(T.VQGANTrainConfig, {"steps": 4}, str(tmp_path / "run"), resume=True)
    with pytest.raises(OSError, match="simulated"):
        T.train_vqgan(cfg4, resume=True, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "run" / "latest").read_text() == before
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris
    s = T.train_vqgan(cfg4, resume=True, progress=False)  # the old checkpoint is intact: resume works
    assert s["steps"] == 4


def test_sigint_saves_a_checkpoint_then_stops(tmp_path, monkeypatch):
    data = _images(tmp_path / "data", n=6)
    cfg = _vq_cfg(data, tmp_path / "run", 50, loss=dict(TINY_LOSS, disc_start=1000))
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in a terminal
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    # (whatever handler was there: a process started in the background, as `make test &` or a CI runner may,
    # has SIGINT ignored, and training must put that back too)
    before = signal.getsignal(signal.SIGINT)
    s = T.train_vqgan(cfg, progress=False)
    assert s["interrupted"] and 3 <= s["steps"] < 50
    ck = R.checkpoint_dir(tmp_path / "run")
    assert ck.name == f"step_{s['steps']:08d}"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    umask = os.umask(0)
    os.umask(umask)
    assert ck.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder as mkdir makes it (mkdtemp's is 0700)
    for f in [*ck.iterdir(), tmp_path / "run" / "latest"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# -- two CPU processes (gloo) against one process on the concatenated batch -------------------------

# Adam normalises each gradient by its running RMS: with torch's eps (1e-8) a gradient that is zero up to rounding
# (which differs between 2 processes and 1, as all-reduce adds in another order) becomes a step of size lr with a
# random sign, so the weights could differ by 2 lr per step. With eps well above that rounding noise, an update is
# proportional to its gradient wherever the gradient is that small, and rounding stays rounding-sized.
ADAM_EPS = 1e-3


def _ddp_worker(rank, init_file, data, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # the discriminator stays off: its BatchNorm statistics are per process by design
        cfg = _vq_cfg(data, out, 3, batch_size=2, loss=dict(TINY_LOSS, disc_start=1000), adam_eps=ADAM_EPS,
                      model=dict(TINY_VQGAN, ch=64, threshold_ema_dead_code=0.0))
        T.train_vqgan(cfg, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_on_the_concatenated_batch(tmp_path):
    data = _images(tmp_path / "data", n=12)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(data), str(tmp_path / "ddp")), nprocs=2, join=True)
    cfg = _vq_cfg(data, tmp_path / "one", 3, batch_size=4, loss=dict(TINY_LOSS, disc_start=1000), adam_eps=ADAM_EPS,
                  model=dict(TINY_VQGAN, ch=64, threshold_ema_dead_code=0.0))
    T.train_vqgan(cfg, progress=False)
    (w2, s2), (w1, s1) = _tensors(tmp_path / "ddp"), _tensors(tmp_path / "one")
    assert s2["world"] == 2 and len(s2["rng"]) == 2
    # with ADAM_EPS (above) rounding differences stay small; the weights moved by up to ~6e-3 (lr 2e-3, 3 steps),
    # so the tolerance is a few percent of that; the attention's key bias has a
    # gradient of exactly zero in exact arithmetic (softmax ignores a shift) and is nothing but such noise
    compared = 0
    for k in w1:
        if not k.startswith("model.") or k.endswith("attn_1.k.bias"):
            continue
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=2e-4, msg=k)
        compared += 1
    assert compared > 50
    # and the run really trained (the comparison is not between two untouched initialisations)
    from vqkernels.models.vqgan import VQModel

    T._seed_everything(cfg.seed)
    fresh = T.build_vqgan(cfg)[0]  # the runs' initial weights
    assert not torch.equal(fresh.state_dict()["encoder.conv_in.weight"], w1["model.encoder.conv_in.weight"])
    assert isinstance(fresh, VQModel)


def test_a_killed_run_leaves_temporaries_that_the_next_start_sweeps(tmp_path):
    """SIGKILL while a checkpoint is written (nothing can clean up) leaves the temporary checkpoint folder with a
    half-written .model.safetensors.<random>.tmp; the next start removes it, and temporaries planted elsewhere in
    the run folder, and nothing else."""
    import subprocess
    import sys

    from vqkernels._io import is_temporary

    data = _images(tmp_path / "data", n=6)
    run = tmp_path / "run"
    T.train_vqgan(_vq_cfg(data, run, 2), progress=False)
    code = ("import os, signal, sys, safetensors.torch as st\n"
            "from vqkernels import train as T\n"
            "real = st.save_model\n"
            "def killed(model, filename, metadata=None):\n"
            "    real(model, filename, metadata=metadata)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "st.save_model = killed\n"
            "cfg = T.resolve_config(T.VQGANTrainConfig, {'steps': 4}, sys.argv[1], resume=True)\n"
            "T.train_vqgan(cfg, resume=True, progress=False)\n")
    p = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    left = [q for q in run.rglob("*") if is_temporary(q.name)]
    assert any(q.name.startswith(".model.safetensors.") and q.name.endswith(".tmp") for q in left), left
    assert any(q.parent.name == "checkpoints" and q.name.startswith(".step_00000004.") for q in left), left
    # what other writers killed at the wrong moment would leave, and files of the user's that must stay
    planted = [run / ".latest.k2j4h5g6.tmp", run / ".log.jsonl.a1b2c3d4.tmp",
               run / "images" / ".step_00000002.png.x9y8z7w6.tmp.png"]
    for q in planted:
        q.write_text("stale")
    keep = [run / "notes.txt", run / ".hidden", run / "images" / "mine.tmp"]
    for q in keep:
        q.write_text("mine")
    assert R.checkpoint_dir(run).name == "step_00000002"  # the kill left the previous checkpoint in place

    s = T.train_vqgan(T.resolve_config(T.VQGANTrainConfig, {"steps": 4}, str(run), resume=True), resume=True,
                      progress=False)
    assert s["steps"] == 4 and R.checkpoint_dir(run).name == "step_00000004"
    assert not [q for q in run.rglob("*") if is_temporary(q.name)]
    assert all(q.read_text() == "mine" for q in keep)
