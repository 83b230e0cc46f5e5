"""manifest.json: what a cache holds, how it was made, and how to check it.

Written last and atomically, so a directory without a manifest is an unfinished export. Shard paths
must be plain ``part-NNNNN.arrow`` names inside the cache directory: a manifest cannot point elsewhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.files import atomic_write_text
from ..errors import CacheFormatError
from .format import FORMAT_NAME, FORMAT_VERSION, TensorSpec
from .shards import SHARD_RE, ShardInfo

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    fingerprint: str
    fingerprint_inputs: dict
    columns: dict            # name -> arrow type string
    tensors: list[TensorSpec]
    teachers: dict           # name -> {"weights_sha256", "source", "num_labels", ...}
    shards: list[ShardInfo]
    tasks: dict = field(default_factory=dict)   # task -> rows
    config: dict = field(default_factory=dict)  # resolved export config
    token_level: bool = False
    label_names: list | None = None
    num_examples: int = 0
    created: str = ""
    # a causal LM's cache: each teacher token id's text, decoded alone (what a student with another tokenizer
    # maps the cached next-token distributions through, components/alignment.vocabulary_map); else None
    vocabulary: list[str] | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self):
        return {
            "format": self.format, "format_version": self.format_version, "created": self.created,
            "fingerprint": self.fingerprint, "fingerprint_inputs": self.fingerprint_inputs,
            "num_rows": self.num_rows, "num_examples": self.num_examples, "num_bytes": self.num_bytes,
            "token_level": self.token_level, "label_names": self.label_names, "tasks": self.tasks, "teachers": self.teachers,
            "columns": self.columns, "tensors": [t.to_dict() for t in self.tensors],
            "shards": [s.to_dict() for s in sorted(self.shards, key=lambda s: s.index)], "config": self.config,
            **({"vocabulary": self.vocabulary} if self.vocabulary is not None else {}),
        }

    def write(self, directory) -> Path:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        return atomic_write_text(Path(directory) / MANIFEST, text)

    @classmethod
    def read(cls, directory) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not Path(directory).is_dir():
            raise CacheFormatError(f"{directory}: no such cache directory")
        if not path.is_file():
            raise CacheFormatError(f"{path}: missing; the cache is incomplete (an export that did not finish?)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheFormatError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path), Path(directory))

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST, directory: Path | None = None) -> "Manifest":
        errors = []
        if not isinstance(d, dict):
            raise CacheFormatError(f"{where}: top level must be an object")
        if d.get("format") != FORMAT_NAME:
            errors.append(f"format: expected {FORMAT_NAME!r}, got {d.get('format')!r}")
        if d.get("format_version") != FORMAT_VERSION:
            errors.append(f"format_version: this cachebrew reads version {FORMAT_VERSION}, got {d.get('format_version')!r}")
        for key in ("fingerprint", "fingerprint_inputs", "columns", "tensors", "teachers", "shards"):
            if key not in d:
                errors.append(f"{key}: missing")
        if errors:
            raise CacheFormatError(f"{where}: " + "; ".join(errors))
        shards = []
        for i, s in enumerate(d["shards"]):
            try:
                info = ShardInfo(**s)
            except TypeError as e:
                raise CacheFormatError(f"{where}: shards[{i}]: {e}") from None
            check_shard_path(info.path, directory, f"{where}: shards[{i}].path")
            shards.append(info)
        try:
            tensors = [TensorSpec.from_dict(t) for t in d["tensors"]]
        except TypeError as e:
            raise CacheFormatError(f"{where}: tensors: {e}") from None
        return cls(fingerprint=d["fingerprint"], fingerprint_inputs=d["fingerprint_inputs"], columns=d["columns"],
                   tensors=tensors, teachers=d["teachers"], shards=shards, tasks=d.get("tasks", {}),
                   config=d.get("config", {}), token_level=bool(d.get("token_level", False)),
                   label_names=d.get("label_names"),
                   num_examples=int(d.get("num_examples", 0)), created=d.get("created", ""),
                   vocabulary=_vocabulary(d.get("vocabulary"), where))


def _vocabulary(value, where: str) -> list[str] | None:
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise CacheFormatError(f"{where}: vocabulary: expected a list of strings (each token id's text)")
    return value


def check_shard_path(name: str, directory: Path | None, where: str) -> None:
    """A shard path is a bare part-NNNNN.arrow name; no separators, no '..', no symlinks."""
    if not isinstance(name, str) or not SHARD_RE.match(name) or os.sep in name or "/" in name:
        raise CacheFormatError(f"{where}: {name!r} is not a shard name of this cache (expected part-NNNNN.arrow)")
    if directory is not None:
        p = Path(directory) / name
        if p.is_symlink():
            raise CacheFormatError(f"{where}: {name} is a symbolic link; shards must be regular files in the cache")
