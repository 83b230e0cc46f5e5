"""Crash-safe model checkpoints in safetensors (never pickle).

A checkpoint is written to a temporary name in the same directory, fsynced, then renamed: a crash or
Ctrl-C leaves either the previous state or a complete file, never a truncated file with the final name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .files import atomic_write


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
