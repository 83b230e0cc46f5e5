"""Where training runs: device choice, torchrun/DDP process groups, rank-aware helpers."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger("cachebrew")


def resolve_local_rank(local_rank: int | None) -> int:
    """None means: the LOCAL_RANK torchrun sets when WORLD_SIZE > 1, else -1 (no DDP)."""
    if local_rank is not None:
        return local_rank
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return -1


def launch_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) that torchrun set for this process; (1, 0, -1) when not launched by it.

    Read before any process group exists (export decides from them whether to create one).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else -1
    return world, rank, local_rank


def resolve_device(device, local_rank: int) -> torch.device:
    """The device this process trains or exports on, always with an index when it is a GPU.

    ``torch.cuda.set_device`` rejects a bare ``cuda`` (no index), and DDP, pinned-memory copies and
    RNG state are per device: so a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun and the
    current device (``cuda:0`` unless the caller chose another) otherwise.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} was asked for but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank >= 0 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def ensure_process_group(device: torch.device) -> None:
    """Join the torchrun process group if the caller has not (nccl on GPU, gloo on CPU)."""
    if dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        logger.info("initialising torch.distributed (%s) from the torchrun environment", backend)
        dist.init_process_group(backend=backend)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
