"""Walking nested batches (dicts, lists, tuples of tensors), which the loader and the training loop both do."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch


def iter_tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor inside a (nested) mapping / list / tuple, depth first; other values are skipped."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


def scalars_to_host(tensors: list[torch.Tensor]) -> list[float]:
    """Many 0-d (or 1-element) tensors as floats in one device-to-host transfer, so logging syncs once."""
    if not tensors:
        return []
    return torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
