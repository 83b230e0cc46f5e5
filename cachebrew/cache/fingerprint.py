"""Deterministic fingerprints of everything that produces a cache.

Values are hashed as canonical, type-tagged JSON (sorted keys); anything that cannot be represented
raises instead of falling back to a random key, so the same inputs always give the same fingerprint.
Model weights and files are hashed by content, not by path or modification time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..core.files import hash_stream


def _canonical(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"fingerprint: dict keys must be strings, got {list(value)[:3]}")
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, Path):
        return {"path": str(value)}
    raise TypeError(f"fingerprint: cannot hash a value of type {type(value).__name__}: {value!r}")


def hash_value(value) -> str:
    """sha256 of the canonical form of a JSON-like value."""
    return hashlib.sha256(json.dumps(_canonical(value), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_files(paths) -> str:
    """Content hash over files, each tagged with its name relative to their common parent."""
    paths = sorted(Path(p) for p in paths)
    if not paths:
        return hash_value([])
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            hash_stream(f, h)
    return h.hexdigest()


def hash_state_dict(model: torch.nn.Module) -> str:
    """Content hash of a model's parameters and buffers (name, dtype, shape, bytes), format-independent."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def combine(parts: dict) -> str:
    """The cache fingerprint: one hash over the named component hashes and settings."""
    return hash_value(parts)
