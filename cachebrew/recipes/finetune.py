"""`cachebrew train` and `cachebrew evaluate`: supervised fine-tuning with BasicTrainer — the teacher
before export, or the no-distillation baseline a distilled student is compared with — and scoring a
saved model.

`FinetuneRecipe`: ``setup`` (seed → tokenizer → label vocabulary → data → model → trainer) → ``train``
(``evaluate`` on the dev set after every epoch publishes ``best/``) → ``save`` (train_results.json).
output_dir/best/ holds the model with the best dev score (save_pretrained + tokenizer files), beside
tb/ (tensorboard), the same layout as `cachebrew distill`; ``best/`` is this run's only checkpoint.

The label vocabulary is stored in the saved model's config (id2label / label2id), which is what
`cachebrew export` uses to map string labels, so teacher, cache and student agree on label ids.

    cachebrew train cfg.yaml                                        # one process (one GPU or CPU)
    torchrun --nproc_per_node 4 -m cachebrew train cfg.yaml         # DDP, one GPU per process

Under torchrun each rank trains on its own share of the rows (DistributedSampler), ``train.batch_size`` is per
process (the global batch is batch_size × ranks), and rank 0 alone writes best/ and train_results.json.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configurations import TrainingConfig
from ..core.config import AMP_MODES, JobConfig, check_choice, check_int, config_to_dict
from ..components.metrics import main_metric, predictions, score
from ..core.files import atomic_write_text, unwrap
from ..core.runtime import (barrier, ensure_process_group, get_rank, get_world_size, resolve_device,
                            resolve_local_rank)
from ..core.training import OptimizerConfig, make_optimizer, resolve_amp, save_student, seed_everything, warmup_linear
from ..components.students import StudentConfig, build_student, load_multitask_student
from ..distillers import BasicTrainer
from ..errors import ConfigError
from ..core.paths import resolve_path
from ..components.data import (AugmentConfig, DataConfig, build_rows, label_vocabulary, load_table, pad_batch,
                               tokenize_rows)

logger = logging.getLogger("cachebrew")


@dataclass
class FinetuneTrain(OptimizerConfig):
    """How `cachebrew train` trains.

    ``batch_size`` is per process, as in Hugging Face's Trainer: under torchrun with N processes each optimizer
    step sees N × batch_size rows, and an epoch has 1/N as many steps (the LR schedule is counted in those).
    ``device``: see `core.runtime.resolve_device` (under torchrun, ``cuda`` gives each process its own GPU).
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5                 # fine-tuning's usual rate (OptimizerConfig's other fields as they are)
    amp: str | None = "auto"
    device: str | None = None
    progress_bar: bool = True


@dataclass
class FinetuneConfig(JobConfig):
    KIND = "train"
    output_dir: str = ""
    model: StudentConfig = field(default_factory=StudentConfig)
    tokenizer: str | None = None     # default: model.path
    data: DataConfig = field(default_factory=DataConfig)
    eval_path: str | None = None     # same columns as data
    max_length: int = 128
    seed: int = 42
    train: FinetuneTrain = field(default_factory=FinetuneTrain)

    def problems(self) -> list[str]:
        e = []
        if not self.output_dir:
            e.append("output_dir: required")
        if (self.model.path is None) == (self.model.config is None):
            e.append("model: give path (pretrained directory) or config")
        if not self.data.path:
            e.append("data.path: required")
        if (self.data.text is None) == (self.data.tokens is None):
            e.append("data: give exactly one of data.text (a text column) or data.tokens (a column of word lists)")
        check_int(e, "max_length", self.max_length, 1)
        check_int(e, "data.limit", self.data.limit, 1, optional=True)
        t = self.train
        for name in ("epochs", "batch_size"):
            check_int(e, f"train.{name}", getattr(t, name), 1)
        e += t.optimizer_problems("train")
        check_choice(e, "train.amp", t.amp, AMP_MODES)
        return e


def encode(data: DataConfig, tokenizer, max_length, label_map):
    """Tokenized examples of a data file (no augmentation), and the loaded table."""
    ds = load_table(data)
    rows = build_rows(ds, data, AugmentConfig(), tokenizer.mask_token or "[MASK]")
    return tokenize_rows(rows, tokenizer, max_length, label_map, data.tokens is not None), ds


@torch.no_grad()
def predict(model, examples: list[dict], device, batch_size=64):
    """(predictions, gold) per example; token-level: lists over labelled (first sub-word) positions."""
    model.eval()
    preds, golds = [], []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[i:i + batch_size]).items()}
        labels = batch.pop("labels")
        p, g = predictions(model(**batch).logits, labels)
        preds += p
        golds += g
    return preds, golds


class FinetuneRecipe:
    """One `cachebrew train` run: ``setup()`` → ``train()`` → ``save()``."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.history: list[dict] = []  # one dev score per epoch
        self.best: dict | None = None

    def setup(self) -> None:
        from transformers import AutoTokenizer

        cfg, tc = self.cfg, self.cfg.train
        seed_everything(cfg.seed)
        self.tokenizer_source = resolve_path(cfg.tokenizer or cfg.model.path)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source)
        eval_data = DataConfig(**{**config_to_dict(cfg.data), "path": cfg.eval_path, "limit": None}) if cfg.eval_path else None
        label_col = []
        if cfg.data.label:  # the vocabulary covers the eval labels too: a small train split may miss a class
            for d in [cfg.data] + ([eval_data] if eval_data else []):
                label_col += list(load_table(d)[d.label])
        self.label_names, label_map = label_vocabulary(label_col, None)
        self.train_examples, _ = encode(cfg.data, tokenizer, cfg.max_length, label_map)
        self.dev = encode(eval_data, tokenizer, cfg.max_length, label_map)[0] if eval_data else None
        num_labels = len(self.label_names) if self.label_names else int(max(
            max(t["labels"]) if isinstance(t["labels"], list) else t["labels"] for t in self.train_examples)) + 1
        self.model = build_student(cfg.model, token_level=cfg.data.tokens is not None, num_labels=num_labels,
                                   label_names=self.label_names)
        local_rank = resolve_local_rank(None)
        self.device = resolve_device(tc.device, local_rank)  # under torchrun: this rank's own GPU
        if local_rank != -1:
            ensure_process_group(self.device)  # before the loader: its sampler splits the rows by rank
        self.rank, self.world_size = get_rank(), get_world_size()
        self.model.to(self.device)
        self.loader = self._loader()
        self.trainer = BasicTrainer(TrainingConfig(output_dir=str(self.out), device=str(self.device),
                                                   amp=resolve_amp(tc.amp, self.device), progress_bar=tc.progress_bar,
                                                   keep_checkpoints=0, log_dir=str(self.out / "tb")),
                                    self.model, lambda b, o: {"losses": o.loss})
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, tc.head_lr)

    def _loader(self):
        """Batches of `train.batch_size` rows for this process.

        Under torchrun a DistributedSampler deals each rank a disjoint share of the shuffled rows (padded by
        repeating a few when the count does not divide evenly), reshuffled every epoch because the training
        loop calls its ``set_epoch``. One process keeps its own seeded shuffle: the order its published
        single-process results were trained in.
        """
        cfg, tc = self.cfg, self.cfg.train
        if self.world_size > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(
                self.train_examples, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=cfg.seed)
            return torch.utils.data.DataLoader(self.train_examples, batch_size=tc.batch_size, sampler=sampler,
                                               collate_fn=pad_batch)
        return torch.utils.data.DataLoader(self.train_examples, batch_size=tc.batch_size, shuffle=True,
                                           collate_fn=pad_batch, generator=torch.Generator().manual_seed(cfg.seed))

    def train(self) -> None:
        tc = self.cfg.train
        total = len(self.loader) * tc.epochs  # this rank's loader: the optimizer steps every rank takes
        with self.trainer:
            self.trainer.train(self.optimizer, self.loader, num_epochs=tc.epochs, scheduler_class=warmup_linear,
                               scheduler_args={"num_warmup_steps": int(tc.warmup_ratio * total),
                                               "num_training_steps": total},
                               max_grad_norm=tc.max_grad_norm, callback=self.evaluate)

    def evaluate(self, model, step: int) -> None:
        """Score the dev set (`components.metrics.score`); a better score than any before is published as best/.

        Under torchrun every rank scores the whole dev set with its (identical) unwrapped model and rank 0 alone
        publishes best/. That is the simplest correct split: no collective runs during evaluation, so no rank
        waits in a barrier that a long dev set could time out; every rank keeps the same history and best, so
        `save` returns the same results everywhere; and the wall time equals rank 0 scoring alone. Sharding the
        dev set would be faster but needs every prediction gathered, since span F1 and the like are not sums
        of per-rank counts.
        """
        if self.dev is None:
            return
        # under torchrun the loop passes the DDP wrapper: it has no .config, and its forward syncs across ranks
        model = unwrap(model)
        m = score(*predict(model, self.dev, self.device), getattr(model.config, "id2label", None))
        self.history.append({"step": step, **m})
        if self.rank == 0:
            logger.info("eval at step %d: %s", step, m)
        key = main_metric(m)
        if self.best is None or m[key] > self.best[key]:
            self.best = {"step": step, **m}
            if self.rank == 0:
                save_student(model, self.out / "best", self.tokenizer_source)

    def save(self) -> dict:
        """train_results.json (and best/ when there is no dev set), written by rank 0 only: the ranks share
        output_dir, and each writing through the same temporary would race. The others wait, so the files
        exist when `run_finetune` returns on any rank."""
        results = {"best": self.best, "history": self.history, "num_train": len(self.train_examples),
                   "labels": self.label_names, "seed": self.cfg.seed}
        if self.rank == 0:
            if self.dev is None:
                save_student(self.model, self.out / "best", self.tokenizer_source)
            path = atomic_write_text(self.out / "train_results.json", json.dumps(results, indent=2))
            logger.info("wrote %s", path)
        barrier()
        return results


def run_finetune(cfg: FinetuneConfig) -> dict:
    """The `cachebrew train` job: setup → train → save."""
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    return recipe.save()


def run_evaluate(model_dir: str, data: DataConfig, max_length: int, batch_size: int = 64, device: str | None = None,
                 task: str | None = None) -> dict:
    """Metric, size and CPU/GPU inference speed of a saved model (or one task of a multi-task student)."""
    import functools
    import time

    from transformers import AutoConfig, AutoTokenizer
    import transformers


    config = AutoConfig.from_pretrained(model_dir)
    if (Path(model_dir) / "tasks.json").is_file():
        if task is None:
            raise ConfigError(f"{model_dir} is a multi-task student: pass --task "
                              f"({', '.join(json.loads((Path(model_dir) / 'tasks.json').read_text()))})")
        model = load_multitask_student(model_dir)
        model.forward = functools.partial(model.forward, task=task)
        config.label2id, config.id2label = {}, None
    else:
        arch = (config.architectures or ["AutoModelForSequenceClassification"])[0]
        model = getattr(transformers, arch).from_pretrained(model_dir)
    dev = resolve_device(device, resolve_local_rank(None))
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    label2id = {k: int(v) for k, v in (config.label2id or {}).items()}
    ds = load_table(data)
    names, _ = label_vocabulary(ds[data.label], None) if data.label else (None, None)
    label_map = label2id if names and set(names) <= set(label2id) else (
        {n: i for i, n in enumerate(names)} if names else None)
    examples, _ = encode(data, tokenizer, max_length, label_map)
    t = time.perf_counter()
    preds, golds = predict(model, examples, dev, batch_size)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return {"model": model_dir, "task": task, "data": data.path, **score(preds, golds, config.id2label),
            "parameters": sum(p.numel() for p in model.parameters()), "size_mb": size / 2**20,
            "inference_examples_per_second": len(examples) / seconds, "examples": len(examples),
            "device": dev.type, "threads": torch.get_num_threads()}
