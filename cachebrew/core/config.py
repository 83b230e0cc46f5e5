"""The one config system: files (JSON / YAML), `--set a.b=value` overrides, typed dataclass configs built
and validated in one pass, and the shared validators.

Every job's config (export, distill, train) is a tree of dataclasses deriving from `JobConfig`: its type
hints are the schema. `JobConfig.from_dict` walks the tree once, reporting every unknown field, missing
field and wrong type with its path (``train.lr``, ``teachers[0].name``), then adds the config's own
semantic `problems()`, and raises one ConfigError listing them all. TextBrewer's TrainingConfig and
DistillationConfig keep their classes (TextBrewer's names) but read files and check values with the
same functions, so a bad value is the same clear message everywhere.
"""
from __future__ import annotations

import copy
import json
import numbers
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def is_int(value) -> bool:
    """An integer (Python's or NumPy's) and not a bool (True is an int to Python, not to a config)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (int, float, NumPy scalar) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


AMP_MODES = ("auto", None, "none", "bf16", "fp16")  # a job's `amp`: auto = bf16 on a GPU, full precision elsewhere


def read_config_file(filename, kind: str | None = None) -> Any:
    """The parsed content of a .json / .yaml / .yml config file; a ConfigError naming the file otherwise."""
    path = Path(filename)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    kind = kind or {"json": "json", "yaml": "yaml", "yml": "yaml"}.get(path.suffix.lstrip(".").lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown config extension {path.suffix!r}; use .json, .yaml or .yml")
    text = path.read_text(encoding="utf-8")
    try:
        if kind == "json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except yaml.YAMLError as e:  # one line: where, and what the parser expected
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{where}: not valid YAML: {what}") from None


def config_to_dict(obj) -> Any:
    """Plain dicts and lists (deep copies) from nested config dataclasses: what is saved with an artifact."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [config_to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested config dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
            elif isinstance(node, dict):
                node = node.setdefault(p, {})
            else:
                raise ConfigError(f"--set {item!r}: {p!r} is not a mapping in the config")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value


# -- typed configs ----------------------------------------------------------------------------------------
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


def _accepts(tp, value) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_number(value)
    origin = typing.get_origin(tp) or tp
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(tp) -> str:
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    names = [("null" if m is type(None) else _TYPE_NAMES.get(typing.get_origin(m) or m, getattr(m, "__name__", str(m))))
             for m in members]
    return " or ".join(names)


def _path(where: str, key) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def build_dataclass(cls, data, where: str, errors: list[str]):
    """An instance of dataclass `cls` from plain data, checked against its type hints; None if unusable.

    Fields of a dataclass type, ``list[Dataclass]`` and ``dict[str, Dataclass]`` are built recursively; a value
    of the wrong type is reported (``where.field: must be an integer, got '2'``) and left at its default, so
    the semantic checks that follow see only well-typed values.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    errors += [f"{_path(where, k)}: unknown field (valid: {', '.join(sorted(known))})" for k in data if k not in known]
    kwargs = {}
    for name, f in known.items():
        path = _path(where, name)
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                errors.append(f"{path}: required")
            continue
        value = _build_value(hints[name], data[name], path, errors)
        if value is not _INVALID:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing or invalid: already reported
        return None


_INVALID = object()


def _build_value(tp, value, path: str, errors: list[str]):
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None and type(None) in members:
        return None
    for m in members:
        if is_dataclass(m):
            built = build_dataclass(m, value, path, errors)
            return _INVALID if built is None else built
        origin, args = typing.get_origin(m), typing.get_args(m)
        if origin is list and args and is_dataclass(args[0]) and isinstance(value, list):
            items = [build_dataclass(args[0], v, _path(path, i), errors) for i, v in enumerate(value)]
            return _INVALID if any(i is None for i in items) else items
        if origin is dict and len(args) == 2 and is_dataclass(args[1]) and isinstance(value, dict):
            items = {k: build_dataclass(args[1], v, _path(path, k), errors) for k, v in value.items()}
            return _INVALID if any(i is None for i in items.values()) else items
    if any(_accepts(m, value) for m in members):
        return value
    errors.append(f"{path}: must be {_describe(tp)}, got {value!r}")
    return _INVALID


class JobConfig:
    """Base of the jobs' dataclass configs: ``from_file`` / ``from_dict`` build, type-check and validate in one pass.

    A config may state its kind at the top (``kind: distill``); without it the kind is the reading command's
    (``KIND``), and a config of another kind is refused by name instead of failing field by field."""

    KIND = ""

    @classmethod
    def from_file(cls, path, overrides: list[str] | None = None):
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError("top level must be a mapping", str(path))
        apply_overrides(data, overrides or [])
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None):
        errors: list[str] = []
        if isinstance(data, dict) and "kind" in data:
            stated, data = data["kind"], {k: v for k, v in data.items() if k != "kind"}
            if stated != cls.KIND:
                raise ConfigError(f"kind: this is a {stated!r} config; this command reads {cls.KIND!r} configs",
                                  source)
        cfg = build_dataclass(cls, cls.normalize(copy.deepcopy(data)) if isinstance(data, dict) else data, "", errors)
        if cfg is not None:
            errors += cfg.problems()
        if errors:
            raise ConfigError(errors, source)
        return cfg

    @classmethod
    def normalize(cls, data: dict) -> dict:
        """Rewrite shorthand forms before the build (e.g. `train.steps` alone means no epoch count)."""
        return data

    def problems(self) -> list[str]:
        """Semantic checks over well-typed values: one message per problem, naming the field."""
        return []

    def to_dict(self) -> dict:
        return config_to_dict(self)


def check_int(errors: list[str], path: str, value, minimum: int | None = None, optional: bool = False) -> None:
    """Append an error unless `value` is an integer >= minimum (or None when optional)."""
    if optional and value is None:
        return
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        errors.append(f"{path}: must be {'null or ' if optional else ''}an integer{bound}, got {value!r}")


def check_choice(errors: list[str], path: str, value, choices) -> None:
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        errors.append(f"{path}: one of {shown}, got {value!r}")
