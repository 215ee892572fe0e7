"""Typed configuration: dataclasses filled from commented YAML plus ``--set key.sub=value`` overrides.

Every config in tpkit is a (nested) dataclass. :func:`load_config` reads a YAML file into one,
checking every key and type *before* anything heavy (a model, a dataset) is loaded. Errors are
:class:`ConfigError` (a ``ValueError``) and name the file, the line, the dotted key and the
offending value, e.g.::

    configs/demo.yaml:12: unknown key 'train.lr' (did you mean 'optim.lr'?)

A dataclass may define ``validate(self)`` that raises ``ValueError`` for impossible values
(``min_keep > max_keep``); the loader calls it bottom-up and prefixes the message with the
location of that section.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "save_config", "apply_overrides"]


class ConfigError(ValueError):
    """A configuration problem, with its location (file:line and dotted key) in the message."""


# --------------------------------------------------------------------------------------------
# YAML with line numbers


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line number of that key in a YAML document."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    if root is not None:
        walk(root, "")
    return lines


class _Where:
    """Formats error locations: ``file:line: key``."""

    def __init__(self, source: str | None, lines: dict[str, int] | None = None):
        self.source = source
        self.lines = lines or {}

    def __call__(self, key: str) -> str:
        parts = []
        if self.source:
            line = self.lines.get(key)
            parts.append(f"{self.source}:{line}" if line else self.source)
        return (": ".join(parts) + ": ") if parts else ""


# --------------------------------------------------------------------------------------------
# dict -> dataclass with type checks


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _coerce(value: Any, tp: Any, key: str, where: _Where) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where(key)}'{key}' = {value!r} is not a {_type_name(tp)}")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where(key)}'{key}' = {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key)}'{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key + ".", where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a {tp.__name__}")
    return value


def _from_dict(cls: type[T], data: dict, prefix: str, where: _Where) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where(prefix + str(k))}unknown key '{prefix}{k}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, where) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            section = prefix.rstrip(".") or cls.__name__
            raise ConfigError(f"{where(prefix.rstrip('.'))}invalid '{section}': {e}") from None
    return obj


def from_dict(cls: type[T], data: dict | None, source: str | None = None) -> T:
    """Build dataclass ``cls`` from a plain dict, checking keys, types and ``validate()``."""
    return _from_dict(cls, data or {}, "", _Where(source))


def to_dict(cfg: Any) -> Any:
    """Dataclass (nested) -> plain dict, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (optional) into dataclass ``cls``, then apply ``--set`` overrides.

    Raises :class:`ConfigError` naming file, line and key for unknown keys, wrong types and
    values rejected by a section's ``validate()``.
    """
    data: dict = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
        lines = _key_lines(text)
    if overrides:
        apply_overrides(data, overrides)
        # an override's location is the command line, not the file
        for item in overrides:
            lines.pop(item.split("=", 1)[0].strip(), None)
        source = f"{source} (with --set)" if source else "--set"
    return _from_dict(cls, data, "", _Where(source, lines))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what a run actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
