"""Where training runs: device choice, torchrun/DDP process groups, rank-aware helpers."""
from __future__ import annotations

import inspect
import logging
import os

import torch
import torch.distributed as dist

from ..errors import CachebrewError, ConfigError

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


def _rank_gpu(local_rank: int) -> int:
    """The GPU index this torchrun process owns among the GPUs it can see.

    Usually LOCAL_RANK. When each process is given its own GPU through ``CUDA_VISIBLE_DEVICES``, every process
    sees exactly one GPU, ``cuda:0``, and ``cuda:LOCAL_RANK`` would be an invalid ordinal for LOCAL_RANK > 0.
    (On a machine with one GPU and several processes this also puts them all on ``cuda:0``; nccl then refuses
    the duplicate GPU itself.)
    """
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise CachebrewError(f"LOCAL_RANK={local_rank} but this process sees {count} GPUs: start at most {count} "
                         "processes per node (torchrun --nproc_per_node) or give each one GPU (CUDA_VISIBLE_DEVICES)")


def resolve_device(device, local_rank: int) -> torch.device:
    """The device this process trains or exports on, always with an index when it is a GPU.

    ``torch.cuda.set_device`` rejects a bare ``cuda`` (no index), and DDP, pinned-memory copies and
    RNG state are per device: so a GPU device always gets an index.

    Without torchrun (``local_rank`` -1) a bare ``cuda`` is the current device (``cuda:0`` unless the caller
    chose another) and ``cuda:N`` is taken as given.

    Under torchrun (``local_rank`` >= 0) each process uses one GPU, its own: a config is shared by all ranks,
    so ``cuda`` and ``cuda:0`` both mean "this rank's GPU" (``cuda:LOCAL_RANK``, or ``cuda:0`` when the
    process sees a single GPU, see `_rank_gpu`); otherwise every rank would pile onto GPU 0. Any other index
    is a ConfigError (use ``cuda``), except this rank's own index, which recipes pass on to the training loop
    after resolving it here.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} was asked for but CUDA is not available; use device='cpu'")
        if local_rank >= 0:
            own = _rank_gpu(local_rank)
            if device.index not in (None, 0, own):
                raise ConfigError(f"device: {device} under torchrun would put several ranks on one GPU; use "
                                  "'cuda' (each process takes the GPU of its LOCAL_RANK)")
            device = torch.device("cuda", own)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _accepts_device_id() -> bool:
    """init_process_group takes ``device_id`` from torch 2.3; cachebrew still supports torch 2.2."""
    try:
        return "device_id" in inspect.signature(dist.init_process_group).parameters
    except (TypeError, ValueError):  # a wrapped or builtin callable without a readable signature
        return False


def ensure_process_group(device: torch.device) -> None:
    """Join the torchrun process group if the caller has not (nccl on GPU, gloo on CPU).

    nccl is told this rank's GPU (``device_id``): without it nccl has to guess the rank's GPU for ``barrier()``
    (older torch guessed from the global rank, wrong with per-process ``CUDA_VISIBLE_DEVICES`` or several
    nodes, and a wrong guess hangs) and torch warns that the rank-to-GPU mapping is unknown.
    """
    if dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        logger.info("initialising torch.distributed (%s) from the torchrun environment", backend)
        kwargs = {"device_id": device} if backend == "nccl" and _accepts_device_id() else {}
        dist.init_process_group(backend=backend, **kwargs)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a collective: all ranks call it); one process: ``[obj]``.

    For small per-rank results (eval predictions, verification problems, checkpoint names), not tensors on the
    hot path: the objects are pickled between the processes of one job, never read from disk."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (a collective); one process: `obj`. Small objects, within one job."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
