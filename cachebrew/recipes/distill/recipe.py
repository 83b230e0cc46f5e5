"""`cachebrew distill`: train a student from teacher caches, with no teacher in memory.

`DistillRecipe` reads top to bottom as the job runs: ``setup`` (seed → process group → caches → student →
distiller, optimizer and schedule → the latest checkpoint with ``--resume``) → ``train`` (the shared
distiller loop; ``evaluate`` at each plan checkpoint keeps ``best/``; ``save_checkpoint`` writes
``checkpoints/step-N``, the run's one checkpoint system) → ``save`` (``last/``, ``results.json``).
The loaders are built before the student because the student's head size comes from the caches, and so does
its kind: a causal-LM teacher's cache (dense or sparse logits) trains a causal-LM student
(``AutoModelForCausalLM``, labels = its own inputs) that is evaluated and kept by held-out perplexity.
Under torchrun the student is replicated (DDP), or with ``train.sharding: fsdp`` sharded (FSDP2) before its
optimizer is built; a sharded student is saved and loaded whole through a copy on rank 0's CPU, so its
checkpoints, ``best/`` and ``last/`` are the same files as a replicated run's.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...components.loader import CacheBatches, CacheLoader, RankShare
from ...configurations import TrainingConfig
from ...core.files import atomic_write_text
from ...core.files import unwrap
from ...core.models import hf_adaptor, without_training_outputs
from ...core.training import make_optimizer, resolve_amp, save_student, seed_everything, warmup_linear
from ...distillers import GeneralDistiller, MultiTaskDistiller
from ...distillers.batches import move_to_device
from ...distillers.loop import (ResumeState, StepState, TrainingLoop, full_state_dict, is_sharded,
                                load_full_state_dict, shard_module)
from ...errors import CacheFormatError, CachebrewError, ConfigError
from ...losses import global_denominators
from ...core.paths import resolve_path
from ...core.runtime import (all_gather_objects, broadcast_object, ensure_process_group, get_rank, get_world_size, resolve_device,
                             resolve_local_rank)
from ...version import __version__
from .checkpoints import (RunCheckpoint, gather_rng_states, latest_checkpoint, load_run_checkpoint, read_run_state,
                          restore_rng, save_run_checkpoint)
from .config import DistillRunConfig, TaskConfig
from ...components.metrics import lm_score, next_token_counts, predictions, score, selection_score
from ...components.retokenize import StudentTokenizer, cross_tokenizer_problems
from ...components.students import build_multitask_student, build_student

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


def _verify_caches(readers, local_rank: int):
    """Every shard's checksum, rows and schema, before the student sees a byte of it, checked once per copy.

    Under torchrun a local cache directory is verified by each node's local rank 0 (nodes may hold their own
    copies), a URI cache (s3://...) by rank 0 alone (one download, not one per rank); the outcome is gathered,
    so every rank stops with the same error, or none does, and none starts training before the check is done."""
    seen, problems = set(), []
    for reader in readers:
        if reader.path in seen:
            continue
        seen.add(reader.path)
        if (local_rank <= 0) if reader.location.local else (get_rank() == 0):
            bad = reader.verify()
            if bad:
                problems.append(f"{reader.path}: {len(bad)} bad shard(s), not training on it: " + "; ".join(bad[:5]))
    problems = sorted({p for rank_problems in all_gather_objects(problems) for p in rank_problems})
    if problems:
        raise CacheFormatError("; ".join(problems) + " (re-export or re-pull it; train.verify_caches: false skips "
                               "this check)")


@contextlib.contextmanager
def eval_mode(model):
    """The unwrapped model in eval mode, put back as it was (the loop evaluates mid-training).

    Evaluation reads logits only. A Hugging Face student built to match attention maps runs eager attention and
    returns every layer's hidden states and maps; for evaluation it runs SDPA and returns neither (a 2-layer
    MiniLM student evaluates about a fifth faster on CPU), then training gets its settings back."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    eager = getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager" \
        and getattr(type(model), "_supports_sdpa", False) and hasattr(model, "set_attn_implementation")
    try:
        with without_training_outputs(model):  # attention maps off before SDPA, back on after eager again
            if eager:
                model.set_attn_implementation("sdpa")
            try:
                yield model
            finally:
                if eager:
                    model.set_attn_implementation("eager")
    finally:
        model.train(was_training)


def _every_ranks_batches(model, ds: CacheBatches):
    """(batch, counted) over this rank's share of an eval cache.

    A sharded student's forward is a collective (each layer gathers its weights from every rank), so every rank
    must run as many forwards as the rank with the largest share: a shorter share repeats its last batch, not
    counted. A replicated student just reads its share."""
    if not is_sharded(unwrap(model)):
        for batch in ds:
            yield batch, True
        return
    mine = len(ds)
    most = max(all_gather_objects(mine))
    if mine == 0 and most > 0:
        raise CachebrewError(f"{ds.joined.readers[0].path}: the eval cache has fewer batches than there are ranks, "
                             "and a sharded student needs one on each; lower train.batch_size or use a larger eval "
                             "cache")
    last = None
    for batch in ds:
        last = batch
        yield batch, True
    for _ in range(most - mine):
        yield last, False


def scored_batches(model, ds: CacheBatches, device):
    """(student logits, labels, the cache's teacher logits or None) for each batch of this rank's share, the model
    in eval mode (`eval_mode`); a sharded student's extra forwards (`_every_ranks_batches`) are run, not yielded."""
    with eval_mode(model) as model:
        for batch, counted in _every_ranks_batches(model, ds):
            student = move_to_device(batch["student"], device)
            labels = student.pop("labels")
            logits = model(**student).logits
            if counted:
                yield logits, labels, batch["teacher_cache"].get("logits")


@torch.no_grad()
def evaluate(model, ds: CacheBatches, device, label_names) -> tuple[dict, dict | None]:
    """(student metrics, teacher metrics from the cached logits or None), both by `components.metrics.score`."""
    if ds.causal_lm:
        return evaluate_lm(model, ds, device)
    preds, golds, t_preds = [], [], []
    for logits, labels, cached in scored_batches(model, ds, device):
        p, g = predictions(logits, labels)
        preds += p
        golds += g
        if cached is not None:
            t_preds += predictions(cached, labels.cpu())[0]
    # each rank scored its own share of the eval cache (RankShare(evaluation=True)): every rank gets the
    # whole set's score, so all ranks agree on the best step
    shares = all_gather_objects((preds, golds, t_preds))
    preds, golds, t_preds = ([x for share in shares for x in share[i]] for i in range(3))
    return score(preds, golds, label_names), (score(t_preds, golds, label_names) if t_preds else None)


@torch.no_grad()
def evaluate_lm(model, ds: CacheBatches, device) -> tuple[dict, dict | None]:
    """A causal LM's held-out perplexity and next-token accuracy over the eval cache's rows; the teacher's too when
    the cache holds its dense logits (a sparse cache keeps K slots, not a distribution to score)."""
    student_sums, teacher_sums = [0.0, 0, 0], [0.0, 0, 0]
    for logits, labels, cached in scored_batches(model, ds, device):
        for i, x in enumerate(next_token_counts(logits, labels)):
            student_sums[i] += x
        if isinstance(cached, torch.Tensor):
            for i, x in enumerate(next_token_counts(cached, labels.cpu())):
                teacher_sums[i] += x
    shares = all_gather_objects((student_sums, teacher_sums))  # each rank's share of the eval cache
    student_sums, teacher_sums = ([sum(share[k][i] for share in shares) for i in range(3)] for k in range(2))
    return lm_score(*student_sums), (lm_score(*teacher_sums) if teacher_sums[2] else None)


class DistillRecipe:
    """One `cachebrew distill` run: ``setup(resume)`` → ``train()`` → ``save()`` (see the module docstring)."""

    def __init__(self, cfg: DistillRunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.history: list[dict] = []
        self.best: dict | None = None
        self.teacher_metric: dict | None = None
        self.start_step = 0

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self.t_start = time.perf_counter()
        seed_everything(cfg.seed)
        self.local_rank = local_rank = resolve_local_rank(None)
        self.device = resolve_device(tc.device, local_rank)
        if local_rank != -1:
            ensure_process_group(self.device)  # before the loaders: they split batches by rank
        elif tc.sharding == "fsdp":
            raise ConfigError("train.sharding: fsdp shards the student over torchrun's ranks; launch with torchrun "
                              "(or drop sharding)")
        self.rank, self.world_size = get_rank(), get_world_size()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self._run_checkpoint(resume)  # rank 0's; before any other work, so a refusal costs nothing
        self.d_config = cfg.distillation_config()
        self.multi_task = bool(cfg.tasks)
        self.tasks = cfg.tasks or {"default": TaskConfig(cfg.caches, cfg.eval_cache)}
        self._setup_data()
        self._setup_student()
        self._setup_distiller(local_rank)
        if resume and not self.resumable:
            raise CachebrewError(f"--resume: {type(self.distiller).__name__} writes no resumable checkpoints")
        if resume:
            if ckpt is None:  # killed before its first checkpoint: `--resume` is always safe to pass
                logger.info("--resume: no complete checkpoint under %s yet; starting from step 0",
                            self.out / "checkpoints")
            else:
                self.load_checkpoint(ckpt)
                if ckpt.parent.name != "checkpoints":  # a copy received from rank 0 (see _run_checkpoint)
                    shutil.rmtree(ckpt.parent, ignore_errors=True)

    def _run_checkpoint(self, resume: bool) -> Path | None:
        """The checkpoint a run continues from: rank 0's latest (a collective; every rank gets the same answer).

        Rank 0 writes the run's checkpoints, so on several nodes without a shared filesystem only its node holds
        them: a rank whose output_dir lacks the chosen checkpoint receives its files from rank 0 into a private
        folder and loads them from there. Without `resume`, any checkpoint there is a refusal on every rank."""
        root = self.out / "checkpoints"
        latest = latest_checkpoint(root) if self.rank == 0 else None
        name = broadcast_object(latest.name if latest else None)
        if name is None:
            return None
        if not resume:
            raise CachebrewError(f"{self.out} holds checkpoints of an earlier run: pass --resume to continue it, "
                                 "or choose another output_dir")
        path = root / name
        have = all_gather_objects((path / "state.json").is_file())
        if all(have):
            return path
        files = {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()} if self.rank == 0 else None
        files = broadcast_object(files)
        if have[self.rank]:
            return path
        logger.warning("--resume: %s is not on this node; received it from rank 0", path)
        received = root / f".from-rank-0.rank-{self.rank}" / name
        shutil.rmtree(received.parent, ignore_errors=True)
        received.mkdir(parents=True)
        for file_name, data in files.items():
            (received / file_name).write_bytes(data)
        return received

    def _setup_data(self) -> None:
        """One loader per task, reading only the teacher outputs the losses use; the eval caches; verification."""
        cfg, tc = self.cfg, self.cfg.train
        features = {("logits", None)} | {(im.feature, layer) for im in self.d_config.intermediate_matches
                                         for layer in (im.layer_T if isinstance(im.layer_T, list) else [im.layer_T])}
        task_of = lambda name: name if self.multi_task else None
        student_tokenizer = StudentTokenizer.load(cfg.student.tokenizer) if cfg.student.tokenizer else None
        self.train_sets = {name: CacheBatches(t.caches, tc.batch_size, shuffle=True, seed=cfg.seed,
                                              buffer_size=tc.shuffle_buffer, teachers=cfg.teachers,
                                              teacher_weights=cfg.teacher_weights, task=task_of(name),
                                              features=features, student_tokenizer=student_tokenizer,
                                              ranks=RankShare(self.rank, self.world_size, tc.rank_split))
                           for name, t in self.tasks.items()}
        self.train_sets_split_batches = any(ds.split_batches for ds in self.train_sets.values())
        self.eval_sets = {name: CacheBatches(t.eval_cache, tc.batch_size, shuffle=False, task=task_of(name),
                                             ranks=RankShare(self.rank, self.world_size, evaluation=True),
                                             features={("logits", None)}, student_tokenizer=student_tokenizer)
                          for name, t in self.tasks.items() if t.eval_cache}
        # Each DataLoader iterator draws a base seed; from its own generator, not the global RNG, so that a
        # resumed run (which creates its first iterator mid-epoch) sees the same dropout masks.
        self.num_workers = tc.num_workers if tc.num_workers is not None else (2 if self.device.type == "cuda" else 0)
        self.loaders = {name: CacheLoader(ds, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                          persistent_workers=self.num_workers > 0,
                                          generator=torch.Generator().manual_seed(cfg.seed))
                        for name, ds in self.train_sets.items()}
        if tc.verify_caches:
            _verify_caches([r for ds in (*self.train_sets.values(), *self.eval_sets.values()) for r in ds.joined.readers],
                           self.local_rank)
        causal = {str(ds.joined.readers[0].path): ds.causal_lm
                  for ds in (*self.train_sets.values(), *self.eval_sets.values())}
        self.causal_lm = any(causal.values())
        if self.causal_lm and (self.multi_task or not all(causal.values())):
            kinds = ", ".join(f"{path} ({'causal LM' if c else 'classification'})" for path, c in causal.items())
            raise ConfigError(f"caches: a causal-LM student trains from causal-LM caches only, one task "
                              f"(multi-task heads are classification heads); got {kinds}")
        if student_tokenizer is not None:  # the student's text as long as the teacher's was (export max_length)
            student_tokenizer.max_length = next(iter(self.train_sets.values())).joined.manifest.config.get("max_length")
        self._check_student_tokenizer(student_tokenizer)
        for name, ds in self.train_sets.items():
            logger.info("task %s: %d rows, %d batches per epoch on this rank, teachers %s", name, ds.joined.num_rows,
                        len(ds), ds.joined.teachers)

    def _check_student_tokenizer(self, student_tokenizer) -> None:
        """A student with its own tokenizer: what it reads (the cached ids, or the text re-tokenized), refusals."""
        self.student_tokenizer = None
        if student_tokenizer is None:
            return
        sets = {**{f"caches ({n})": ds for n, ds in self.train_sets.items()},
                **{f"eval_cache ({n})": ds for n, ds in self.eval_sets.items()}}
        retokenized = {where: ds.student_tokenizer is not None for where, ds in sets.items()}
        problems = []
        for where, ds in sets.items():
            if retokenized[where]:
                problems += cross_tokenizer_problems(where, ds.alignment_inputs,
                                                     self.d_config.intermediate_matches if where.startswith("caches")
                                                     else [], student_tokenizer.gives_spans)
        if problems:
            raise ConfigError(list(dict.fromkeys(problems)))
        self.student_tokenizer = {"path": student_tokenizer.path, "fingerprint": student_tokenizer.fingerprint,
                                  "retokenized": retokenized}
        logger.info("student.tokenizer %s: %s", student_tokenizer.path,
                    "the cached text re-tokenized" if any(retokenized.values()) else "the cache's own: its ids used")

    def _setup_student(self) -> None:
        """The student, its head sized from the caches; the tokenizer files saved with it come from the export."""
        want_attention = any(im.feature == "attention" for im in self.d_config.intermediate_matches)
        token_level = {name: ds.token_level for name, ds in self.train_sets.items()}
        if self.causal_lm:  # the head is the vocabulary's, from the student's own config
            spec = self.cfg.student
            if spec.model_class is None:
                spec = dataclasses.replace(spec, model_class="AutoModelForCausalLM")
            self.student = build_student(spec, want_attention=want_attention)
        elif self.multi_task:
            num_labels = {name: _num_labels(ds) for name, ds in self.train_sets.items()}
            self.student = build_multitask_student(self.cfg.student, num_labels, token_level, want_attention)
        else:
            default = self.train_sets["default"]
            self.student = build_student(self.cfg.student, token_level=token_level["default"],
                                         num_labels=_num_labels(default), want_attention=want_attention,
                                         label_names=default.joined.manifest.label_names)
        self.replica = None
        if self.cfg.train.sharding == "fsdp":
            # whole weights are saved (best/, last/, checkpoints) and loaded through an unsharded copy on rank 0's
            # CPU, so a sharded run writes the same files as any other
            self.replica = copy.deepcopy(self.student).cpu() if self.rank == 0 else None
            # from the CPU, layer by layer onto the device: the whole student is never on one GPU; before the
            # optimizer, since sharding replaces the parameters
            shard_module(self.student, self.device)
        else:
            self.student.to(self.device)
        first = self.train_sets[next(iter(self.tasks))].joined.manifest
        source = self.cfg.student.tokenizer or first.config.get("tokenizer") or \
            next((t.get("source") for t in first.teachers.values()), None)
        self.tokenizer_source = resolve_path(source) if source else None  # saved with the student: what it reads

    def _setup_distiller(self, local_rank: int) -> None:
        """The distiller (its loop, losses and projections), AdamW and the warm-up/linear schedule."""
        tc = self.cfg.train
        accum = tc.gradient_accumulation_steps
        if tc.steps is not None:
            self.total_steps = tc.steps
            self.eval_every = tc.eval_every or tc.save_every or max(self.total_steps // 5, 1)
        else:
            steps_per_epoch = len(self.loaders["default"]) // accum
            if steps_per_epoch == 0:
                raise CachebrewError(f"train.batch_size={tc.batch_size} x gradient_accumulation_steps={accum} is "
                                     f"larger than the cache ({self.train_sets['default'].joined.num_rows} rows)")
            self.total_steps = steps_per_epoch * tc.epochs
            self.eval_every = tc.eval_every
        self.save_every = tc.save_every or self.eval_every  # None (epochs, no eval_every): at every epoch end
        amp = resolve_amp(tc.amp, self.device)
        if tc.sharding == "fsdp" and amp == "fp16":  # auto on a GPU without bf16
            raise ConfigError(f"train.amp: {tc.amp} means fp16 on {self.device}, which train.sharding: fsdp does not "
                              "support (its gradient scaler sees one rank's shards only); set train.amp: none")
        t_config = TrainingConfig(
            output_dir=str(self.out), log_dir=str(self.out / "tb") if self.rank == 0 else None, device=str(self.device),
            amp=amp, gradient_accumulation_steps=accum,
            ckpt_steps=self.eval_every if tc.steps is not None else None, progress_bar=tc.progress_bar,
            local_rank=local_rank, log_steps=tc.log_steps)
        self.distiller = self.make_distiller(t_config)
        self.resumable = isinstance(self.distiller, TrainingLoop)
        if self.resumable:
            # one checkpoint path: checkpoints/step-N from the step hook; the plan's checkpoint points only evaluate
            self.distiller.write_gs_checkpoints = False
            self.distiller.loss.causal_labels = self.causal_lm
            self.distiller.add_step_hook(self._on_step)
        else:
            logger.info("distiller %s: evaluation at its checkpoints only, no resumable checkpoints",
                        type(self.distiller).__name__)
        self.optimizer = make_optimizer(self.student, tc.lr, tc.weight_decay, tc.head_lr)
        self.schedule = {"num_warmup_steps": int(tc.warmup_ratio * self.total_steps),
                         "num_training_steps": self.total_steps}

    # -- hooks: a subclass swaps the distiller and keeps the rest of the recipe -----------------------------
    def make_distiller(self, t_config: TrainingConfig):
        """The distiller that trains ``self.student``: cachebrew's GeneralDistiller (MultiTaskDistiller for tasks).

        A subclass may return any distiller with TextBrewer's ``train(optimizer, dataloader, num_epochs=...,
        num_steps=..., scheduler_class=..., scheduler_args=..., max_grad_norm=..., callback=...)``, e.g. TextBrewer's
        own with a teacher in memory (with `train_batches` giving it the teacher's inputs). The rest of the run
        stays this recipe's: seed, loaders and their order, student, optimizer, schedule, evaluation keeping
        ``best/``, ``last/``, ``results.json``; resumable checkpoints need a cachebrew distiller (its step hook)."""
        if self.multi_task:
            return MultiTaskDistiller(t_config, self.d_config, None, self.student, None,
                                      {t: hf_adaptor for t in self.tasks})
        return GeneralDistiller(t_config, self.d_config, None, self.student, None, hf_adaptor)

    def train_batches(self, task: str):
        """What the distiller iterates for `task`: its cache loader (batches of student inputs + teacher_cache)."""
        return self.loaders[task]

    def _trained_model(self):
        return self.distiller.trained_model() if self.resumable else self.student

    # -- train --------------------------------------------------------------------------------------
    def train(self) -> int:
        """The distiller's loop over the loaders; returns the number of optimizer steps taken."""
        tc = self.cfg.train
        common = dict(scheduler_class=warmup_linear, scheduler_args=self.schedule, max_grad_norm=tc.max_grad_norm,
                      callback=self.evaluate)
        t_train = time.perf_counter()
        # ranks splitting each batch: losses averaged over the global batch, so N ranks train what one process does
        denominators = global_denominators() if self.train_sets_split_batches else contextlib.nullcontext()
        with self.distiller, denominators:
            if self.multi_task:
                steps = self.distiller.train(self.optimizer, {t: self.train_batches(t) for t in self.loaders},
                                             num_steps=self.total_steps, tau=self.cfg.tau, **common)
            elif tc.steps is not None:
                steps = self.distiller.train(self.optimizer, self.train_batches("default"), num_steps=self.total_steps,
                                             **common)
            else:
                steps = self.distiller.train(self.optimizer, self.train_batches("default"), num_epochs=tc.epochs,
                                             **common)
        if steps is None:  # TextBrewer's distillers return nothing; they run the whole plan
            steps = self.total_steps
        self.train_seconds = time.perf_counter() - t_train
        return steps

    def evaluate(self, model, step: int) -> None:
        """Score every eval cache; the best mean score so far is published as best/ (rank 0)."""
        if not self.eval_sets:
            return
        row, teacher_row = {"step": step}, {}
        for name, ds in self.eval_sets.items():
            row[name], t = evaluate(model, ds, self.device, ds.joined.manifest.label_names)
            if t is not None:
                teacher_row[name] = t
        row["score"] = sum(selection_score(row[n]) for n in self.eval_sets) / len(self.eval_sets)
        self.history.append(row)
        self.teacher_metric = teacher_row or self.teacher_metric
        logger.info("eval at step %d: %s", step, {k: v for k, v in row.items() if k != "step"})
        if self.best is None or row["score"] > self.best["score"]:
            self.best = row
            whole = self._whole_student(model)  # every rank: gathering a sharded student is a collective
            if self.rank == 0:
                save_student(whole, self.out / "best", self.tokenizer_source)

    def _whole_student(self, model):
        """The student as rank 0 saves it: `model` itself, or, sharded, rank 0's CPU copy holding the gathered
        weights (a collective: every rank calls it; the other ranks get None)."""
        if not is_sharded(unwrap(model)):
            return model
        state = full_state_dict(unwrap(model))
        if self.rank != 0:
            return None
        self.replica.load_state_dict(state)
        return self.replica

    def _on_step(self, s: StepState) -> None:
        """After each optimizer step: extra evaluations inside epochs (`eval_every`), and checkpoints when due."""
        tc = self.cfg.train
        if tc.steps is None and tc.eval_every and s.global_step % tc.eval_every == 0 and not s.epoch_end:
            self.evaluate(self._trained_model(), s.global_step)  # epoch ends evaluate through the callback
        due = (s.global_step == s.total_steps or (self.save_every is not None and s.global_step % self.save_every == 0)
               or (self.save_every is None and s.epoch_end))
        if due:
            self.save_checkpoint(s)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _loader_split(self) -> dict:
        """What fixes the order of the rows: with batches split over ranks, the global batch, not the ranks."""
        if self.train_sets_split_batches or self.world_size == 1:
            return {"global_batch": self.cfg.train.batch_size * self.world_size, "num_workers": self.num_workers}
        return {"world_size": self.world_size, "num_workers": self.num_workers, "rank_split": "records"}

    def save_checkpoint(self, s: StepState) -> None:
        """checkpoints/step-N: weights, projections, optimizer, schedule, every rank's RNG, the reader position."""
        rng_states = gather_rng_states(self.device)  # a collective: every rank's dropout stream, so each resumes its own
        student = self._whole_student(self._trained_model())  # collectives too when the student is sharded
        optimizer_state = self.distiller.optimizer_state(s.optimizer)
        if self.rank != 0:
            return
        epoch, consumed = s.resume_at
        state = {"writer_step": s.writer_step, "epoch": epoch, "step": consumed, "history": self.history,
                 "best": self.best, "teacher": self.teacher_metric, "cachebrew": __version__,
                 "config": self.cfg.to_dict(), "loader": self._loader_split(), **self.distiller.extra_state()}
        ckpt = RunCheckpoint(s.global_step, student, self.distiller.projection_modules(), optimizer_state,
                             s.scheduler, s.scaler, state, rng_states)
        save_run_checkpoint(self.out / "checkpoints", ckpt, self.cfg.train.keep_checkpoints)

    def load_checkpoint(self, ckpt: Path) -> None:
        """Continue from `ckpt`: the same config is required; the loop resumes at the saved position."""
        # output_dir may differ: a run folder moved or copied, or another node's local path, is the same run
        drop_dir = lambda c: {k: v for k, v in (c or {}).items() if k != "output_dir"}
        run_state = read_run_state(ckpt)
        saved, now = drop_dir(run_state.get("config")), drop_dir(self.cfg.to_dict())
        if isinstance(saved.get("train"), dict):  # runs checkpointed before train.sharding existed were replicated
            saved["train"].setdefault("sharding", None)
            saved["train"].setdefault("rank_split", "batch")
            # ranks splitting each batch: the run is fixed by the global batch, so it may resume on another number
            # of ranks with batch_size x ranks unchanged
            then = (run_state.get("loader") or {}).get("global_batch")
            split = self._loader_split().get("global_batch")
            if then is not None and split is not None and isinstance(now.get("train"), dict):
                saved["train"]["batch_size"], now["train"]["batch_size"] = then, split
        if saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise CachebrewError(f"--resume: the config differs from the run in {self.out} (fields {changed}); "
                                 "a resumed run must use the same config")
        sharded = is_sharded(self.student)
        # sharded: rank 0 reads the weights into its whole copy and scatters them, each rank keeping its shard
        state = load_run_checkpoint(ckpt, self.replica if sharded else self.student,
                                    self.distiller.projection_modules())
        if sharded:
            load_full_state_dict(self.student, self.replica.state_dict() if self.rank == 0 else {})
        loader_then = state.get("loader", self._loader_split())
        if loader_then != self._loader_split():
            logger.warning("--resume: the run was split over %s, this one over %s; the rest of the epoch is read in "
                           "another order, so the weights will not equal an uninterrupted run's", loader_then,
                           self._loader_split())
        restore_rng(state["rng"], self.rank, self.device)
        self.history[:] = state["history"]
        self.best, self.teacher_metric = state["best"], state["teacher"]
        self.start_step = state["global_step"]
        self.distiller.resume_from(ResumeState(state["global_step"], state["writer_step"], state["epoch"],
                                               state["step"], state["optimizer"], state["scheduler"], state["scaler"],
                                               extra={"task_counts": state.get("task_counts", {})}))
        logger.info("resuming %s from %s", self.out, ckpt.name)

    # -- save ---------------------------------------------------------------------------------------
    def save(self, steps: int) -> DistillResult:
        """last/ (and best/ when nothing was evaluated) and results.json, published atomically by rank 0."""
        tc = self.cfg.train
        examples = (steps - self.start_step) * tc.batch_size * tc.gradient_accumulation_steps * self.world_size
        speed = examples / self.train_seconds if self.train_seconds else 0.0
        final = self.history[-1] if self.history and self.history[-1]["step"] == steps else None
        whole = self._whole_student(self._trained_model())  # every rank: gathering a sharded student is a collective
        if self.rank == 0:
            save_student(whole, self.out / "last", self.tokenizer_source)
            if self.best is None:
                save_student(whole, self.out / "best", self.tokenizer_source)
            results = {"global_step": steps, "best": self.best, "final": final, "teacher": self.teacher_metric,
                       "history": self.history, "train_seconds": self.train_seconds,
                       "examples_per_second": speed if self.train_seconds else None,
                       "caches": {n: [r.manifest.fingerprint for r in ds.joined.readers]
                                  for n, ds in self.train_sets.items()},
                       "student_tokenizer": self.student_tokenizer, "cachebrew": __version__,
                       "config": self.cfg.to_dict()}
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))
        return DistillResult(str(self.out), steps, self.best, final, self.teacher_metric,
                             time.perf_counter() - self.t_start, speed)


def run_distill(cfg: DistillRunConfig, resume: bool = False) -> DistillResult:
    """The `cachebrew distill` job: setup → train → save."""
    recipe = DistillRecipe(cfg)
    recipe.setup(resume)
    return recipe.save(recipe.train())
