"""Build typed config dataclasses from plain mappings (YAML), checking keys and types.

Every error names the dotted path of the offending key, so ``model.halting.tua`` or
``train.steps: expected int, got str 'ten'`` tells the user exactly what to fix. A dataclass may
declare ``ALIASES = {"yaml_name": "field_name"}`` for YAML keys that are not Python identifiers
(``lambda``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Union


class ConfigError(ValueError):
    """A configuration value is invalid. ``field`` is the dotted path of the offending key."""

    def __init__(self, field_path: str, message: str):
        self.field, self.message = field_path, message
        super().__init__(f"{field_path}: {message}")

    def __reduce__(self):  # picklable, so it crosses process boundaries (Ray workers) intact
        return type(self), (self.field, self.message)


def _aliases(cls) -> dict[str, str]:
    return dict(getattr(cls, "ALIASES", {}))


@functools.cache
def _schema(cls) -> tuple[frozenset[str], dict[str, Any], dict[str, str]]:
    """(init field names, resolved annotations, YAML aliases) of a config dataclass. Resolving
    annotations costs about a millisecond per class; a sweep builds thousands of configs."""
    names = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
    return names, typing.get_type_hints(cls), _aliases(cls)


def build(cls, data: Any, prefix: str):
    """``cls(**data)`` with every key and value checked against the dataclass's annotations."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"must be a mapping, got {type(data).__name__}")
    names, hints, aliases = _schema(cls)
    kwargs = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        path = f"{prefix}.{key}" if prefix else str(key)
        if name not in names:
            raise ConfigError(path, "unknown key")
        kwargs[name] = coerce(hints[name], value, path)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(prefix or cls.__name__, str(err)) from None
    except ConfigError as err:
        # a section's own checks may name a field relative to the section: make it absolute
        if prefix and not (err.field == prefix or err.field.startswith(prefix + ".")):
            raise ConfigError(f"{prefix}.{err.field}", err.message) from None
        raise


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(tp, value: Any, path: str):
    """Check ``value`` against the annotation ``tp`` (ints are accepted where floats are)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, "must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, path)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return tp.from_dict(value, path) if hasattr(tp, "from_dict") else build(tp, value, path)
    if origin is list or tp is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"must be one of {list(choices)}, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str):
        value = _yaml11_number(value, tp, path)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is None:
        return value
    if not ok(value):
        raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _yaml11_number(text: str, tp, path: str):
    """PyYAML (YAML 1.1) reads ``1e13`` or ``1.0e12`` as strings; accept them as numbers."""
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not math.isfinite(number):
        raise ConfigError(path, f"expected {tp.__name__}, got str {text!r}")
    if tp is int:
        if not number.is_integer():
            raise ConfigError(path, f"expected int, got {text!r}")
        return int(number)
    return number


def to_dict(obj) -> dict[str, Any]:
    """Plain nested dict of a config dataclass, using YAML names (aliases reversed)."""
    out = {}
    reverse = {v: k for k, v in _aliases(type(obj)).items()}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[reverse.get(f.name, f.name)] = value
    return out
