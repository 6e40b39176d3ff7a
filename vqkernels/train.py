"""Training loops: the VQGAN (first stage) and the GPT over its codes (second stage).

A run lives in one folder (``--out``)::

    train_config.json               the resolved training config (what --resume continues)
    log.jsonl                       one JSON object per logged step (losses, lr, images/s)
    images/step_XXXXXXXX.png        periodic grids (originals beside reconstructions, or samples)
    checkpoints/step_XXXXXXXX/      config.json + model.safetensors (the model's save_pretrained: load it
                                    with VQModel / VQGANTransformer .from_pretrained), other modules'
                                    weights as .safetensors, trainer.pt (optimizer, scheduler and RNG
                                    states, the step: tensors and plain values only, read with
                                    torch.load(weights_only=True))
    latest                          the name of the newest complete checkpoint

A checkpoint is written into a temporary folder that is renamed into place, then ``latest`` is replaced
through a temporary file: a crash at any moment leaves the previous checkpoint readable and ``latest``
pointing at a complete one. ``--resume`` restores weights, optimizer and scheduler states, the RNG states
of torch, numpy and Python, and the position in the data (the batch of step s is a function of the seed
and s, see :mod:`vqkernels.data`), so on the CPU N steps + resume + N steps equal 2N steps bit for bit.
Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and stops; a second Ctrl-C stops at once.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model trains with DistributedDataParallel (nccl on GPUs, gloo on
CPUs), each rank reading its own part of every batch (``DistributedSampler``); rank 0 writes everything.
The quantizer synchronises its codebook statistics across ranks by itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import EMBEDDED_HELD_OUT, DataError, SeededBatches, default_workers, open_dataset
from .models._checkpoint import atomic_path, atomic_write, usual_mode

__all__ = [
    "TrainError", "VQGANTrainConfig", "GPTTrainConfig", "train_vqgan", "train_gpt", "resolve_config",
    "load_model", "checkpoint_dir", "evaluate_vqgan", "evaluate_gpt", "has_run", "run_demo",
]


class TrainError(Exception):
    """A problem with the user's input (config, data, folders, checkpoints): the message is one line."""


# ---------------------------------------------------------------------------------------------
# configs

# the demo's first stage, and the default of train-vqgan: small enough for a CPU (f=4, 512 codes of 32, an
# EMA codebook with dead-code restarts, which keeps most of the codebook in use)
SMALL_VQGAN = dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=64, resolution=64,
                   n_embed=512, embed_dim=32, decay=0.99, threshold_ema_dead_code=1.0)
SMALL_GPT = dict(n_layer=4, n_head=4, n_embd=256)


@dataclass
class VQGANTrainConfig:
    data: str = "embedded"             # a folder of images, or "embedded" (scikit-image's photographs)
    out: str = "runs/vqgan"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 4.5e-4                 # the generator's (encoder, decoder, codebook) learning rate
    disc_lr: float | None = None       # the discriminator's (None: lr)
    betas: tuple = (0.5, 0.9)          # taming's Adam betas
    adam_eps: float = 1e-8             # Adam's eps (torch's default, as taming)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"         # or "cosine" (to 10% of lr at the last step)
    seed: int = 0
    device: str = "auto"               # auto: cuda when available, else cpu
    precision: str = "fp32"            # or "bf16" (autocast)
    compile: bool = False
    channels_last: bool | None = None  # None: on CUDA only (where cuDNN's NHWC convolutions pay off)
    crop_size: int = 64
    resize: int | None = None          # short side before cropping (folders only; None: as is)
    num_workers: int | None = None     # None: default_workers()
    log_every: int = 10
    image_every: int = 250
    checkpoint_every: int = 500
    minutes: float | None = None       # stop (with a checkpoint) after this much training time
    model: dict = field(default_factory=dict)   # VQGANConfig fields over SMALL_VQGAN
    loss: dict = field(default_factory=dict)    # VQGANLoss arguments over the defaults below

    kind: typing.ClassVar[str] = "vqgan"


VQGAN_LOSS_DEFAULTS = dict(disc_start=10_000, disc_weight=0.8, codebook_weight=1.0, perceptual_weight=1.0)


@dataclass
class GPTTrainConfig:
    vqgan: str = ""                    # the first stage: a train-vqgan run folder or a save_pretrained folder
    data: str = "embedded"
    out: str = "runs/gpt"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 6e-4
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    crop_size: int = 64
    resize: int | None = None
    num_workers: int | None = None
    conditional: bool = False          # class-conditional on the top-level subfolder (embedded: the photograph)
    pkeep: float = 1.0                 # taming's token corruption: keep each input token with this probability
    log_every: int = 10
    image_every: int = 500
    checkpoint_every: int = 500
    minutes: float | None = None
    model: dict = field(default_factory=dict)   # GPTConfig fields over SMALL_GPT (vocab and block size are derived)

    kind: typing.ClassVar[str] = "gpt"


# what may change when a run is resumed; everything else must match the checkpoint
RESUMABLE = {"steps", "out", "device", "compile", "channels_last", "num_workers", "log_every", "image_every",
             "checkpoint_every", "minutes"}


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is tuple:
        return isinstance(value, (list, tuple))
    if tp is dict:
        return isinstance(value, dict)
    return True


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a list",
               dict: "a mapping", type(None): "null"}


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return _TYPE_NAMES.get(tp, str(tp))


def config_from_dict(cls, d: dict, where: str):
    """A training config from a mapping (YAML, flags, a checkpoint), checking names and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise TrainError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(names)}")
    for k, v in d.items():
        if not _type_ok(v, hints[k]):
            raise TrainError(f"{where}: {k} must be {_type_name(hints[k])}, got {v!r}")
    cfg = cls(**{k: (tuple(v) if hints[k] is tuple else v) for k, v in d.items()})
    for k in ("steps", "batch_size", "crop_size"):
        if getattr(cfg, k) <= 0:
            raise TrainError(f"{where}: {k} must be a positive integer, got {getattr(cfg, k)}")
    for k in ("lr", "disc_lr"):
        v = getattr(cfg, k, None)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise TrainError(f"{where}: {k} must be a positive number, got {v}")
    for k in ("log_every", "image_every", "checkpoint_every"):
        if getattr(cfg, k) <= 0:
            raise TrainError(f"{where}: {k} must be a positive integer, got {getattr(cfg, k)}")
    if cfg.warmup_steps < 0:
        raise TrainError(f"{where}: warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.precision not in ("fp32", "bf16"):
        raise TrainError(f"{where}: precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.schedule not in ("constant", "cosine"):
        raise TrainError(f"{where}: schedule must be constant or cosine, got {cfg.schedule!r}")
    if cfg.minutes is not None and not cfg.minutes > 0:
        raise TrainError(f"{where}: minutes must be a positive number, got {cfg.minutes}")
    if cfg.resize is not None and cfg.resize <= 0:
        raise TrainError(f"{where}: resize must be a positive integer, got {cfg.resize}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise TrainError(f"{where}: num_workers must be >= 0, got {cfg.num_workers}")
    if isinstance(cfg, GPTTrainConfig) and not 0 < cfg.pkeep <= 1:
        raise TrainError(f"{where}: pkeep must be in (0, 1], got {cfg.pkeep}")
    return cfg


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def resolve_config(cls, overrides: dict, out: str | None, *, resume: bool, where: str = "config"):
    """The config of a run: the defaults (or, with ``resume``, the checkpoint's config) with ``overrides``
    (YAML keys and flags the user gave) on top. A resumed run refuses overrides of anything but RESUMABLE."""
    out = overrides.get("out", out)
    if not resume:
        return config_from_dict(cls, dict(overrides), where)
    if out is None:
        raise TrainError("--resume needs --out (the run folder to continue)")
    ck = checkpoint_dir(out, required_for="--resume")
    saved = _read_json(ck / "train_config.json", "the checkpoint's training config")
    if saved.get("kind") != cls.kind:
        raise TrainError(f"--resume: {out} holds a {saved.get('kind')} run, not a {cls.kind} run")
    saved = {k: v for k, v in saved.items() if k != "kind"}
    clash = []
    for k, v in overrides.items():
        if k in RESUMABLE or k not in saved:
            continue
        if _jsonable(v) != _jsonable(saved[k]):
            clash.append(f"{k}={_jsonable(v)!r} (checkpoint: {saved[k]!r})")
    if clash:
        raise TrainError(f"the checkpoint's config does not match: {'; '.join(clash)}; a resumed run keeps its "
                         f"config (only {', '.join(sorted(RESUMABLE))} may change): drop those settings, or start "
                         f"a new run with --overwrite or another --out")
    merged = {**saved, **{k: v for k, v in overrides.items() if k in RESUMABLE}, "out": out}
    return config_from_dict(cls, merged, f"checkpoint {ck}")


# ---------------------------------------------------------------------------------------------
# run folders and checkpoints

def has_run(out) -> bool:
    out = Path(out)
    return any((out / n).exists() for n in ("latest", "checkpoints", "log.jsonl", "train_config.json"))


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise TrainError(f"{what} is missing: {path}") from None
    except (OSError, ValueError) as e:
        raise TrainError(f"{what} cannot be read ({path}): {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise TrainError(f"{what} is not a JSON object: {path}")
    return d


def checkpoint_dir(path, *, required_for: str = "--checkpoint") -> Path:
    """The model folder of ``path``: a run folder's latest checkpoint, or ``path`` itself when it holds
    config.json + model.safetensors (a save_pretrained folder)."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"{required_for}: {p} does not exist")
    latest = p / "latest"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        ck = p / name
        if not name or not (ck / "model.safetensors").is_file():
            raise TrainError(f"{required_for}: {latest} names {name!r}, which is not a complete checkpoint")
        return ck
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    raise TrainError(f"{required_for}: {p} holds no checkpoint (no 'latest' file, no config.json + model.safetensors)")


def model_kind(ck: Path) -> str:
    """"vqgan" or "gpt": what model a checkpoint folder holds (from the safetensors metadata)."""
    from safetensors import safe_open

    w = ck / "model.safetensors"
    try:
        with safe_open(str(w), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt headers
        raise TrainError(f"checkpoint file {w} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    name = meta.get("model", "")
    if name == "VQModel":
        return "vqgan"
    if name in ("VQGANTransformer", "GPT"):
        return "gpt"
    raise TrainError(f"checkpoint {ck}: model.safetensors holds a {name or 'unnamed'} model, not a VQModel or "
                     f"VQGANTransformer")


def load_model(path, kind: str, device="cpu"):
    """Load a ``kind`` ("vqgan" / "gpt") model from a run or model folder, with one-line errors."""
    ck = checkpoint_dir(path)
    found = model_kind(ck)
    if found != kind:
        want = {"vqgan": "a VQGAN (train-vqgan) checkpoint", "gpt": "a GPT (train-gpt) checkpoint"}[kind]
        raise TrainError(f"--checkpoint {path} is a {found.upper()} checkpoint; this command needs {want}")
    cls = _vqgan_classes()[0] if kind == "vqgan" else _two_stage_class()
    try:
        model = cls.from_pretrained(str(ck), map_location="cpu")
    except TrainError:
        raise
    except Exception as e:
        raise TrainError(f"checkpoint {ck} cannot be loaded (truncated, corrupt or not matching its config): "
                         f"{_first_line(e)}") from None
    return model.to(device).eval()


def _first_line(e: BaseException) -> str:
    """An exception's message on one line (a multi-line list of problems joined with '; ')."""
    s = "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return (s or type(e).__name__)[:800]


def _vqgan_classes():
    from .models.losses import VQGANLoss
    from .models.vqgan import VQGANConfig, VQModel

    return VQModel, VQGANConfig, VQGANLoss


def _two_stage_class():
    from .models.two_stage import VQGANTransformer

    return VQGANTransformer


def _save_module_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def _load_module_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise TrainError(f"checkpoint file {path} is truncated or corrupt: {_first_line(e)}") from None
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise TrainError(f"checkpoint file {path} does not match the model: {_first_line(e)}") from None


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _start_rngs_and_wrap(model, state, cfg, d, device):
    """The random streams from here on (a resumed run's, restored per rank; else seeded per rank), and the model as
    the loop calls it: under DDP when there are several processes, compiled under --compile."""
    if state is not None:
        rngs = state["rng"]
        _set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
    else:
        # each rank draws its own random numbers (dropout, restarts); rank 0's stream is a single process's, so
        # one process and rank 0 of several make the same draws
        torch.manual_seed(cfg.seed + d.rank)
    net = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class _RunFolder:
    """Writes a run folder (rank 0 only; other ranks hold a _RunFolder that writes nothing)."""

    def __init__(self, out, writer: bool):
        self.out, self.writer = Path(out), writer
        self.ck_root = self.out / "checkpoints"

    def prepare(self, config, *, resume: bool, overwrite: bool) -> None:
        if not self.writer:
            return
        if not resume and overwrite:
            for n in ("latest", "log.jsonl", "train_config.json"):
                with contextlib.suppress(FileNotFoundError):
                    (self.out / n).unlink()
            for n in ("checkpoints", "images"):
                shutil.rmtree(self.out / n, ignore_errors=True)
        self.ck_root.mkdir(parents=True, exist_ok=True)
        (self.out / "images").mkdir(exist_ok=True)
        _atomic_write_text(self.out / "train_config.json", json.dumps(_config_json(config), indent=2) + "\n")

    def truncate_log(self, step: int) -> None:
        """A resumed run drops the log lines after its checkpoint (they are about to be redone)."""
        log = self.out / "log.jsonl"
        if not self.writer or not log.exists():
            return
        keep = []
        for line in log.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
        _atomic_write_text(log, "".join(s + "\n" for s in keep))

    def log(self, record: dict) -> None:
        if self.writer:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, step: int, config, model, modules: dict, trainer_state: dict, keep: int = 2) -> Path:
        """One complete checkpoint (see the module doc for why it is written this way)."""
        if not self.writer:
            return self.ck_root
        name = f"step_{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.ck_root, prefix=f".{name}."))
        usual_mode(tmp, directory=True)
        try:
            model.save_pretrained(str(tmp))
            for n, m in modules.items():
                _save_module_safetensors(m, tmp / f"{n}.safetensors")
            torch.save(trainer_state, tmp / "trainer.pt")
            (tmp / "train_config.json").write_text(json.dumps(_config_json(config), indent=2) + "\n", encoding="utf-8")
            for f in tmp.iterdir():  # (safetensors writes its files 0600)
                usual_mode(f)
            final = self.ck_root / name
            if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
                old = self.ck_root / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _atomic_write_text(self.out / "latest", f"checkpoints/{name}\n")
        done = sorted(p for p in self.ck_root.glob("step_*") if p.is_dir())
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        return final


def _config_json(config) -> dict:
    return {"kind": config.kind, **_jsonable(dataclasses.asdict(config))}


def _load_trainer_state(ck: Path) -> dict:
    path = ck / "trainer.pt"
    if not path.is_file():
        raise TrainError(f"checkpoint {ck} has no trainer.pt (a model-only folder cannot be resumed)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"checkpoint file {path} is truncated or corrupt: {_first_line(e)}") from None


# ---------------------------------------------------------------------------------------------
# devices, processes, precision

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; refuses a device this machine does not have."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise TrainError(f"--device: {name!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name}: CUDA is not available on this machine (torch.cuda.is_available() "
                             f"is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise TrainError(f"--device {name}: only cpu and cuda are supported")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    if precision != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                         f"use --precision fp32")
    if device.type == "cpu" and not _cpu_bf16_autocast_ok():
        raise TrainError("--precision bf16: this torch build has no bfloat16 autocast on the CPU; use --precision fp32")


def _cpu_bf16_autocast_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


def _init_distributed(device: torch.device) -> tuple[_Dist, torch.device]:
    if dist.is_available() and dist.is_initialized():  # initialised by the caller (tests, notebooks)
        d = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        d = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)
    else:
        return _Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return d, device


def _check_out_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test."):
            pass
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _prepare_out(config, *, resume: bool, overwrite: bool, d: _Dist) -> None:
    out = Path(config.out)
    if d.main:
        if out.exists() and not out.is_dir():
            raise TrainError(f"--out {out} is a file, not a folder")
        if not resume and not overwrite and has_run(out):
            raise TrainError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to "
                             f"start over")
        _check_out_writable(out)


# ---------------------------------------------------------------------------------------------
# the training loop machinery shared by both stages

class _StopFlag:
    """SIGINT sets a flag (the loop saves and stops after the current step); a second SIGINT raises."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Clock:
    """Training time so far; with a time budget (``minutes``) the cosine schedule follows whichever of the
    steps or the time runs out first (a budgeted run is not reproducible step for step anyway)."""

    def __init__(self, cfg):
        self.budget = cfg.minutes * 60 if cfg.minutes else None
        self.start = time.perf_counter()

    def fraction(self) -> float:
        return 0.0 if self.budget is None else (time.perf_counter() - self.start) / self.budget


def _lr_lambda(cfg, clock: _Clock | None = None):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            if clock is not None:
                t = max(t, clock.fraction())
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return f


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _loader(dataset, cfg, start_step: int, d: _Dist, device: torch.device):
    from torch.utils.data import DataLoader

    sampler = SeededBatches(dataset, cfg.batch_size, cfg.seed, start_step=start_step, rank=d.rank, world=d.world,
                            steps=cfg.steps)
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    # its own generator: creating the iterator would otherwise draw from the global RNG, which a resumed run
    # does at another step than an uninterrupted one (the batches themselves never use it: see data.py)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed))


def _allreduce_mean_grads(params, d: _Dist) -> None:
    """Average gradients across ranks for a module outside DDP (the discriminator: see train_vqgan)."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(d.world)


def _gather_rng(d: _Dist) -> list:
    state = _rng_state()
    if d.world == 1:
        return [state]
    states = [None] * d.world
    dist.all_gather_object(states, state)
    return states


def _scalar(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


def _save_grid(path: Path, rows: list[torch.Tensor], nrow: int) -> None:
    """A PNG grid of (N, 3, H, W) tensors in [-1, 1], written atomically."""
    from torchvision.utils import save_image

    x = torch.cat([r.detach().float().cpu() for r in rows]).clamp(-1, 1) * 0.5 + 0.5
    with atomic_path(path, suffix=".png") as tmp:  # (save_image picks the format from the extension)
        save_image(x, tmp, nrow=nrow, padding=2, pad_value=1.0)


class _Progress:
    def __init__(self, cfg, start: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        # a time-budgeted run ends when its time is up: no step total (and no misleading ETA) then
        total = cfg.steps if cfg.minutes is None else None
        self.bar = tqdm(total=total, initial=start, disable=not enabled, desc=desc, dynamic_ncols=True,
                        unit="step", smoothing=0.1)

    def update(self, logs: dict):
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()}, refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _open_data(cfg, d: _Dist):
    try:
        train, held = open_dataset(cfg.data, cfg.crop_size, cfg.resize)
    except DataError as e:
        raise TrainError(str(e)) from None
    return train, held


def _setup(cfg, resume: bool, overwrite: bool):
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    d, device = _init_distributed(device)
    return d, device


def _finish(d: _Dist):
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# stage 1: the VQGAN

def build_vqgan(cfg: VQGANTrainConfig):
    VQModel, VQGANConfig, VQGANLoss = _vqgan_classes()
    try:
        mcfg = VQGANConfig.from_dict({**SMALL_VQGAN, "resolution": cfg.crop_size, **cfg.model})
    except (ValueError, TypeError) as e:
        raise TrainError(f"model config: {_first_line(e)}") from None
    f = mcfg.downsample_factor
    if cfg.crop_size % f:
        raise TrainError(f"crop_size {cfg.crop_size} must be a multiple of the model's downsampling factor {f}")
    model = VQModel(mcfg)
    try:
        loss = VQGANLoss(**{**VQGAN_LOSS_DEFAULTS, **cfg.loss})
    except (TypeError, ValueError) as e:
        raise TrainError(f"loss config: {_first_line(e)}") from None
    return model, loss


@torch.no_grad()
def evaluate_vqgan(model, images: torch.Tensor, batch_size: int = 32, device=None) -> dict:
    """Held-out metrics of a VQModel on (N, 3, H, W) images in [-1, 1] -> (metrics, reconstructions): PSNR and
    SSIM (on [0, 1], averaged over images), the fraction of codes used and the perplexity of their use."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    recs, idx = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        quant, _, (_, _, ind) = model.encode(x)
        recs.append(model.decode(quant).float().clamp(-1, 1).cpu())
        idx.append(ind.reshape(-1).cpu())
    model.train(was)
    rec = torch.cat(recs)
    a, b = images.float() * 0.5 + 0.5, rec * 0.5 + 0.5
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    psnr = float((10 * torch.log10(1.0 / mse)).mean())
    # over all pixels at once: flat crops (sky, walls), easy to reconstruct, weigh less than in the mean above
    psnr_pooled = float(10 * torch.log10(1.0 / mse.mean()))
    counts = torch.bincount(torch.cat(idx), minlength=model.config.n_embed).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"psnr": psnr, "psnr_pooled": psnr_pooled, "ssim": _ssim(a, b), "codebook_usage": float((counts > 0).double().mean()),
            "codes_used": int((counts > 0).sum()), "perplexity": perplexity, "images": int(images.shape[0])}, rec


def _ssim(a: torch.Tensor, b: torch.Tensor):
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    vals = [structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), channel_axis=2,
                                  data_range=1.0) for x, y in zip(a, b)]
    return float(np.mean(vals))


def _vqgan_trainer_state(step, opt_g, opt_d, sch_g, sch_d, d):
    return {"step": step, "world": d.world, "optimizer_g": opt_g.state_dict(), "optimizer_d": opt_d.state_dict(),
            "scheduler_g": sch_g.state_dict(), "scheduler_d": sch_d.state_dict(), "rng": _gather_rng(d)}


def _in_run(loop, cfg, resume, overwrite, progress, echo) -> dict:
    """Set up the run (folder, process group, device), run ``loop`` in it, and always finish it."""
    d, device = _setup(cfg, resume, overwrite)
    try:
        return loop(cfg, resume, overwrite, progress, echo, d, device)
    finally:
        _finish(d)


def train_vqgan(cfg: VQGANTrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                echo=print) -> dict:
    """Train the first stage (see the module doc). Returns a summary: steps done, whether interrupted,
    wall time, images/s, the last logged losses, and the run folder's newest checkpoint."""
    return _in_run(_train_vqgan, cfg, resume, overwrite, progress, echo)


def _train_vqgan(cfg, resume, overwrite, progress, echo, d, device):
    train_set, held = _open_data(cfg, d)
    _seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model, loss_fn = build_vqgan(cfg)
    # only now, with the data and the config known to be usable, is the output folder touched
    _prepare_out(cfg, resume=resume, overwrite=overwrite, d=d)
    run = _RunFolder(cfg.out, d.main)
    start = 0
    state = None
    if resume:
        ck = checkpoint_dir(cfg.out, required_for="--resume")
        state = _load_trainer_state(ck)
        _load_module_safetensors(model, ck / "model.safetensors")
        _load_module_safetensors(loss_fn.discriminator, ck / "discriminator.safetensors")
        start = int(state["step"])
    run.prepare(cfg, resume=resume, overwrite=overwrite)
    if resume:
        run.truncate_log(start)

    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=mf).train()
    loss_fn.to(device, memory_format=mf).train()
    disc = loss_fn.discriminator
    g_params = [p for p in model.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(g_params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                              weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                              weight_decay=cfg.weight_decay)
    clock = _Clock(cfg)
    sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_lambda(cfg, clock))
    sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _lr_lambda(cfg, clock))
    if state is not None:
        if state.get("world", 1) != d.world:
            warnings.warn(f"resuming a run of {state.get('world')} process(es) on {d.world}: the data order changes")
        opt_g.load_state_dict(state["optimizer_g"])
        opt_d.load_state_dict(state["optimizer_d"])
        sch_g.load_state_dict(state["scheduler_g"])
        sch_d.load_state_dict(state["scheduler_d"])
    net = _start_rngs_and_wrap(model, state, cfg, d, device)
    disc_start = loss_fn.discriminator_iter_start

    # a fixed batch for the periodic pictures: held-out crops when there are, else the first training items
    show = (torch.stack([held[i] for i in range(min(8, len(held)))]) if held is not None and len(held)
            else torch.stack([train_set[(i, i)] for i in range(min(8, len(train_set)))]))
    loader = _loader(train_set, cfg, start, d, device)
    bar = _Progress(cfg, start, progress and d.main, "vqgan")
    step, t_start, seen = start, time.perf_counter(), 0
    clock.start = t_start
    t_log, n_log = time.perf_counter(), 0
    interrupted = False
    logs = {}
    with _StopFlag() as stop:
        for batch in loader:
            x = batch.to(device, non_blocking=True).contiguous(memory_format=mf)
            # generator step (optimizer_idx 0); the discriminator's weights are frozen for it (as Lightning does)
            disc.requires_grad_(False)
            with _autocast(device, cfg.precision):
                xrec, qloss = net(x)
                gloss, glog = loss_fn(qloss, x, xrec, 0, step, last_layer=model.get_last_layer(), split="train")
            opt_g.zero_grad(set_to_none=True)
            gloss.backward()
            opt_g.step()
            sch_g.step()
            disc.requires_grad_(True)
            # discriminator step (optimizer_idx 1): before disc_start its loss is 0 * d_loss, which leaves
            # AdamW's state at zero; skipping it saves the time and changes nothing but the step counter
            dlog = {}
            if step >= disc_start:
                with _autocast(device, cfg.precision):
                    dloss, dlog = loss_fn(qloss, x, xrec.detach(), 1, step, last_layer=model.get_last_layer(),
                                          split="train")
                opt_d.zero_grad(set_to_none=True)
                dloss.backward()
                # the discriminator is called inside the loss module, outside DDP: average its gradients here
                _allreduce_mean_grads(disc.parameters(), d)
                opt_d.step()
            with warnings.catch_warnings():  # "scheduler before optimizer": true and harmless before disc_start
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                sch_d.step()
            step += 1
            seen += x.shape[0] * d.world
            n_log += x.shape[0] * d.world
            budget = cfg.minutes is not None and time.perf_counter() - t_start >= cfg.minutes * 60
            stopping = _agree(stop.stop or budget, d, device)
            if step % cfg.log_every == 0 or step == cfg.steps or stopping:
                now = time.perf_counter()
                logs = {k.split("/", 1)[-1]: _scalar(v) for k, v in {**glog, **dlog}.items()}
                logs = {"rec_loss": logs.get("rec_loss"), "quant_loss": logs.get("quant_loss"),
                        "total_loss": logs.get("total_loss"), **logs}
                rec = {"step": step, "time": round(now - t_start, 3), "lr": opt_g.param_groups[0]["lr"],
                       "images_per_s": round(n_log / max(now - t_log, 1e-9), 2), **logs}
                run.log(rec)
                t_log, n_log = now, 0
                bar.bar.set_postfix({"rec": f"{logs['rec_loss']:.4f}", "q": f"{logs['quant_loss']:.4f}",
                                     "img/s": f"{rec['images_per_s']:.1f}"}, refresh=False)
            bar.bar.update(1)
            if d.main and (step % cfg.image_every == 0 or step == cfg.steps or stopping):
                with torch.no_grad():
                    was = model.training
                    model.eval()
                    r = model(show.to(device))[0]
                    model.train(was)
                _save_grid(run.out / "images" / f"step_{step:08d}.png", [show, r.cpu()], nrow=show.shape[0])
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                state = _vqgan_trainer_state(step, opt_g, opt_d, sch_g, sch_d, d)
                run.save(step, cfg, model, {"discriminator": disc}, state)
            if stopping:
                interrupted = stop.stop
                break
    bar.close()
    wall = time.perf_counter() - t_start
    return {"steps": step, "interrupted": interrupted, "wall_s": wall, "images_per_s": seen / max(wall, 1e-9),
            "last": logs, "checkpoint": str(run.out / "latest"), "model": model, "held_out": held}


def _agree(flag: bool, d: _Dist, device=None) -> bool:
    """Every rank stops at the same step when any rank wants to (SIGINT reaches them at different times)."""
    if d.world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------
# stage 2: the GPT over the VQGAN's codes

def build_gpt(cfg: GPTTrainConfig, vqgan, n_classes: int | None):
    """A VQGANTransformer over the frozen ``vqgan`` (its config and weights), codes of crop_size crops."""
    from .models.gpt import GPTConfig
    from .models.two_stage import VQGANTransformer, VQGANTransformerConfig

    f = vqgan.config.downsample_factor
    if cfg.crop_size % f:
        raise TrainError(f"crop_size {cfg.crop_size} must be a multiple of the VQGAN's downsampling factor {f}")
    h = cfg.crop_size // f
    if n_classes is not None and n_classes > vqgan.config.n_embed:
        raise TrainError(f"{n_classes} classes: a class token shares the vocabulary with the {vqgan.config.n_embed} "
                         f"codes (as taming's), so there can be at most {vqgan.config.n_embed} classes")
    try:
        gcfg = GPTConfig.from_dict({**SMALL_GPT, **cfg.model, "vocab_size": vqgan.config.n_embed, "block_size": h * h})
        tcfg = VQGANTransformerConfig(gpt=gcfg, vqgan=vqgan.config, n_classes=n_classes, pkeep=cfg.pkeep,
                                      latent_size=(h, h))
    except (TypeError, ValueError) as e:
        raise TrainError(f"model config: {_first_line(e)}") from None
    model = VQGANTransformer(tcfg)
    model.first_stage_model.load_state_dict(vqgan.state_dict())
    return model


@torch.no_grad()
def evaluate_gpt(model, images: torch.Tensor, batch_size: int = 32, labels=None) -> float:
    """Mean cross-entropy (nats per code) of the model on (N, 3, H, W) images (labels (N,) if conditional)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        c = None if labels is None else labels[i:i + batch_size].to(device)
        loss = model.training_loss(x, c)
        total += float(loss) * x.shape[0]
        n += x.shape[0]
    model.train(was)
    return total / max(n, 1)


def _gpt_trainer_state(step, opt, sch, d):
    return {"step": step, "world": d.world, "optimizer": opt.state_dict(), "scheduler": sch.state_dict(),
            "rng": _gather_rng(d)}


def _gpt_param_groups(model, weight_decay: float):
    """Weight decay on matrices only (nanoGPT's rule): not on biases, norms, embeddings' positions."""
    decay, no_decay = [], []
    for p in model.transformer.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_gpt(cfg: GPTTrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
              echo=print) -> dict:
    """Train the second stage: a GPT over the codes of a frozen VQGAN (``cfg.vqgan``) of the data's crops.
    Returns a summary as :func:`train_vqgan` does, with the held-out validation loss when there is a split."""
    if not cfg.vqgan:
        raise TrainError("train-gpt needs the first stage: --vqgan DIR (a train-vqgan run or a VQModel folder)")
    return _in_run(_train_gpt, cfg, resume, overwrite, progress, echo)


def _train_gpt(cfg, resume, overwrite, progress, echo, d, device):
    vqgan = load_model(cfg.vqgan, "vqgan", "cpu")
    train_set, held = _open_data(cfg, d)
    n_classes = None
    if cfg.conditional:
        if not train_set.classes:
            raise TrainError(f"--conditional: {cfg.data} has no classes (put the images in one subfolder per class)")
        n_classes = len(train_set.classes)
        train_set.with_labels = True
    _seed_everything(cfg.seed)
    model = build_gpt(cfg, vqgan, n_classes)
    _prepare_out(cfg, resume=resume, overwrite=overwrite, d=d)
    run = _RunFolder(cfg.out, d.main)
    start, state = 0, None
    if resume:
        ck = checkpoint_dir(cfg.out, required_for="--resume")
        state = _load_trainer_state(ck)
        _load_module_safetensors(model, ck / "model.safetensors")
        start = int(state["step"])
    run.prepare(cfg, resume=resume, overwrite=overwrite)
    if resume:
        run.truncate_log(start)
    if d.main and n_classes is not None:
        _atomic_write_text(run.out / "classes.json", json.dumps(list(train_set.classes)) + "\n")

    model.to(device).train()
    opt = torch.optim.AdamW(_gpt_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    clock = _Clock(cfg)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, clock))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sch.load_state_dict(state["scheduler"])
    net = _start_rngs_and_wrap(model, state, cfg, d, device)

    held_images = (torch.stack([held[i] for i in range(len(held))]) if held is not None and len(held) else None)
    loader = _loader(train_set, cfg, start, d, device)
    bar = _Progress(cfg, start, progress and d.main, "gpt")
    step, t_start, seen = start, time.perf_counter(), 0
    clock.start = t_start
    t_log, n_log = time.perf_counter(), 0
    interrupted, logs = False, {}
    with _StopFlag() as stop:
        for batch in loader:
            x, c = (batch if n_classes is not None else (batch, None))
            x = x.to(device, non_blocking=True)
            c = None if c is None else c.to(device)
            with _autocast(device, cfg.precision):
                logits, target = net(x, c)
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                         target.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.transformer.parameters(), 1.0)
            opt.step()
            sch.step()
            step += 1
            seen += x.shape[0] * d.world
            n_log += x.shape[0] * d.world
            budget = cfg.minutes is not None and time.perf_counter() - t_start >= cfg.minutes * 60
            stopping = _agree(stop.stop or budget, d, device)
            if step % cfg.log_every == 0 or step == cfg.steps or stopping:
                now = time.perf_counter()
                logs = {"loss": float(loss.detach())}
                rec = {"step": step, "time": round(now - t_start, 3), "lr": opt.param_groups[0]["lr"],
                       "images_per_s": round(n_log / max(now - t_log, 1e-9), 2), **logs}
                run.log(rec)
                t_log, n_log = now, 0
                bar.bar.set_postfix({"loss": f"{logs['loss']:.4f}", "img/s": f"{rec['images_per_s']:.1f}"},
                                    refresh=False)
            bar.bar.update(1)
            if d.main and (step % cfg.image_every == 0 or step == cfg.steps or stopping):
                g = torch.Generator(device=device).manual_seed(cfg.seed)
                labels = None if n_classes is None else torch.arange(8, device=device) % n_classes
                imgs = model.sample(8, class_label=labels, top_k=100, generator=g)
                _save_grid(run.out / "images" / f"step_{step:08d}.png", [imgs.cpu()], nrow=8)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                run.save(step, cfg, model, {}, _gpt_trainer_state(step, opt, sch, d))
            if stopping:
                interrupted = stop.stop
                break
    bar.close()
    wall = time.perf_counter() - t_start
    val = evaluate_gpt(model, held_images) if held_images is not None and n_classes is None and d.main else None
    if val is not None:
        run.log({"step": step, "val_loss": val})
    return {"steps": step, "interrupted": interrupted, "wall_s": wall, "images_per_s": seen / max(wall, 1e-9),
            "last": logs, "val_loss": val, "checkpoint": str(run.out / "latest"), "model": model}


# ---------------------------------------------------------------------------------------------
# the demo: both stages on the embedded photographs, pictures and metrics

# What fits ~10 minutes of a 2-core CPU (see the README for a run's numbers): 32x32 crops, f=4 (8x8 codes),
# no perceptual or adversarial term (they cost more CPU time than they give PSNR here; train-vqgan has them).
DEMO_CROP = 32
DEMO_VQGAN = dict(batch_size=8, lr=1e-3, schedule="cosine", warmup_steps=50, log_every=10, image_every=500,
                  checkpoint_every=1000, model=dict(SMALL_VQGAN, ch=32, ch_mult=(1, 1, 2), resolution=DEMO_CROP),
                  loss=dict(perceptual_weight=0.0, disc_start=10 ** 9, disc_ndf=16, disc_num_layers=2))
DEMO_GPT = dict(batch_size=32, lr=1e-3, warmup_steps=50, schedule="cosine", log_every=10, image_every=500,
                checkpoint_every=1000, model=dict(n_layer=4, n_head=4, n_embd=192))
DEMO_SPLIT = (0.72, 0.2)  # of the time budget: VQGAN, GPT; the rest is evaluation and sampling


def run_demo(out="vqkernels-demo", minutes: float = 10.0, device="auto", seed: int = 0, overwrite: bool = False,
             progress: bool = True, echo=print) -> int:
    """``vqkernels demo``: train both stages on the embedded photographs within ``minutes``; write the
    pictures, loss curves, metrics.json and both checkpoints into ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    if not overwrite and any((out / n).exists() for n in ("vqgan", "gpt", "metrics.json")):
        raise TrainError(f"--out {out} already holds a demo; pass --overwrite to replace it")
    if minutes <= 0:
        raise TrainError(f"--minutes must be positive, got {minutes}")
    _check_out_writable(out)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    # each stage trains for its share of the budget, its cosine schedule following the time (see _Clock)
    vq_min, gpt_min = minutes * DEMO_SPLIT[0], minutes * DEMO_SPLIT[1]
    vcfg = config_from_dict(VQGANTrainConfig, dict(DEMO_VQGAN, data="embedded", out=str(out / "vqgan"), seed=seed,
                                                   device=str(dev), crop_size=DEMO_CROP, minutes=vq_min,
                                                   steps=_demo_steps("vqgan", vq_min, dev)), "demo")
    echo(f"stage 1/2: VQGAN on scikit-image's photographs ({vq_min:.1f} min)")
    s1 = train_vqgan(vcfg, overwrite=True, progress=progress)
    t1 = time.perf_counter()
    model, held = s1["model"], s1["held_out"]
    held_x = torch.stack([held[i] for i in range(len(held))])
    vmetrics, rec = evaluate_vqgan(model, held_x)
    pick = torch.linspace(0, len(held) - 1, 16).round().long()
    pairs = torch.stack([t for i in pick for t in (held_x[i], rec[i])])
    _save_grid(out / "reconstructions.png", [_upscale(pairs)], nrow=8)
    t2 = time.perf_counter()
    echo(f"held-out: PSNR {vmetrics['psnr']:.2f} dB, SSIM {vmetrics['ssim']:.3f}, "
         f"{vmetrics['codes_used']}/{model.config.n_embed} codes used")

    gpt_min = max(0.2, min(gpt_min, minutes - (t2 - t0) / 60 - 0.5))
    gcfg = config_from_dict(GPTTrainConfig, dict(DEMO_GPT, vqgan=str(out / "vqgan"), data="embedded",
                                                 out=str(out / "gpt"), seed=seed, device=str(dev),
                                                 crop_size=DEMO_CROP, minutes=gpt_min,
                                                 steps=_demo_steps("gpt", gpt_min, dev)), "demo")
    echo(f"stage 2/2: GPT over the VQGAN's codes ({gpt_min:.1f} min)")
    s2 = train_gpt(gcfg, overwrite=True, progress=progress)
    t3 = time.perf_counter()
    two = s2["model"].eval()
    g = torch.Generator(device=dev).manual_seed(seed)
    two.sample(2, top_k=100, generator=torch.Generator(device=dev).manual_seed(seed + 1))  # warm-up
    samples = two.sample(16, top_k=100, generator=g).float().clamp(-1, 1).cpu()
    stats = two.transformer.last_generate_stats
    _save_grid(out / "samples.png", [_upscale(samples)], nrow=8)
    _plot_losses(out / "vqgan" / "log.jsonl", out / "gpt" / "log.jsonl", out / "loss_curves.png")
    t4 = time.perf_counter()
    metrics = {
        "held_out": {"psnr_db": round(vmetrics["psnr"], 3), "psnr_db_all_pixels": round(vmetrics["psnr_pooled"], 3),
                     "ssim": None if vmetrics["ssim"] is None else round(vmetrics["ssim"], 4),
                     "codebook_usage": round(vmetrics["codebook_usage"], 4), "codes_used": vmetrics["codes_used"],
                     "codebook_size": model.config.n_embed, "perplexity": round(vmetrics["perplexity"], 2),
                     "crops": vmetrics["images"], "images": list(EMBEDDED_HELD_OUT)},
        "gpt": {"val_loss": None if s2["val_loss"] is None else round(s2["val_loss"], 4),
                "sampling_tokens_per_s": round(stats.tokens_per_s, 1), "sampled_images": 16,
                "tokens_per_image": int(two.config.latent_size[0] * two.config.latent_size[1])},
        "training": {"vqgan_steps": s1["steps"], "vqgan_images_per_s": round(s1["images_per_s"], 1),
                     "gpt_steps": s2["steps"], "gpt_images_per_s": round(s2["images_per_s"], 1),
                     "crop_size": DEMO_CROP, "batch_size": [vcfg.batch_size, gcfg.batch_size]},
        "wall_s": {"vqgan_train": round(t1 - t0, 1), "vqgan_eval": round(t2 - t1, 1), "gpt_train": round(t3 - t2, 1),
                   "sampling_and_plots": round(t4 - t3, 1), "total": round(t4 - t0, 1)},
        "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    echo(f"wrote {out}/reconstructions.png, samples.png, loss_curves.png, metrics.json; checkpoints {out}/vqgan, "
         f"{out}/gpt ({t4 - t0:.0f} s in all)")
    echo(json.dumps(metrics["held_out"]))
    return 0


def _demo_steps(stage: str, minutes: float, device: torch.device) -> int:
    """An upper bound on the steps of a stage: the time budget stops it, and its cosine schedule follows
    the time (see _Clock), so this only needs to be more than any machine does in that time."""
    return max(100, int(200 * minutes * 60))


def _upscale(x: torch.Tensor, min_side: int = 96) -> torch.Tensor:
    """Nearest-neighbour enlargement of small crops, so that a grid is visible at a glance."""
    k = max(1, -(-min_side // x.shape[-1]))
    return x.repeat_interleave(k, dim=-1).repeat_interleave(k, dim=-2) if k > 1 else x


def _plot_losses(vq_log: Path, gpt_log: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(p):
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if "val_loss" not in r], [r for r in rows if "val_loss" in r]

    (vq, _), (gp, gval) = read(vq_log), read(gpt_log)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in vq], [r["rec_loss"] for r in vq], label="reconstruction (L1)")
    ax[0].plot([r["step"] for r in vq], [r["quant_loss"] for r in vq], label="commitment")
    ax[0].set_yscale("log")
    ax[0].set_title("VQGAN")
    ax[0].set_xlabel("step")
    ax[0].legend()
    ax[1].plot([r["step"] for r in gp], [r["loss"] for r in gp], label="train")
    if gval:
        ax[1].scatter([r["step"] for r in gval], [r["val_loss"] for r in gval], color="C3", label="held-out", zorder=3)
    ax[1].set_title("GPT over the codes")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("cross-entropy (nats/code)")
    ax[1].legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
