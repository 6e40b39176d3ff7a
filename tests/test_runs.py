"""vqkernels.runs and vqkernels._io without training: configs (checked keys, types and ranges, one-line errors),
the atomic writers' temporaries and the sweep that removes those a killed process left."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vqkernels import _io
from vqkernels.runs import (GPTTrainConfig, TrainError, VQGANTrainConfig, config_from_dict, flag_fields,
                            range_problem)


@pytest.mark.parametrize("d,needle", [
    ({"steps": 0}, "test: steps must be a positive integer, got 0"),
    ({"lr": -1.0}, "test: lr must be a positive number, got -1.0"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
    ({"num_workers": -2}, "num_workers must be an integer >= 0"),
    ({"minutes": 0}, "minutes must be a positive number"),
    ({"schedule": "linear"}, "schedule must be one of 'constant', 'cosine', got 'linear'"),
    ({"precision": "fp8"}, "precision must be one of 'fp32', 'bf16'"),
    ({"steps": "ten"}, "steps must be an integer, got 'ten'"),
    ({"learning_rate": 1}, "unknown key(s) learning_rate"),
])
def test_config_errors_are_one_line_train_errors(d, needle):
    with pytest.raises(TrainError) as e:
        config_from_dict(VQGANTrainConfig, d, "test")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_defaults_per_stage_and_lists_to_tuples():
    v, g = config_from_dict(VQGANTrainConfig, {}, "t"), config_from_dict(GPTTrainConfig, {"betas": [0.8, 0.9]}, "t")
    assert (v.out, v.lr, v.schedule, v.betas) == ("runs/vqgan", 4.5e-4, "constant", (0.5, 0.9))
    assert (g.out, g.lr, g.schedule, g.betas, g.warmup_steps) == ("runs/gpt", 6e-4, "cosine", (0.8, 0.9), 100)
    with pytest.raises(TrainError, match="pkeep must be a number in"):
        config_from_dict(GPTTrainConfig, {"pkeep": 1.5}, "t")
    assert {f.name for f, _, _ in flag_fields(VQGANTrainConfig)} >= {"steps", "lr", "disc_lr", "channels_last"}
    assert range_problem("positive", 3, True) is None and range_problem(None, -1, True) is None


def test_the_temporaries_of_every_writer_match_the_sweep(tmp_path):
    names = []
    with _io.atomic_path(tmp_path / "a.txt") as t:
        names.append(os.path.basename(t))
        open(t, "w").close()
    with _io.atomic_path(tmp_path / "b.png", suffix=".png") as t:
        names.append(os.path.basename(t))
        assert t.endswith(".tmp.png")
        open(t, "w").close()
    with _io.atomic_folder(tmp_path / "step_1") as t:
        names.append(os.path.basename(t))
    assert all(_io.is_temporary(n) for n in names), names
    assert not any(_io.is_temporary(n) for n in ("a.txt", "step_1", ".hidden", "x.tmp", ".tmp", "latest"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.png", "step_1"]  # nothing left behind


def test_atomic_folder_replaces_an_existing_folder_and_cleans_up_on_failure(tmp_path):
    for content in ("old", "new"):
        with _io.atomic_folder(tmp_path / "ck") as t:
            open(os.path.join(t, "f"), "w").write(content)
    assert (tmp_path / "ck" / "f").read_text() == "new"
    with pytest.raises(RuntimeError):
        with _io.atomic_folder(tmp_path / "ck") as t:
            open(os.path.join(t, "f"), "w").write("half")
            raise RuntimeError("crash")
    assert (tmp_path / "ck" / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_sweep_removes_what_a_killed_writer_left(tmp_path):
    code = ("import os, signal, sys\n"
            "from vqkernels._io import atomic_path, atomic_folder\n"
            "with atomic_folder(os.path.join(sys.argv[1], 'ck')) as d:\n"
            "    with atomic_path(os.path.join(d, 'model.safetensors')) as t:\n"
            "        open(t, 'w').write('half')\n"
            "        with atomic_path(os.path.join(sys.argv[1], 'latest')) as u:\n"
            "            os.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "latest").write_text("checkpoints/step_1\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode < 0, p.stderr
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "latest")
    assert len(left) == 2 and all(_io.is_temporary(n) for n in left), left
    assert sorted(_io.sweep_temporaries(tmp_path)) == left
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    assert (tmp_path / "latest").read_text() == "checkpoints/step_1\n"
