"""One way from a mapping (JSON, YAML, command-line flags, a checkpoint) to a dataclass config.

Every config of the package (model configs, training configs) derives from :class:`Config`, so
unknown keys and wrong types get the same one-line error everywhere, naming where the mapping came
from. Field-specific checks (ranges, choices) stay in each config's ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import types
import typing

__all__ = ["Config", "ConfigError", "from_dict", "type_ok", "type_name"]


class ConfigError(ValueError):
    """A config mapping with an unknown key or a value of the wrong type."""


def type_ok(value, tp) -> bool:
    """Whether ``value`` (as read from JSON/YAML/flags) fits the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
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
    if tp in (tuple, list):
        return isinstance(value, (list, tuple))
    if tp is dict:
        return isinstance(value, dict)
    return True


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a list",
               list: "a list", dict: "a mapping", type(None): "null"}


def type_name(tp) -> str:
    """How an annotation reads in an error message: ``int | None`` -> 'an integer or null'."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    args = typing.get_args(tp)
    if args:
        return " or ".join(type_name(a) for a in args)
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _is_tuple(tp) -> bool:
    if tp is tuple or typing.get_origin(tp) is tuple:
        return True
    return any(_is_tuple(a) for a in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType))


def from_dict(cls, d: dict, where: str | None = None, *, error=ConfigError):
    """``cls(**d)`` after checking that every key is a field of ``cls`` and every value fits its type.

    Lists become tuples where the field is a tuple (YAML and JSON have no tuples). ``where`` names the
    source in the message (a file, 'flags', 'checkpoint DIR'); ``error`` is the exception class raised.
    Errors raised by the config's own ``__post_init__`` (ValueError) pass through unchanged.
    """
    where = where or cls.__name__
    if not isinstance(d, dict):
        raise error(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; the keys are {', '.join(names)}")
    for k, v in d.items():
        if not type_ok(v, hints[k]):
            raise error(f"{where}: {k} must be {type_name(hints[k])}, got {v!r}")
    return cls(**{k: (tuple(v) if isinstance(v, list) and _is_tuple(hints[k]) else v) for k, v in d.items()})


class Config:
    """Mixin for dataclass configs: ``from_dict`` (checked) and ``to_dict`` (JSON-ready: tuples as lists)."""

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        return from_dict(cls, d, where)

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
