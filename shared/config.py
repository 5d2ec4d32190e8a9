"""YAML -> dataclass config loading with `section.key=value` overrides, validated all at once.

Each component declares a dataclass (fields with defaults, a docstring per field). `load_config`
turns YAML plus command-line overrides into that dataclass and reports *every* problem in one
ConfigError (unknown keys with a suggestion, wrong types, and whatever each dataclass's optional
`problems()` method returns), so a user fixes a config in one round instead of one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """One or more config problems; `.problems` lists them all."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"override {item!r} must look like section.key=value"], "--set")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], str(path)) from err
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections"], str(path))
    return data


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 (built at run time)
    return False, tp


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or inner is Any:
            return None
        problems.append(f"{where}: must not be null")
        return None
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return tp()
        return _build(tp, value, where, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            trial: list[str] = []
            converted = _convert(value, option, where, trial)
            if not trial:
                return converted
        problems.append(f"{where}: {value!r} does not match {tp}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `1e-5` and `1e9` -- no dot -- as strings; users mean numbers.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)):
                return str(value)
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, where: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(fields)})"
            problems.append(f"{where + '.' if where else ''}{key}: unknown key{suggestion}")
            continue
        before = len(problems)
        converted = _convert(value, hints[key], f"{where + '.' if where else ''}{key}", problems)
        if len(problems) > before and _is_scalar(hints[key]) and _has_default(fields[key]):
            continue  # listed already; the default keeps `problems()` below from tripping over a wrong type
        kwargs[key] = converted
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in missing:
        problems.append(f"{where + '.' if where else ''}{name}: required")
    try:
        obj = cls(**kwargs) if not missing else _placeholder(cls, kwargs)
    except (TypeError, ValueError) as err:
        problems.append(f"{where or cls.__name__}: {err}")
        return None
    check = getattr(obj, "problems", None)
    if callable(check) and obj is not None:
        problems += [f"{where + '.' if where else ''}{p}" if where else p for p in check()]
    return obj


def _is_scalar(tp) -> bool:
    _, inner = _is_optional(tp)
    return inner in (int, float, bool, str) or typing.get_origin(inner) is Literal


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _placeholder(cls, kwargs):
    # Build with None for missing required fields, so the other problems can still be collected.
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{name: kwargs.get(name) for name in fields})


def load_config(cls, path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None):
    """Build `cls` from a YAML file and/or a dict, then `section.key=value` overrides."""
    source = str(path) if path else "config"
    merged = dict(data or {})
    if path:
        merged.update(read_yaml(path))
    apply_overrides(merged, list(overrides))
    problems: list[str] = []
    obj = _build(cls, merged, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def config_hash(obj) -> str:
    """sha256 of the canonical JSON of a resolved config."""
    payload = obj if isinstance(obj, dict) else to_dict(obj)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
