"""One YAML file plus dotted ``key=value`` overrides -> a typed, checked config."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .checks import ConfigError, validate
from .schema import Config
from .version import upgrade


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert a YAML value to the annotated type, with an error that names the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid under {prefix or 'top level'}: "
            f"{sorted(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, prefix + f.name)
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """``a.b.c=value`` -> data['a']['b']['c'] = yaml(value). Dict-valued fields accept deeper keys, and a number
    names an item of a list the file already has (``data.mixture.0.shards=...``)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r} is not valid YAML ({_yaml_problem(e)}); quote the value") from None
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = _index(node, p, override) if isinstance(node, list) else node.setdefault(p, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    if isinstance(node, list):  # a list item: data.mixture.0=...
        _index(node, parts[-1], override)
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _index(items: list, part: str, override: str):
    """``items[part]`` for an override that walks into a list by position (``data.mixture.0.shards=...``)."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {override!r}: {part} is not an item of a list of {len(items)} (0 to {len(items) - 1})"
        )
    return items[int(part)]


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's complaint in a few words, without its multi-line excerpt of the text."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{context}: {problem}" if context else problem


def read_yaml(path: Path) -> dict:
    """The mapping in a YAML file; a syntax error names the file and the line (PyYAML counts from 0)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"YAML syntax error: {_yaml_problem(e)} ({where}); fix the file there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a YAML {type(data).__name__}, not a mapping of sections; see configs/")
    return data


REQUIRED = "???"  # a config value that must be given (by an override): e.g. model.init_from in the high-res presets


def _required_left(data, prefix: str = "") -> list[str]:
    if isinstance(data, dict):
        return [k for key, v in data.items() for k in _required_left(v, f"{prefix}{key}.")]
    if isinstance(data, list):  # data.mixture.0.shards, as an override names it
        return [k for i, v in enumerate(data) for k in _required_left(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if data == REQUIRED else []


def _read(path: str | Path | None, overrides: list[str]) -> tuple[dict, bool, list[str]]:
    """The config mapping with the overrides applied, whether its decay was migrated, and the keys left ``???``."""
    data: dict = {}
    migrated = False
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found ({path}); give a YAML file, e.g. one of configs/")
        data = read_yaml(path)
        migrated = upgrade(data, path)
    for ov in overrides:
        apply_override(data, ov)
    return data, migrated, _required_left(data)


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = Config) -> Config:
    """Read a YAML config (or the defaults if path is None), apply overrides, check types and values.

    ``cls`` is the run's config class: Config (pretraining) or LitConfig. A value ``???`` marks a key the config
    leaves to the command line; one left unset is an error naming it. A file written before ``config_version`` 2
    is migrated or refused as config/version.py describes."""
    data, migrated, missing = _read(path, overrides)
    if missing:
        raise ConfigError(
            f"{path} needs a value for {', '.join(missing)} (marked ??? in the file): add "
            + " ".join(f"{k}=..." for k in missing)
            + " to the command"
        )
    cfg = _build(cls, data)
    validate(cfg, decay_bound=not migrated)
    return cfg


def resolve_config(path: str | Path | None, overrides: list[str] = (), cls: type = Config) -> tuple[Config, list[str]]:
    """:func:`load_config` that keeps the ``???`` values (as the string ``???``) instead of refusing them, and
    returns their keys: ``aimv2 pretrain --dry-run`` reports all a config still needs, and the rest of it, at once."""
    data, migrated, missing = _read(path, overrides)
    cfg = _build(cls, data)
    validate(cfg, decay_bound=not migrated)
    return cfg, missing


def saved_config_dict(path: str | Path) -> dict:
    """A run folder's config.yaml as a plain mapping in today's form (migrated when an earlier version wrote it)."""
    data = read_yaml(Path(path))
    upgrade(data, Path(path))
    return data
