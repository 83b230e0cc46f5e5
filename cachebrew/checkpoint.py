"""Crash-safe model checkpoints in safetensors (never pickle).

A checkpoint is written to a temporary name in the same directory, fsynced, then renamed: a crash or
Ctrl-C leaves either the previous state or a complete file, never a truncated file with the final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then publish tmp_path as `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; published files get the usual mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(model: torch.nn.Module, path, metadata: dict | None = None) -> Path:
    """Save `model`'s weights (tied weights stored once) with JSON-able metadata, atomically."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=repr)
            for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=meta))


def load_checkpoint(model: torch.nn.Module, path, strict: bool = True) -> torch.nn.Module:
    """Load weights written by save_checkpoint into `model` (on the model's device)."""
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
    load_model(model, str(path), strict=strict, device=str(device))
    return model
