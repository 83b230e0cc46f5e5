"""Config files: reading JSON / YAML, `--set a.b=value` overrides, and dataclass configs back to dicts.

Every job's config (export, distill, train) and TextBrewer's configs read files through here, so a bad
file is the same clear ConfigError everywhere.
"""
from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def is_int(value) -> bool:
    """An integer and not a bool (True is an int to Python, not to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {kind.upper()}: {e}") from None


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
