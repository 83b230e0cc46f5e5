"""`cachebrew distill`: train a student from teacher caches, with no teacher in memory.

setup (seed → process group → caches → student → distiller → optimizer/schedule → resume state)
→ train (the shared distiller loop; evaluation at each checkpoint, resumable checkpoints by step hook)
→ save (best and last students, loadable with from_pretrained; results.json) → cleanup.
The loaders are built before the student because the student's head size comes from the caches.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache.loader import CacheBatches, CacheLoader
from ..configurations import TrainingConfig
from ..core.files import atomic_write_text
from ..core.models import hf_adaptor
from ..core.training import make_optimizer, resolve_amp, save_student, seed_everything, warmup_linear
from ..distillers import GeneralDistiller, MultiTaskDistiller
from ..distillers.batches import move_to_device
from ..distillers.loop import ResumeState, StepState
from ..errors import CacheFormatError, CachebrewError
from ..paths import resolve_path
from ..runtime import ensure_process_group, get_rank, get_world_size, resolve_device, resolve_local_rank
from ..version import __version__
from .checkpoints import (gather_rng_states, latest_checkpoint, load_run_checkpoint, restore_rng,
                          save_run_checkpoint)
from .config import DistillRunConfig, TaskConfig
from .metrics import accuracy, entity_f1
from .student import build_multitask_student, build_student

logger = logging.getLogger("cachebrew")


@dataclass
class DistillResult:
    output_dir: str
    global_step: int
    best: dict | None
    final: dict | None
    teacher: dict | None
    seconds: float
    examples_per_second: float


def _num_labels(ds: CacheBatches) -> int:
    m = ds.joined.manifest
    for _, spec in ds.joined.specs:
        if spec.kind == "logits":
            return int(spec.shape[-1])
    if m.label_names:
        return len(m.label_names)
    raise CachebrewError(f"{ds.joined.readers[0].path}: no teacher logits and no label names; cannot size the head")


def _verify_caches(readers):
    """Every shard's checksum, rows and schema, before the student sees a byte of it."""
    seen = set()
    for reader in readers:
        if reader.path in seen:
            continue
        seen.add(reader.path)
        problems = reader.verify()
        if problems:
            raise CacheFormatError(f"{reader.path}: {len(problems)} bad shard(s), not training on it: "
                                   + "; ".join(problems[:5]) + " (re-export or re-pull it; train.verify_caches: "
                                   "false skips this check)")


@torch.no_grad()
def evaluate(model, ds: CacheBatches, device, label_names, task=None) -> tuple[dict, dict | None]:
    """(student metrics, teacher metrics from the cached logits or None)."""
    model = model.module if hasattr(model, "module") else model
    was_training = model.training
    model.eval()
    preds, golds, t_preds = [], [], []
    try:
        for batch in ds:
            student = move_to_device(batch["student"], device)
            labels = student.pop("labels")
            logits = model(**student).logits
            cached = batch["teacher_cache"].get("logits")
            if ds.token_level:
                keep = labels != -100
                for i in range(labels.size(0)):
                    golds.append(labels[i][keep[i]].tolist())
                    preds.append(logits[i].argmax(-1)[keep[i]].tolist())
                    if cached is not None:
                        t_preds.append(cached[i].argmax(-1)[keep[i].cpu()].tolist())
            else:
                golds += labels.tolist()
                preds += logits.argmax(-1).tolist()
                if cached is not None:
                    t_preds += cached.argmax(-1).tolist()
    finally:
        model.train(was_training)

    def score(p):
        if not ds.token_level:
            return {"accuracy": accuracy(p, golds)}
        names = label_names or []
        to_tags = lambda seqs: [[names[i] if i < len(names) else "O" for i in s] for s in seqs]
        r = entity_f1(to_tags(p), to_tags(golds))
        r["token_accuracy"] = accuracy([x for s in p for x in s], [x for s in golds for x in s])
        return r

    return score(preds), (score(t_preds) if t_preds else None)


def run_distill(cfg: DistillRunConfig, resume: bool = False) -> DistillResult:
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    tc = cfg.train
    local_rank = resolve_local_rank(None)
    device = resolve_device(tc.device, local_rank)
    if local_rank != -1:
        ensure_process_group(device)  # before the loaders: they split batches by rank
    rank = get_rank()
    world_size = get_world_size()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if not resume and latest_checkpoint(out / "checkpoints") is not None:
        raise CachebrewError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
                             "or choose another output_dir")
    d_config = cfg.distillation_config()
    want_attention = any(im.feature == "attention" for im in d_config.intermediate_matches)
    multi_task = bool(cfg.tasks)
    tasks = cfg.tasks or {"default": TaskConfig(cfg.caches, cfg.eval_cache)}

    # 1. data: one loader per task, reading only the teacher outputs the losses use
    features = {("logits", None)} | {(im.feature, layer) for im in d_config.intermediate_matches
                                     for layer in (im.layer_T if isinstance(im.layer_T, list) else [im.layer_T])}

    def batches(paths, shuffle, task):
        return CacheBatches(paths, tc.batch_size, shuffle=shuffle, seed=cfg.seed, buffer_size=tc.shuffle_buffer,
                            teachers=cfg.teachers, teacher_weights=cfg.teacher_weights,
                            task=task if multi_task else None, features=features)

    train_sets = {name: batches(t.caches, True, name) for name, t in tasks.items()}
    eval_sets = {name: CacheBatches(t.eval_cache, tc.batch_size, shuffle=False, rank=0, world_size=1,
                                    task=name if multi_task else None, features={("logits", None)})
                 for name, t in tasks.items() if t.eval_cache}
    # Each DataLoader iterator draws a base seed; from its own generator, not the global RNG, so that a
    # resumed run (which creates its first iterator mid-epoch) sees the same dropout masks.
    workers = tc.num_workers if tc.num_workers is not None else (2 if device.type == "cuda" else 0)
    loaders = {name: CacheLoader(ds, num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
               for name, ds in train_sets.items()}
    if tc.verify_caches:
        _verify_caches([r for ds in (*train_sets.values(), *eval_sets.values()) for r in ds.joined.readers])
    for name, ds in train_sets.items():
        logger.info("task %s: %d rows, %d batches per epoch on this rank, teachers %s", name, ds.joined.num_rows,
                    len(ds), ds.joined.teachers)

    # 2. student
    token_level = {name: ds.token_level for name, ds in train_sets.items()}
    num_labels = {name: _num_labels(ds) for name, ds in train_sets.items()}
    if multi_task:
        student = build_multitask_student(cfg.student, num_labels, token_level, want_attention)
    else:
        student = build_student(cfg.student, token_level["default"], num_labels["default"], want_attention,
                                train_sets["default"].joined.manifest.label_names)
    student.to(device)
    first = train_sets[next(iter(tasks))].joined.manifest
    tokenizer_source = first.config.get("tokenizer") or next((t.get("source") for t in first.teachers.values()), None)
    tokenizer_source = resolve_path(tokenizer_source) if tokenizer_source else None

    # 3. distiller, optimizer and schedule
    accum = tc.gradient_accumulation_steps
    if tc.steps is not None:
        total_steps = tc.steps
        eval_every = tc.eval_every or tc.save_every or max(total_steps // 5, 1)
    else:
        steps_per_epoch = len(loaders["default"]) // accum
        if steps_per_epoch == 0:
            raise CachebrewError(f"train.batch_size={tc.batch_size} x gradient_accumulation_steps={accum} is larger "
                                 f"than the cache ({train_sets['default'].joined.num_rows} rows)")
        total_steps = steps_per_epoch * tc.epochs
        eval_every = tc.eval_every
    amp = resolve_amp(tc.amp, device)
    t_config = TrainingConfig(
        output_dir=str(out / "snapshots"), log_dir=str(out / "tb") if rank == 0 else None, device=str(device),
        amp=amp, gradient_accumulation_steps=accum, ckpt_steps=eval_every if tc.steps is not None else None,
        progress_bar=tc.progress_bar, keep_checkpoints=1, local_rank=local_rank, log_steps=tc.log_steps)
    if multi_task:
        distiller = MultiTaskDistiller(t_config, d_config, None, student, None, {t: hf_adaptor for t in tasks})
    else:
        distiller = GeneralDistiller(t_config, d_config, None, student, None, hf_adaptor)
    optimizer = make_optimizer(student, tc.lr, tc.weight_decay)
    schedule = {"num_warmup_steps": int(tc.warmup_ratio * total_steps), "num_training_steps": total_steps}

    # 4. evaluation and checkpoints
    history: list[dict] = []
    best: dict | None = None
    teacher_metric: dict | None = None
    main_key = "f1" if any(token_level.values()) else "accuracy"

    def evaluate_all(model, step):
        nonlocal best, teacher_metric
        if not eval_sets:
            return
        row = {"step": step}
        teacher_row = {}
        for name, ds in eval_sets.items():
            m, t = evaluate(model, ds, device, ds.joined.manifest.label_names, name if multi_task else None)
            row[name] = m
            if t is not None:
                teacher_row[name] = t
        row["score"] = sum(row[n][main_key] for n in eval_sets) / len(eval_sets)
        history.append(row)
        teacher_metric = teacher_row or teacher_metric
        logger.info("eval at step %d: %s", step, {k: v for k, v in row.items() if k != "step"})
        if best is None or row["score"] > best["score"]:
            best = row
            if rank == 0:
                save_student(model, out / "best", tokenizer_source)

    save_every = tc.save_every or eval_every  # None (epochs, no eval_every): at every epoch end

    def checkpoint_hook(s: StepState):
        epoch, consumed = s.epoch, s.step + 1
        # the epoch's last optimizer step; micro-batches left over by accumulation still follow it
        epoch_end = tc.steps is None and consumed >= s.total_steps // tc.epochs * accum
        if tc.steps is None and consumed >= len(loaders["default"]):
            epoch, consumed = epoch + 1, 0
        if tc.steps is None and tc.eval_every and s.global_step % tc.eval_every == 0 and not epoch_end:
            evaluate_all(distiller.model_S, s.global_step)  # extra evaluations inside epochs
        due = (s.global_step == s.total_steps or (save_every is not None and s.global_step % save_every == 0)
               or (save_every is None and epoch_end))
        if not due:
            return
        rng_states = gather_rng_states(device)  # every rank's dropout stream, so each resumes its own
        if rank != 0:
            return
        state = {"writer_step": s.writer_step, "epoch": epoch, "step": consumed, "history": history, "best": best,
                 "teacher": teacher_metric, "cachebrew": __version__, "config": cfg.to_dict(),
                 "loader": {"world_size": world_size, "num_workers": workers}}
        if multi_task:
            state["task_counts"] = dict(distiller.sampled_tasks)
        save_run_checkpoint(out / "checkpoints", s.global_step, distiller.model_S, getattr(distiller, "projs", []),
                            s.optimizer, s.scheduler, s.scaler, state, tc.keep_checkpoints, rng_states)

    distiller.add_step_hook(checkpoint_hook)
    start_step = 0
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if resume and ckpt is None:  # killed before its first checkpoint: `--resume` is always safe to pass
        logger.info("--resume: no complete checkpoint under %s yet; starting from step 0", out / "checkpoints")
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())["config"]
        if saved != cfg.to_dict():
            changed = sorted(k for k in set(saved) | set(cfg.to_dict()) if saved.get(k) != cfg.to_dict().get(k))
            raise CachebrewError(f"--resume: the config differs from the run in {out} (fields {changed}); "
                                 "a resumed run must use the same config")
        state = load_run_checkpoint(ckpt, student, getattr(distiller, "projs", []))
        loader_then = state.get("loader", {"world_size": world_size, "num_workers": workers})
        if loader_then != {"world_size": world_size, "num_workers": workers}:
            logger.warning("--resume: the run was split over %s, this one over %s; the rest of the epoch is read in "
                           "another order, so the weights will not equal an uninterrupted run's", loader_then,
                           {"world_size": world_size, "num_workers": workers})
        restore_rng(state["rng"], rank, device)
        history[:] = state["history"]
        best, teacher_metric = state["best"], state["teacher"]
        start_step = state["global_step"]
        distiller.resume_from(ResumeState(state["global_step"], state["writer_step"], state["epoch"], state["step"],
                                          state["optimizer"], state["scheduler"], state["scaler"],
                                          extra={"task_counts": state.get("task_counts", {})}))
        logger.info("resuming %s from %s", out, ckpt.name)

    # 5. train
    t_train = time.perf_counter()
    with distiller:
        if multi_task:
            steps = distiller.train(optimizer, loaders, num_steps=total_steps, scheduler_class=warmup_linear,
                                    scheduler_args=schedule, max_grad_norm=tc.max_grad_norm, tau=cfg.tau,
                                    callback=evaluate_all)
        elif tc.steps is not None:
            steps = distiller.train(optimizer, loaders["default"], num_steps=total_steps, scheduler_class=warmup_linear,
                                    scheduler_args=schedule, max_grad_norm=tc.max_grad_norm, callback=evaluate_all)
        else:
            steps = distiller.train(optimizer, loaders["default"], num_epochs=tc.epochs, scheduler_class=warmup_linear,
                                    scheduler_args=schedule, max_grad_norm=tc.max_grad_norm, callback=evaluate_all)
    train_seconds = time.perf_counter() - t_train
    examples = (steps - start_step) * tc.batch_size * accum * world_size

    # 6. save
    final = history[-1] if history and history[-1]["step"] == steps else None
    if rank == 0:
        save_student(distiller.model_S, out / "last", tokenizer_source)
        if best is None:
            save_student(distiller.model_S, out / "best", tokenizer_source)
        results = {"global_step": steps, "best": best, "final": final, "teacher": teacher_metric,
                   "history": history, "train_seconds": train_seconds,
                   "examples_per_second": examples / train_seconds if train_seconds else None,
                   "caches": {n: [r.manifest.fingerprint for r in ds.joined.readers] for n, ds in train_sets.items()},
                   "cachebrew": __version__, "config": cfg.to_dict()}
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return DistillResult(str(out), steps, best, final, teacher_metric, time.perf_counter() - t_start,
                         examples / train_seconds if train_seconds else 0.0)
