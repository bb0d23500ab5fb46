"""Typed configuration: dataclasses with working defaults, overridden by YAML and `key=value`.

Each dataclass lives beside the code it configures (ModelConfig in model.py, TrainConfig in
train.py); this module only fills them in and checks every key, so a typo names the dotted
key and the valid ones instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import yaml

from asr.errors import ConfigError


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys: "
                          + ", ".join(prefix + k for k in fields))
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value, kind, key: str):
    if kind is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    base = typing.get_origin(kind) or kind
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        item = typing.get_args(kind)[0]
        return base(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if base in (int, float, str, bool) and not (type(value) is base):
        raise ConfigError(f"{key}={value!r}: expected {base.__name__}")
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] = ()):
    """Defaults of `cls`, then the YAML file at `path`, then `key.sub=value` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.hidden_size=320")
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return from_dict(cls, values)
