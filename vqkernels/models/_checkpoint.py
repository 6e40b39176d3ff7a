"""Loading and saving model weights, shared by the models in this folder.

- :func:`load_torch_checkpoint`: a ``torch.save`` file (a Lightning ``last.ckpt`` or a bare state_dict),
  read with ``weights_only=True``; full unpickling only behind ``trust_checkpoint=True``.
- :func:`load_yaml_config`: a taming-style YAML (``model: {target, params}``), a path or a dict.
- :func:`select_prefix` / :func:`check_state_dict`: pick a sub-state-dict, and compare it with a model's
  keys and shapes, raising an error that lists the first few problems.
- :func:`atomic_path` / :func:`atomic_write` / :func:`save_safetensors_atomic` / :func:`usual_mode`: from
  :mod:`vqkernels._io` (write through a temporary file, then ``os.replace``); :func:`load_safetensors_into`
  loads a module's weights (strict).
- :func:`peer_model_args`: a peer's model arguments (LlamaGen's ``ModelArgs``) from a model name, a mapping or a
  dataclass, plus overrides, unknown fields refused, unset ones at the peer's defaults.
- :class:`PretrainedMixin`: ``save_pretrained(dir)`` / ``from_pretrained(dir_or_repo)`` as
  ``config.json`` + ``model.safetensors`` (huggingface_hub's ``PyTorchModelHubMixin``), for a model whose
  constructor takes one dataclass ``config``. Both files are written atomically; loading is strict.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

# the atomic writers live in vqkernels/_io.py (training, the demo and the CLI use them too); re-exported here for
# the models, which import them from this module
from .._io import atomic_path, atomic_write, save_safetensors_atomic, usual_mode  # noqa: F401

__all__ = [
    "CheckpointError", "load_torch_checkpoint", "load_yaml_config", "select_prefix", "check_state_dict",
    "atomic_path", "atomic_write", "usual_mode", "save_safetensors_atomic", "load_safetensors_into", "PretrainedMixin", "to_jsonable",
]

_SHOW = 5  # how many problems of each kind an error lists


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (unsafe content, keys or shapes that do not match)."""


def load_torch_checkpoint(checkpoint, *, trust_checkpoint: bool = False, map_location="cpu",
                          state_dict_keys: tuple[str, ...] = ("state_dict",), bare: bool = True) -> dict:
    """The state_dict of a ``torch.save`` checkpoint.

    ``checkpoint``: a path, or an already loaded dict. A Lightning checkpoint (``{"state_dict": ...}``)
    gives its ``state_dict``; any other dict of tensors is taken as the state_dict itself. ``state_dict_keys``:
    the entries that may hold the state_dict, the first present wins (LlamaGen's files: ``"model"``); ``bare=False``
    refuses a checkpoint that has none of them.

    The file is read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
    containers. Lightning checkpoints often hold more (callback states, hyper-parameter objects); unpickling
    those runs code named by the file, so it happens only with ``trust_checkpoint=True``.
    """
    if isinstance(checkpoint, Mapping):
        ckpt = checkpoint
    elif isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint: no such file {path!r}")
        if trust_checkpoint:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        else:
            try:
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(
                    f"checkpoint {path!r} holds Python objects besides tensors (a Lightning checkpoint often "
                    f"does: callbacks, hyper-parameters), and loading those would run code from the file. It was "
                    f"read with torch.load(weights_only=True), which refused: {str(e).splitlines()[0]}\n"
                    f"If you trust where this file comes from, pass trust_checkpoint=True to unpickle it fully."
                ) from None
    else:
        raise TypeError(f"checkpoint: expected a path or a dict, got {type(checkpoint).__name__}")
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint: expected a dict (a state_dict or {{'state_dict': ...}}), "
                              f"got {type(ckpt).__name__}")
    key = next((k for k in state_dict_keys if k in ckpt), None)
    if key is None and not bare:
        raise CheckpointError(f"checkpoint: expected the weights under {' or '.join(map(repr, state_dict_keys))}, "
                              f"got entries {sorted(map(str, ckpt))[:_SHOW]}")
    sd = ckpt if key is None else ckpt[key]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"checkpoint: {key!r} is a {type(sd).__name__}, not a dict of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint: the state_dict holds non-tensor entries, e.g. {bad[:_SHOW]}")
    return dict(sd)


def load_yaml_config(config) -> dict:
    """A YAML config file (path) or an already parsed dict, as a dict (OmegaConf-free: PyYAML's safe loader)."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        import yaml

        path = os.fspath(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r}")
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        if not isinstance(cfg, Mapping):
            raise ValueError(f"config {path!r}: expected a YAML mapping at the top, got {type(cfg).__name__}")
        return dict(cfg)
    raise TypeError(f"config: expected a path or a dict, got {type(config).__name__}")


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "", *,
                  drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Entries whose key starts with ``prefix`` (which is removed), minus those whose remaining key starts
    with one of ``drop`` (e.g. taming's ``loss.`` entries)."""
    drop = tuple(drop)
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if drop and k.startswith(drop):
            continue
        out[k] = v
    return out


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                     what: str = "checkpoint", ignore_missing: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` when ``state_dict`` does not fit ``model`` key for key and shape for
    shape; the message lists the first few missing, unexpected and mismatched entries."""
    expected = model.state_dict()
    ignore_missing = set(ignore_missing)
    missing = [k for k in expected if k not in state_dict and k not in ignore_missing]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} in the {what}, {tuple(v.shape)} in the model"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return

    def part(name, items):
        if not items:
            return ""
        more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
        return f"\n  {len(items)} {name}: " + ", ".join(items[:_SHOW]) + more

    raise CheckpointError(
        f"the {what} does not match the {type(model).__name__} built from its config "
        f"({len(state_dict)} entries in the {what}, {len(expected)} in the model):"
        + part("missing from the " + what, missing) + part("unexpected", unexpected)
        + part("with another shape", mismatched))


def load_safetensors_into(model: torch.nn.Module, path, *, map_location="cpu") -> None:
    """Load a ``model.safetensors`` written by :func:`save_safetensors_atomic` into ``model``, strictly;
    mismatches raise :class:`CheckpointError` listing them."""
    from safetensors.torch import load_file

    sd = load_file(os.fspath(path), device=str(map_location))
    # tied weights are stored once; their other names are legitimately absent
    tied = _tied_aliases(model)
    check_state_dict(model, sd, what=f"file {os.fspath(path)!r}", ignore_missing=tied)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if set(missing) - tied or unexpected:  # check_state_dict should have caught these
        raise CheckpointError(f"{path}: missing {missing[:_SHOW]}, unexpected {unexpected[:_SHOW]}")


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    seen, aliases = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is None:
            continue
        if key in seen:
            aliases.add(name)
        else:
            seen[key] = name
    return aliases


try:
    from huggingface_hub import PyTorchModelHubMixin as _HubMixin
except ImportError:  # the files are the same without it; only loading from the Hub needs it
    _HubMixin = object

_CONFIG_NAME = "config.json"
_WEIGHTS_NAME = "model.safetensors"


class PretrainedMixin(_HubMixin):
    """``save_pretrained`` / ``from_pretrained`` for a ``torch.nn.Module`` built as ``cls(config)`` from a
    dataclass config (the class attribute ``config_class``).

    A folder holds ``config.json`` (the dataclass's fields) and ``model.safetensors``. Both are written
    through a temporary file and ``os.replace``. Loading is strict (every key, every shape), reads only
    tensors (safetensors), and needs no network for a local folder; a Hub repo id goes through
    huggingface_hub's download cache.
    """

    config_class: type = None  # set by the model class

    # -- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        if _HubMixin is object:
            save_directory = Path(save_directory)
            save_directory.mkdir(parents=True, exist_ok=True)
            self._save_pretrained(save_directory)
            return None
        return super().save_pretrained(save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        cfg = dataclasses.asdict(self.config)
        with atomic_write(save_directory / _CONFIG_NAME, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        save_safetensors_atomic(self, save_directory / _WEIGHTS_NAME,
                                metadata={"format": "pt", "model": type(self).__name__})

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, map_location="cpu", **kwargs):
        """A model from a folder written by :meth:`save_pretrained` (or a Hub repo id with the same files)."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            return cls._load_folder(path, path, map_location)
        if _HubMixin is object:
            raise FileNotFoundError(f"{path!r} is not a folder (and huggingface_hub, needed for Hub repo ids, "
                                    f"is not installed)")
        from huggingface_hub import hf_hub_download

        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "force_download", "token", "local_files_only")
               if k in kwargs}
        if kwargs:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(kwargs)}")
        cfg_file = hf_hub_download(path, _CONFIG_NAME, **hub)
        w_file = hf_hub_download(path, _WEIGHTS_NAME, **hub)
        return cls._load_files(cfg_file, w_file, map_location)

    @classmethod
    def _load_folder(cls, folder, name, map_location):
        cfg_file, w_file = os.path.join(folder, _CONFIG_NAME), os.path.join(folder, _WEIGHTS_NAME)
        for f in (cfg_file, w_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"from_pretrained({name!r}): {os.path.basename(f)} is missing from the folder")
        return cls._load_files(cfg_file, w_file, map_location)

    @classmethod
    def _load_files(cls, cfg_file, w_file, map_location):
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
        config = cls.config_class.from_dict(cfg) if hasattr(cls.config_class, "from_dict") else cls.config_class(**cfg)
        model = cls(config)
        load_safetensors_into(model, w_file, map_location=map_location)
        return model.to(map_location).eval()

    @classmethod
    def _from_pretrained(cls, *, model_id, map_location="cpu", **kwargs):  # the mixin's hook, for completeness
        return cls.from_pretrained(model_id, map_location=map_location)


def peer_model_args(config, overrides: Mapping, *, named: Mapping[str, Mapping], fields: Mapping, what: str,
                    also: str = "") -> dict:
    """A peer's model arguments: ``config`` is a name of ``named`` (name -> fields), a mapping of fields or a
    dataclass instance; ``overrides`` win over it; fields not in ``fields`` (name -> the peer's default) are
    refused; unset ones take the defaults. ``what`` names the peer's models in errors ("LlamaGen tokenizer");
    ``also``: what else the caller accepts, for the type error (", or a VQGANConfig")."""
    if isinstance(config, str):
        if config not in named:
            raise ValueError(f"config: unknown {what} {config!r}; expected one of {', '.join(named)} or a dict of its "
                             f"ModelArgs fields")
        args = dict(named[config])
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        args = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        args = dict(config)
    else:
        raise TypeError(f"config: expected a {what} name or a dict of its ModelArgs fields{also}, got "
                        f"{type(config).__name__}")
    args.update(overrides)
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(f"config: unknown {what} ModelArgs field(s) {', '.join(unknown)}; the fields are "
                         f"{', '.join(fields)}")
    return {**fields, **args}


def to_jsonable(obj: Any) -> Any:
    """Tuples to lists (JSON has no tuples), recursively."""
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj
