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

import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

# `1e-4` / `5E3`: numbers to everyone, strings to YAML 1.1 (which wants `1.0e-4`)
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "load_config",
    "from_dict",
    "to_dict",
    "save_config",
    "apply_overrides",
    "set_dotted",
    "field_docs",
    "commented_yaml",
    "reference_markdown",
    "unwritable_dir",
    "check_fields",
    "path_field",
    "resolve_path",
]


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
    """Formats error locations (``file:line: key``) and says where a relative path was written."""

    def __init__(
        self,
        source: str | None,
        lines: dict[str, int] | None = None,
        *,
        resolve: bool = False,
        base: Path | None = None,
        cli_keys: set[str] | None = None,
    ):
        self.source = source
        self.lines = lines or {}
        self.resolve = resolve  # make path fields absolute (load_config; from_dict leaves them)
        self.base = base  # the config file's directory
        self.cli_keys = cli_keys or set()  # keys given with --set (a section counts for its keys)

    def path_base(self, key: str, written: bool) -> Path | None:
        """The directory a relative path at ``key`` resolves against: the config file's directory for
        one written in the file, the current directory for a ``--set`` value or a default."""
        if not self.resolve:
            return None
        parts = key.split(".")
        cli = any(".".join(parts[:i]) in self.cli_keys for i in range(1, len(parts) + 1))
        return self.base if written and not cli and self.base is not None else Path.cwd()

    def __call__(self, key: str) -> str:
        parts = []
        if self.source:
            line = self.lines.get(key)
            parts.append(f"{self.source}:{line}" if line else self.source)
        return (": ".join(parts) + ": ") if parts else ""


# --------------------------------------------------------------------------------------------
# fields that name files and directories

_PATH = "tpkit_path"  # field metadata: the function that makes a relative value absolute


def resolve_path(value: str, base: str | os.PathLike) -> str:
    """``value`` (``~`` expanded) made absolute against ``base``, normalised (no ``..``, no trailing
    ``/``); an absolute ``value`` stays itself."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def path_field(default: str | None = None, resolve: Callable[[str, Path], str] = resolve_path) -> Any:
    """A dataclass field naming a file or directory (``x: str | None = path_field()``): when a config
    loads (:func:`load_config`), a relative value written in the file is made absolute against the
    file's directory, and one given with ``--set`` (or a default) against the current directory.
    ``resolve(value, base)`` does it (e.g. a model path, which may be a hub id). ``from_dict``
    leaves values as they are."""
    return dataclasses.field(default=default, metadata={_PATH: resolve})


# --------------------------------------------------------------------------------------------
# dict -> dataclass with type checks


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
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
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)  # `1e-4`: YAML 1.1 reads a string (no dot), every user means a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a number")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range (10**400 written out)
            value = math.inf
        if not math.isfinite(value):  # no key means anything by nan or inf ("no limit" is null)
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a finite number")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a {tp.__name__}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls`` (its module's names resolve ``from __future__`` strings)."""
    return typing.get_type_hints(cls)


def _from_dict(cls: type[T], data: dict, prefix: str, where: _Where) -> T:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where(prefix + str(k))}unknown key '{prefix}{k}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, where) for k, v in data.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default_factory is hints[name]:  # a section not written: its defaults
            kwargs[name] = _from_dict(hints[name], {}, f"{prefix}{name}.", where)
        resolve = f.metadata.get(_PATH)
        value = kwargs.get(name, f.default)
        base = where.path_base(prefix + name, name in data) if resolve else None
        if base is not None and isinstance(value, str) and value:
            kwargs[name] = resolve(value, base)
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


def check_fields(obj: Any, prefix: str = "") -> None:
    """ConfigError, naming the dotted key, when a field of dataclass ``obj`` (nested sections too) does
    not have its annotated type or is a non-finite float: the loader's checks, for a config built in
    Python (``Stage2Config(layer="1")``), which never went through :func:`from_dict`."""
    hints = _hints(type(obj))
    where = _Where(None)
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]) and dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
        else:
            _coerce(value, hints[f.name], key, where)


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
        try:
            set_dotted(data, key, value)
        except KeyError as e:
            raise ConfigError(f"--set {item!r}: '{e.args[0]}' is not a section") from None
    return data


def set_dotted(data: dict, key: str, value: Any, create: bool = True) -> None:
    """``data["a"]["b"] = value`` for ``key`` "a.b", in place. Missing sections are created (or, with
    ``create=False``, raise); a part that is not a section raises ``KeyError(part)``."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None and create:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise KeyError(p)
        node = nxt
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (optional) into dataclass ``cls``, then apply ``--set`` overrides.

    Fields declared with :func:`path_field` come back absolute: a relative path written in the file
    against the file's directory, one given in ``overrides`` (or a default) against the current
    directory, so that a config file names the same files from wherever it is run. Raises
    :class:`ConfigError` naming file, line and key for unknown keys, wrong types and values
    rejected by a section's ``validate()``.
    """
    data: dict = {}
    lines: dict[str, int] = {}
    source = None
    base = None
    if path is not None:
        path = Path(path)
        source = str(path)
        base = path.expanduser().absolute().parent
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
    cli_keys = set()
    if overrides:
        apply_overrides(data, overrides)
        # an override's location is the command line, not the file
        cli_keys = {item.split("=", 1)[0].strip() for item in overrides}
        for key in cli_keys:
            lines.pop(key, None)
        source = f"{source} (with --set)" if source else "--set"
    return _from_dict(cls, data, "", _Where(source, lines, resolve=True, base=base, cli_keys=cli_keys))


def unwritable_dir(path: str | Path, key: str) -> str | None:
    """Why the output directory ``path`` (config key ``key``) cannot be written, else None: checked
    before a run starts, not when its first file is due. Leaves the file system as it found it: the
    folders it made to probe are removed again (a run that fails later leaves no empty ``out_dir``)."""
    d = Path(path)
    made = [p for p in (d, *d.parents) if not p.exists()]  # deepest first
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".tpkit-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{key} = {str(path)!r} cannot be written ({e.strerror or e}): choose another directory"
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not made by us after all, or something else wrote into it meanwhile
                break
    return None


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what a run actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# Documentation from the dataclasses themselves: each field's comment in its source is its doc


@dataclasses.dataclass
class FieldDoc:
    """One config key: dotted name, type, default and the comment written beside it in the source."""

    key: str
    type: str
    default: Any
    doc: str
    section: bool = False  # a nested dataclass (its doc is the class docstring)


def _source_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the comment lines right above the field and the one after it."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line -> comment text
    columns: dict[int, int] = {}  # line -> the comment's column
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            columns[tok.start[0]] = tok.start[1]
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(src).body[0].body  # the class body
    out: dict[str, str] = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        after = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        nxt = node.end_lineno + 1  # comment-only lines indented past the field continue its comment
        while after and nxt in comments and nxt not in code_lines and columns[nxt] > node.col_offset:
            after.append(comments[nxt])
            nxt += 1
        out[node.target.id] = " ".join(above + after)
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_docs(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every key of dataclass ``cls`` (nested sections flattened, depth first) with its doc comment."""
    hints = _hints(cls)
    comments = _source_comments(cls)
    out: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            doc = " ".join((tp.__doc__ or "").split()) or comments.get(f.name, "")
            out.append(FieldDoc(key, tp.__name__, None, doc, section=True))
            out += field_docs(tp, key + ".")
        else:
            out.append(FieldDoc(key, _type_name(tp), to_dict(_default_of(f)), comments.get(f.name, "")))
    return out


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def commented_yaml(cfg: Any, *, width: int = 110) -> str:
    """``cfg`` (a dataclass instance) as YAML with each key's doc comment: what ``--print-config`` shows."""
    docs = {d.key: d for d in field_docs(type(cfg))}
    lines: list[str] = []

    def emit(obj: Any, prefix: str, indent: str) -> None:
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            d = docs.get(prefix + f.name)
            doc = d.doc if d else ""
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:" + (f"  # {doc}" if doc else ""))
                emit(value, prefix + f.name + ".", indent + "  ")
                continue
            head = f"{indent}{f.name}: {_yaml_scalar(to_dict(value))}"
            if doc and len(head) + 4 + len(doc) <= width:
                lines.append(f"{head}  # {doc}")
            elif doc:
                for chunk in textwrap.wrap(doc, width - len(indent) - 2):
                    lines.append(f"{indent}# {chunk}")
                lines.append(head)
            else:
                lines.append(head)

    emit(cfg, "", "")
    return "\n".join(lines) + "\n"


def reference_markdown(configs: dict[str, type]) -> str:
    """A Markdown reference of every key of ``configs`` ({title: dataclass}), one table per section."""
    out: list[str] = []
    for title, cls in configs.items():
        out.append(f"## {title}\n")
        doc = " ".join((cls.__doc__ or "").split())
        if doc:
            out.append(doc + "\n")
        rows: dict[str, list[FieldDoc]] = {"": []}
        for d in field_docs(cls):
            if d.section:
                rows[d.key] = []
                continue
            rows[d.key.rpartition(".")[0]].append(d)
        sections = {d.key: d for d in field_docs(cls) if d.section}
        for section, items in rows.items():
            if not items:
                continue
            if section:
                sdoc = sections[section].doc
                out.append(f"### `{section}`\n" + (f"\n{sdoc}\n" if sdoc else ""))
            out.append("| key | type | default | description |\n|---|---|---|---|")
            for d in items:
                default = _yaml_scalar(d.default).replace("|", "\\|")
                desc = d.doc.replace("|", "\\|")
                kind = d.type.replace("|", "\\|")
                out.append(f"| `{d.key}` | `{kind}` | `{default}` | {desc} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"
