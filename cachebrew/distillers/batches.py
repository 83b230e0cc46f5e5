"""How a batch becomes teacher and student outputs, and the adaptor-output helpers.

A batch is a tuple/list (``model(*batch)``), a mapping (``model(**batch)``), or a mapping with
``'student'`` plus ``'teacher'`` and/or ``'teacher_cache'``. With ``'teacher_cache'`` the teacher is
never called: the cache stands in for the teacher's outputs (``adaptor_T`` is applied to it), or, when
``adaptor_T`` is None, it already is the adaptor's dict (``{'logits': ..., 'hidden': [...]}``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.tensors import iter_tensors
from ..errors import BatchError

CACHE_KEY = "teacher_cache"


def move_to_device(batch, device, non_blocking=False):
    """Put every tensor in a (nested) batch on `device`; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return tuple(move_to_device(x, device, non_blocking) for x in batch)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
        return moved if type(batch) is dict else _same_mapping_type(batch, moved)
    return batch


def prefetch_to_device(items, device):
    """Yield ``(epoch, step, batch)`` items with each batch already on `device`, copied one item ahead.

    On a GPU the copy of batch N+1 (from the DataLoader's pinned memory) runs on a side stream while the
    compute stream works on batch N; the compute stream waits for it only when it reaches N+1. Elsewhere
    the items pass through unchanged (split_batch moves them as before).
    """
    device = torch.device(device)
    if device.type != "cuda":
        yield from items
        return
    side = torch.cuda.Stream(device)

    def load(item):
        epoch, step, batch = item
        with torch.cuda.stream(side):
            return epoch, step, move_to_device(batch, device, non_blocking=True)

    it = iter(items)
    ahead = next(it, None)
    ahead = None if ahead is None else load(ahead)
    while ahead is not None:
        current = ahead
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(side)
        for t in iter_tensors(current[2]):
            t.record_stream(compute)  # made on the side stream, used (and freed) on the compute stream
        following = next(it, None)
        ahead = None if following is None else load(following)
        yield current


def _same_mapping_type(original, moved):
    """Rebuild HF ModelOutput / BatchEncoding so adaptors keep attribute access (outputs.logits)."""
    for build in (lambda: type(original)(**moved), lambda: type(original)(moved)):
        try:
            return build()
        except Exception:
            continue
    return moved


def call_model(model, batch, args):
    return model(**batch, **args) if isinstance(batch, Mapping) else model(*batch, **args)


def auto_forward(model, batch, args):
    """Forward one teacher, or each teacher of a list / dict of teachers."""
    if isinstance(model, (list, tuple)):
        return [call_model(m, batch, args) for m in model]
    if isinstance(model, dict):
        return {k: call_model(m, batch, args) for k, m in model.items()}
    return call_model(model, batch, args)


def is_split_batch(batch) -> bool:
    return isinstance(batch, Mapping) and "student" in batch and ("teacher" in batch or CACHE_KEY in batch)


def split_batch(batch, device):
    """Return (teacher_batch, student_batch, teacher_cache or None), all on `device`.

    Copies to a GPU are asynchronous: from pinned memory (DataLoader(pin_memory=True)) they overlap compute.
    """
    nb = torch.device(device).type == "cuda"
    if is_split_batch(batch):
        student_batch = move_to_device(batch["student"], device, nb)
        teacher_batch = move_to_device(batch["teacher"], device, nb) if "teacher" in batch else student_batch
        cache = batch.get(CACHE_KEY)
        return teacher_batch, student_batch, None if cache is None else move_to_device(cache, device, nb)
    batch = move_to_device(batch, device, nb)
    return batch, batch, None


def teacher_outputs(model_T, teacher_batch, cache, args):
    """The cached outputs when there are any; otherwise one no-grad teacher forward."""
    if cache is not None:
        return cache
    if model_T is None:
        raise BatchError("model_T is None, so every batch must carry the teacher's outputs under "
                         f"'{CACHE_KEY}' (a dict batch {{'student': ..., '{CACHE_KEY}': ...}})")
    with torch.no_grad():
        return auto_forward(model_T, teacher_batch, args)


def get_outputs_from_batch(batch, device, model_T, model_S, args, no_teacher_forward=False):
    """Return ((teacher_batch, results_T), (student_batch, results_S)); results_T is None when skipped."""
    teacher_batch, student_batch, cache = split_batch(batch, device)
    results_T = None if no_teacher_forward else teacher_outputs(model_T, teacher_batch, cache, args)
    results_S = call_model(model_S, student_batch, args)
    return (teacher_batch, results_T), (student_batch, results_S)


def has_cache(batch) -> bool:
    return isinstance(batch, Mapping) and CACHE_KEY in batch


def apply_adaptor(adaptor, batch, outputs, from_cache: bool):
    """Run an adaptor, or take a cached adaptor dict as is when no adaptor is given for the cache."""
    if adaptor is None:
        if not from_cache:
            raise BatchError("an adaptor is required for model outputs; only a 'teacher_cache' may skip adaptor_T")
        if not isinstance(outputs, Mapping):
            raise BatchError(f"with adaptor_T=None, '{CACHE_KEY}' must be a dict of adaptor keys "
                             f"(logits, hidden, attention, ...), got {type(outputs).__name__}")
        return post_adaptor(dict(outputs))
    return post_adaptor(adaptor(batch, outputs))


def post_adaptor(dict_object):
    """Wrap single tensors of the list-valued adaptor keys in lists."""
    if not isinstance(dict_object, Mapping):
        raise BatchError(f"an adaptor must return a dict, got {type(dict_object).__name__}")
    for key in ("logits", "logits_mask", "losses", "labels"):
        if key in dict_object and not isinstance(dict_object[key], (list, tuple)):
            dict_object[key] = [dict_object[key]]
    return dict_object
