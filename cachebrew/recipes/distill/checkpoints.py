"""Resumable run checkpoints: everything a killed `cachebrew distill` needs to end with the same weights.

    checkpoints/step-000120/
        student.safetensors   projections.safetensors   (weights: no pickle)
        optimizer.pt          scheduler.pt              (state dicts, loaded with weights_only=True)
        state.json            counters, loader position, RNG states, eval history

A checkpoint directory is written under a temporary name and renamed when complete. On `--resume` it is
untrusted input like a cache: nothing in it is unpickled beyond tensors and plain containers, and a file
that does not load is named in the error (`read_run_state`, `load_run_checkpoint`).
"""
from __future__ import annotations

import base64
import json
import logging
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ...core.files import publish_dir, unwrap
from ...core.runtime import get_world_size
from ...errors import CachebrewError

logger = logging.getLogger("cachebrew")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG streams: Python, NumPy, torch CPU and, on a GPU, the generator of its own device.

    Only the device this process trains on is saved (not ``get_rng_state_all``): each rank's dropout
    stream lives on its own GPU, and a checkpoint must not depend on how many GPUs were visible.
    """
    state = {"torch": _b64(torch.get_rng_state()), "python": _py_state(random.getstate())}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    if device is not None and device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def gather_rng_states(device: torch.device | None = None) -> list[dict]:
    """Every rank's `rng_state`, in rank order (a collective: all ranks call it; one rank: a list of one)."""
    mine = rng_state(device)
    if get_world_size() == 1:
        return [mine]
    states: list = [None] * get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def restore_rng(saved, rank: int = 0, device: torch.device | None = None, world_size: int | None = None) -> None:
    """Restore rank `rank`'s streams from `gather_rng_states`' list (or one state, as older checkpoints hold).

    A run resumed with another number of ranks cannot replay their dropout streams; it continues with
    rank 0's (or its own, where it exists) and says so. A GPU state is restored only onto a GPU.
    """
    states = saved if isinstance(saved, list) else [saved]
    world = world_size if world_size is not None else get_world_size()
    if len(states) != world:
        logger.warning("the checkpoint holds RNG states of %d rank(s), this run has %d: dropout after the resume "
                       "will not match an uninterrupted run", len(states), world)
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(_unb64(state["torch"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # older checkpoints: every visible GPU's state; this process's device is ours
        index = device.index if device is not None and device.index is not None else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(cuda), device)


@dataclass
class RunCheckpoint:
    """What one checkpoints/step-N holds.

    `student` is a whole (unsharded) module and `optimizer_state` a whole state dict: a sharded run gathers both
    first (`TrainingLoop.optimizer_state`), so its checkpoint has the same files as any other. `state` is the
    JSON part (counters, position, history, config); `rng_states` every rank's (`gather_rng_states`)."""

    global_step: int
    student: Any
    projections: list
    optimizer_state: dict
    scheduler: Any
    scaler: Any
    state: dict
    rng_states: list[dict]


def save_run_checkpoint(root: Path, ckpt: RunCheckpoint, keep: int) -> Path:
    """Rank 0 publishes `ckpt` as root/step-N (complete or absent) and keeps the newest `keep` of them."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{ckpt.global_step:06d}"
    tmp = root / f".step-{ckpt.global_step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(unwrap(ckpt.student), str(tmp / "student.safetensors"))
    projs = torch.nn.ModuleList([unwrap(p) for p in ckpt.projections if p is not None])
    save_model(projs, str(tmp / "projections.safetensors"))
    torch.save(ckpt.optimizer_state, tmp / "optimizer.pt")
    torch.save({"scheduler": ckpt.scheduler.state_dict() if ckpt.scheduler is not None else None,
                "scaler": ckpt.scaler.state_dict() if ckpt.scaler is not None else None}, tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({**ckpt.state, "global_step": ckpt.global_step,
                                                "rng": ckpt.rng_states}))
    publish_dir(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _load(path: Path, load):
    """``load(path)``, with any failure reported as this file's (a checkpoint may have been replaced)."""
    try:
        return load(path)
    except FileNotFoundError:
        raise CachebrewError(f"{path}: missing; the checkpoint is incomplete") from None
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler; its advice (weights_only=False) is not ours
        unsupported = [line.strip() for line in str(e).splitlines() if line.strip().startswith("Unsupported")]
        raise CachebrewError(f"{path}: cannot load this checkpoint file (it holds more than tensors and plain "
                             f"containers{': ' + unsupported[0] if unsupported else ''}); nothing in it was run, "
                             "and checkpoint files are never loaded with a general unpickler") from None
    except Exception as e:  # safetensors and json raise their own types
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise CachebrewError(f"{path}: cannot load this checkpoint file ({type(e).__name__}: {why}); only "
                             "tensors, plain containers and JSON are read from a checkpoint") from None


def read_run_state(path: Path) -> dict:
    """state.json of checkpoint `path` (counters, config, RNG states, history)."""
    state = _load(path / "state.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(state, dict):
        raise CachebrewError(f"{path / 'state.json'}: not a checkpoint state (a JSON object)")
    return state


def load_run_checkpoint(path: Path, student, projections) -> dict:
    """Load the weights into `student` (None: not on this rank, as a sharded run loads them on rank 0 and scatters
    them) and the projections; the rest of the state, the optimizer's included, is returned."""
    if student is not None:
        _load(path / "student.safetensors", lambda p: load_model(unwrap(student), str(p)))
    projs = torch.nn.ModuleList([unwrap(p) for p in projections if p is not None])
    _load(path / "projections.safetensors", lambda p: load_model(projs, str(p)))
    state = read_run_state(path)
    # onto the CPU whatever device saved them: optimizer.load_state_dict moves each state tensor to its
    # parameter's device, so a GPU checkpoint resumes on CPU and no rank materialises it on cuda:0 first
    tensors = lambda p: torch.load(p, weights_only=True, map_location="cpu")  # never a general unpickler
    state["optimizer"] = _load(path / "optimizer.pt", tensors)
    sched = _load(path / "scheduler.pt", tensors)
    state["scheduler"], state["scaler"] = sched["scheduler"], sched["scaler"]
    return state
