"""What a training run is, without the training code: its config, its folder, its checkpoints; loading a trained
model; choosing the device. The CLI's inference commands (reconstruct, encode, decode, sample) need only this
module; ``vqkernels.train`` runs the training.

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
    classes.json                    a class-conditional GPT's class names (label i = classes[i])

A checkpoint is written into a temporary folder that is renamed into place, then ``latest`` is replaced
through a temporary file (:mod:`vqkernels._io`): a crash at any moment leaves the previous checkpoint readable
and ``latest`` pointing at a complete one. A run killed outright leaves its temporaries behind; the next start
in the folder removes them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ._config import Config, from_dict
from ._io import atomic_folder, atomic_write, sweep_temporaries

__all__ = [
    "TrainError", "TrainConfig", "VQGANTrainConfig", "GPTTrainConfig", "RESUMABLE", "config_from_dict",
    "resolve_config", "flag_fields", "RANGES", "range_problem", "has_run", "checkpoint_dir", "model_kind",
    "load_model", "resolve_device", "RunFolder", "check_writable",
]


class TrainError(Exception):
    """A problem with the user's input (config, data, folders, checkpoints): the message is one line."""


def first_line(e: BaseException) -> str:
    """An exception's message on one line (a multi-line list of problems joined with '; ')."""
    s = "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return (s or type(e).__name__)[:800]


# ---------------------------------------------------------------------------------------------
# the training configs: one dataclass per stage; each field carries its --help text and, for numbers, the range
# it must lie in, which __post_init__ and the command's flag parser both check (RANGES)

# rule -> (test, what the value must be, for an integer field / for a number field)
RANGES = {
    "positive": (lambda v: v > 0 and math.isfinite(v), "a positive integer", "a positive number"),
    "nonneg": (lambda v: v >= 0 and math.isfinite(v), "an integer >= 0", "a number >= 0"),
    "fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]", "a number in (0, 1]"),
}


def range_problem(rule: str | None, value, integer: bool) -> str | None:
    """'must be a positive integer, got 0' when ``value`` breaks ``rule`` (a RANGES key), else None."""
    if rule is None or value is None:
        return None
    ok, int_text, num_text = RANGES[rule]
    return None if ok(value) else f"must be {int_text if integer else num_text}, got {value}"


def _field(default, help: str, check: str | None = None, metavar: str | None = None):
    """A config field with its --help text, its range rule (a RANGES key) and the flag's metavar."""
    meta = {"help": help, "check": check, "metavar": metavar}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _again(cls, name: str, default):
    """The field ``name`` of ``cls`` with another default (a stage's own), keeping its help and range."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _field(default, **f.metadata)


def scalar_type(tp):
    """int, float, str or bool for a field annotated with one of them (or with it | None); None otherwise."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not None else [tp]
    if typing.get_origin(tp) is Literal:
        return str
    return args[0] if len(args) == 1 and args[0] in (int, float, str, bool) else None


@dataclass
class TrainConfig(Config):
    """What both stages' configs hold (with the first stage's defaults; GPTTrainConfig sets its own)."""

    data: str = _field("embedded", "a folder of images (searched recursively), 'embedded' (scikit-image's "
                       "photographs) or 'digits' (scikit-learn's handwritten digits, labelled, enlarged to "
                       "crop_size)", metavar="DIR")
    out: str = _field("runs/vqgan", "the run folder", metavar="DIR")
    steps: int = _field(2000, "total optimizer steps of the run", "positive")
    batch_size: int = _field(16, "images per step (per process)", "positive")
    lr: float = _field(4.5e-4, "learning rate (peak, after the warm-up)", "positive")
    betas: tuple = _field((0.5, 0.9), "Adam's betas")
    weight_decay: float = _field(0.0, "AdamW's weight decay", "nonneg")
    warmup_steps: int = _field(0, "steps of linear learning-rate warm-up", "nonneg")
    schedule: Literal["constant", "cosine"] = _field("constant", "learning-rate schedule after the warm-up "
                                                     "(cosine: down to 10% of lr at the last step)")
    seed: int = _field(0, "random seed (weights, data order, crops)")
    device: str = _field("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16"] = _field("fp32", "fp32, or bf16 autocast")
    compile: bool = _field(False, "torch.compile the model")
    crop_size: int = _field(64, "square crop size in pixels", "positive")
    resize: int | None = _field(None, "short side before cropping (folders only; default: as they are)", "positive")
    num_workers: int | None = _field(None, "DataLoader worker processes (default: none on up to 4 CPUs, else "
                                     "half the CPUs, at most 8)", "nonneg")
    log_every: int = _field(10, "steps between log lines", "positive")
    image_every: int = _field(250, "steps between PNG grids", "positive")
    checkpoint_every: int = _field(500, "steps between checkpoints", "positive")
    minutes: float | None = _field(None, "stop (with a checkpoint) after this much training time (default: no "
                                   "limit)", "positive")

    kind: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            problem = range_problem(f.metadata.get("check"), getattr(self, f.name), scalar_type(hints[f.name]) is int)
            if problem:
                raise ValueError(f"{f.name} {problem}")


@dataclass
class VQGANTrainConfig(TrainConfig):
    """train-vqgan: the first stage (taming's optimiser settings: Adam betas (0.5, 0.9), a constant rate)."""

    disc_lr: float | None = _field(None, "the discriminator's learning rate (default: lr)", "positive")
    adam_eps: float = _field(1e-8, "Adam's eps (torch's default, as taming)", "positive")
    channels_last: bool | None = _field(None, "NHWC activations (default: on CUDA only, where cuDNN's NHWC "
                                        "convolutions pay off)")
    model: dict = _field({}, "VQGANConfig fields over SMALL_VQGAN")
    loss: dict = _field({}, "VQGANLoss arguments over VQGAN_LOSS_DEFAULTS")
    color_augment: bool = _field(False, "random colours of the training crops (channel order, saturation, hue; "
                                 "vqkernels.data.color_jitter), so that the model does not learn the palette of "
                                 "few photographs")
    tint_grey: bool = _field(False, "random tints of grey training crops (a hue and saturation, their brightness "
                             "kept; vqkernels.data.tint), so that a model trained on grey textures and few colour "
                             "photographs sees textures in every colour")

    kind: ClassVar[str] = "vqgan"


@dataclass
class GPTTrainConfig(TrainConfig):
    """train-gpt: the second stage, a GPT over the codes of a trained VQGAN (nanoGPT's optimiser settings)."""

    out: str = _again(TrainConfig, "out", "runs/gpt")
    lr: float = _again(TrainConfig, "lr", 6e-4)
    betas: tuple = _again(TrainConfig, "betas", (0.9, 0.95))
    weight_decay: float = _again(TrainConfig, "weight_decay", 0.01)
    warmup_steps: int = _again(TrainConfig, "warmup_steps", 100)
    schedule: Literal["constant", "cosine"] = _again(TrainConfig, "schedule", "cosine")
    image_every: int = _again(TrainConfig, "image_every", 500)
    vqgan: str = _field("", "the first stage: a train-vqgan run folder or a VQModel folder (required)", metavar="DIR")
    conditional: bool = _field(False, "class-conditional on the top-level subfolder (embedded: on the photograph)")
    pkeep: float = _field(1.0, "taming's token corruption: keep each input token with this probability", "fraction")
    arch: str | None = _field(None, "the GPT family: mingpt (taming's; the class is a token) "
                                                     "or llama (LlamaGen's c2i: class-conditional, with "
                                                     "classifier-free guidance); default: the model section's "
                                                     "arch, else mingpt")
    class_dropout: float | None = _field(None, "llama: each training label is replaced by the null class with this "
                                         "probability (LlamaGen's class dropout, which classifier-free guidance "
                                         "needs; default: the model section's class_dropout_prob, else 0.1)",
                                         "nonneg")
    cfg_scale: float | None = _field(None, "llama: the classifier-free guidance scale stored as the checkpoint's "
                                     "default for sample (1: none; default: the model section's, else 1)")
    model: dict = _field({}, "GPTConfig fields over SMALL_GPT (vocab and block size are derived)")

    kind: ClassVar[str] = "gpt"


def flag_fields(cls) -> list[tuple[dataclasses.Field, type, tuple | None]]:
    """The fields of a training config that are command-line flags (the scalar ones; lists and mappings are set
    in the YAML): (field, its scalar type, its choices or None)."""
    hints = typing.get_type_hints(cls)
    return [(f, scalar_type(hints[f.name]),
             typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None)
            for f in dataclasses.fields(cls) if scalar_type(hints[f.name])]


# what may change when a run is resumed; everything else must match the checkpoint
RESUMABLE = {"steps", "out", "device", "compile", "channels_last", "num_workers", "log_every", "image_every",
             "checkpoint_every", "minutes"}


def config_from_dict(cls, d: dict, where: str):
    """A training config from a mapping (YAML, flags, a checkpoint): names, types and ranges checked, the
    problem as a one-line TrainError naming ``where``."""
    try:
        return from_dict(cls, d, where, error=TrainError)
    except ValueError as e:  # a range (__post_init__)
        raise TrainError(f"{where}: {first_line(e)}") from None


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def config_json(config) -> dict:
    return {"kind": config.kind, **_jsonable(config.to_dict())}


def resolve_config(cls, overrides: dict, out: str | None, *, resume: bool, where: str = "config"):
    """The config of a run: the defaults (or, with ``resume``, the checkpoint's config) with ``overrides``
    (YAML keys and flags the user gave) on top. A resumed run refuses overrides of anything but RESUMABLE."""
    out = overrides.get("out", out)
    if not resume:
        return config_from_dict(cls, dict(overrides), where)
    if out is None:
        raise TrainError("--resume needs --out (the run folder to continue)")
    ck = checkpoint_dir(out, required_for="--resume")
    saved = read_json(ck / "train_config.json", "the checkpoint's training config")
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
# reading run folders and checkpoints

def has_run(out) -> bool:
    out = Path(out)
    return any((out / n).exists() for n in ("latest", "checkpoints", "log.jsonl", "train_config.json"))


def read_json(path: Path, what: str) -> dict:
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
    if kind == "vqgan":
        from .models.vqgan import VQModel as cls
    else:
        from .models.two_stage import VQGANTransformer as cls
    try:
        model = cls.from_pretrained(str(ck), map_location="cpu")
    except Exception as e:
        raise TrainError(f"checkpoint {ck} cannot be loaded (truncated, corrupt or not matching its config): "
                         f"{first_line(e)}") from None
    return model.to(device).eval()


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """A module's weights from a .safetensors file of a checkpoint, strictly, with one-line errors."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise TrainError(f"checkpoint file {path} is truncated or corrupt: {first_line(e)}") from None
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise TrainError(f"checkpoint file {path} does not match the model: {first_line(e)}") from None


def load_trainer_state(ck: Path) -> dict:
    path = ck / "trainer.pt"
    if not path.is_file():
        raise TrainError(f"checkpoint {ck} has no trainer.pt (a model-only folder cannot be resumed)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"checkpoint file {path} is truncated or corrupt: {first_line(e)}") from None


# ---------------------------------------------------------------------------------------------
# devices

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


# ---------------------------------------------------------------------------------------------
# writing a run folder

def check_writable(out: Path) -> None:
    """Create ``out`` if needed and make sure a file can be written there (one-line TrainError if not)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test.", suffix=".tmp"):
            pass
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


class RunFolder:
    """Writes a run folder (see the module doc). Only rank 0 writes: the other ranks' RunFolder writes nothing."""

    def __init__(self, out, writer: bool):
        self.out, self.writer = Path(out), writer
        self.ck_root = self.out / "checkpoints"

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Before anything is written: a folder (or nothing) at --out, not an earlier run unless resumed or
        overwritten, and writable."""
        if not self.writer:
            return
        if self.out.exists() and not self.out.is_dir():
            raise TrainError(f"--out {self.out} is a file, not a folder")
        if not resume and not overwrite and has_run(self.out):
            raise TrainError(f"--out {self.out} already holds a run; pass --resume to continue it or --overwrite to "
                             f"start over")
        check_writable(self.out)

    def restore(self, modules: dict[str, torch.nn.Module]) -> dict:
        """A resumed run: each module's weights from the latest checkpoint (``<name>.safetensors``), and the
        trainer state (step, optimizer, scheduler and RNG states). Every rank reads them."""
        ck = checkpoint_dir(self.out, required_for="--resume")
        state = load_trainer_state(ck)
        for name, module in modules.items():
            load_weights(module, ck / f"{name}.safetensors")
        return state

    def prepare(self, config, *, resume: bool, overwrite: bool, step: int = 0) -> None:
        """The folder at the start of a run: an overwritten run's files gone, a killed run's temporaries swept,
        the config written, a resumed run's log cut back to its checkpoint's ``step``."""
        if not self.writer:
            return
        if not resume and overwrite:
            for n in ("latest", "log.jsonl", "train_config.json", "classes.json"):
                with contextlib.suppress(FileNotFoundError):
                    (self.out / n).unlink()
            for n in ("checkpoints", "images"):
                shutil.rmtree(self.out / n, ignore_errors=True)
        self.ck_root.mkdir(parents=True, exist_ok=True)
        (self.out / "images").mkdir(exist_ok=True)
        for folder in (self.out, self.ck_root, self.out / "images"):
            sweep_temporaries(folder)
        for p in self.ck_root.glob(".step_*"):  # (checkpoint folders in progress, as named before _io's pattern)
            shutil.rmtree(p, ignore_errors=True)
        write_text(self.out / "train_config.json", json.dumps(config_json(config), indent=2) + "\n")
        if resume:
            self._truncate_log(step)

    def _truncate_log(self, step: int) -> None:
        """A resumed run drops the log lines after its checkpoint (they are about to be redone)."""
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        keep = []
        for line in log.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
        write_text(log, "".join(s + "\n" for s in keep))

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            write_text(self.out / name, text)

    def log(self, record: dict) -> None:
        if self.writer:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def image_path(self, step: int) -> Path:
        return self.out / "images" / f"step_{step:08d}.png"

    def save(self, step: int, config, modules: dict[str, torch.nn.Module], trainer_state: dict, keep: int = 2):
        """One complete checkpoint: ``modules["model"]`` through its save_pretrained (config.json +
        model.safetensors), the others as ``<name>.safetensors``, the trainer state as trainer.pt; then ``latest``
        names it and all but the newest ``keep`` checkpoints go."""
        if not self.writer:
            return
        from safetensors.torch import save_file

        name = f"step_{step:08d}"
        with atomic_folder(self.ck_root / name) as tmp:
            tmp = Path(tmp)
            modules["model"].save_pretrained(str(tmp))
            for n, m in modules.items():
                if n != "model":
                    save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()},
                              str(tmp / f"{n}.safetensors"))
            torch.save(trainer_state, tmp / "trainer.pt")
            (tmp / "train_config.json").write_text(json.dumps(config_json(config), indent=2) + "\n", encoding="utf-8")
        write_text(self.out / "latest", f"checkpoints/{name}\n")
        done = sorted(p for p in self.ck_root.glob("step_*") if p.is_dir())
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
