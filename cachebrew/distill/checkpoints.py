"""Resumable run checkpoints: everything a killed `cachebrew distill` needs to end with the same weights.

    checkpoints/step-000120/
        student.safetensors   projections.safetensors   (weights: no pickle)
        optimizer.pt          scheduler.pt              (state dicts, loaded with weights_only=True)
        state.json            counters, loader position, RNG states, eval history

A checkpoint directory is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..checkpoint import _fsync_dir


def _rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": _py_state(random.getstate())}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def restore_rng(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _core(m):
    return m.module if hasattr(m, "module") else m


def save_run_checkpoint(root: Path, global_step: int, student, projections, optimizer, scheduler, scaler,
                        state: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{global_step:06d}"
    tmp = root / f".step-{global_step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(_core(student), str(tmp / "student.safetensors"))
    projs = torch.nn.ModuleList([_core(p) for p in projections if p is not None])
    save_model(projs, str(tmp / "projections.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "global_step": global_step, "rng": _rng_state()}))
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_run_checkpoint(path: Path, student, projections) -> dict:
    load_model(_core(student), str(path / "student.safetensors"))
    projs = torch.nn.ModuleList([_core(p) for p in projections if p is not None])
    load_model(projs, str(path / "projections.safetensors"))
    state = json.loads((path / "state.json").read_text())
    state["optimizer"] = torch.load(path / "optimizer.pt", weights_only=True)
    sched = torch.load(path / "scheduler.pt", weights_only=True)
    state["scheduler"], state["scaler"] = sched["scheduler"], sched["scaler"]
    return state
