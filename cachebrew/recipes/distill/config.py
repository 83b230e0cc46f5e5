"""DistillRunConfig: the `cachebrew distill` job — student, caches, distillation, optimisation, evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...components.students import StudentConfig
from ...configurations import DistillationConfig
from ...core.training import OptimizerConfig
from ...core.config import AMP_MODES, JobConfig, check_choice, check_int, is_number
from ...errors import ConfigError


SHARDINGS = (None, "fsdp")
RANK_SPLITS = ("batch", "records")  # components.loader.CacheBatches(rank_split=...)


@dataclass
class TaskConfig:
    caches: list | str = field(default_factory=list)
    eval_cache: str | None = None


@dataclass
class TrainConfig(OptimizerConfig):  # lr, weight_decay, warmup_ratio, max_grad_norm: shared with `cachebrew train`
    epochs: int | None = 3
    steps: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    amp: str | None = "auto"         # auto: bf16 on Ampere+ GPUs, fp16 on older, none on CPU; none / bf16 / fp16
    shuffle_buffer: int = 2048
    num_workers: int | None = None   # loader processes decoding shards; None: 2 on GPU, 0 on CPU
    eval_every: int | None = None    # optimizer steps; None: every epoch (or every `save_every` with steps)
    save_every: int | None = None    # optimizer steps between resumable checkpoints; None: with every eval
    keep_checkpoints: int = 2
    device: str | None = None
    progress_bar: bool = True
    log_steps: int = 50              # optimizer steps between loss read-backs (tensorboard, progress bar)
    verify_caches: bool = True       # sha256 of every shard before training: a corrupt cache stops the run early
    # under torchrun: None replicates the student on every rank (DDP); fsdp shards its weights, gradients and
    # optimizer state over the ranks (FSDP2, per transformer layer), for students too big for one GPU
    sharding: str | None = None
    # under torchrun: batch splits each global batch (batch_size x ranks) by length, so N ranks train what one
    # process does at that batch; records deals record batches to ranks (each read by one rank: for caches
    # too big for every node to read)
    rank_split: str = "batch"


@dataclass
class DistillRunConfig(JobConfig):
    KIND = "distill"
    output_dir: str = ""
    seed: int = 42
    student: StudentConfig = field(default_factory=StudentConfig)
    caches: list | str = field(default_factory=list)
    eval_cache: str | None = None
    teachers: list | None = None
    teacher_weights: dict | None = None
    tasks: dict[str, TaskConfig] | None = None  # {task: {caches: [...], eval_cache: ...}} for multi-task distillation
    tau: float = 1.0
    distill: dict = field(default_factory=dict)  # DistillationConfig fields
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def normalize(cls, data: dict) -> dict:
        train = data.get("train")
        if isinstance(train, dict) and train.get("steps") is not None and "epochs" not in train:
            train["epochs"] = None  # `steps: N` alone means a step budget, not steps plus the default epochs
        for holder in [data, *((data.get("tasks") or {}).values() if isinstance(data.get("tasks"), dict) else [])]:
            if isinstance(holder, dict) and isinstance(holder.get("caches"), str):
                holder["caches"] = [holder["caches"]]  # one cache may be written as a string
        return data

    def problems(self) -> list[str]:
        e = []
        if not self.output_dir:
            e.append("output_dir: required")
        s = self.student
        if sum(x is not None for x in (s.path, s.config, s.entry_point)) != 1:
            e.append("student: give exactly one of path (pretrained directory), config (fields or config.json) "
                     "or entry_point (module:function)")
        if self.tasks and self.caches:
            e.append("caches and tasks are exclusive: use tasks for multi-task distillation")
        if not self.tasks and not self.caches:
            e.append("caches: at least one cache directory is required")
        for name, t in (self.tasks or {}).items():
            if not t.caches:
                e.append(f"tasks.{name}.caches: at least one cache directory is required")
        t = self.train
        if (t.epochs is None) == (t.steps is None):
            e.append("train: give exactly one of epochs or steps")
        if self.tasks and t.steps is None:
            e.append("train.steps: multi-task distillation counts optimizer steps (as MultiTaskDistiller does)")
        for name in ("epochs", "steps", "eval_every", "save_every"):
            check_int(e, f"train.{name}", getattr(t, name), 1, optional=True)
        for name in ("batch_size", "gradient_accumulation_steps", "shuffle_buffer", "keep_checkpoints", "log_steps"):
            check_int(e, f"train.{name}", getattr(t, name), 1)
        check_int(e, "train.num_workers", t.num_workers, 0, optional=True)
        e += t.optimizer_problems("train")
        if not (is_number(self.tau) and self.tau >= 0):
            e.append(f"tau: must be a number >= 0, got {self.tau!r}")
        check_choice(e, "train.amp", t.amp, AMP_MODES)
        check_choice(e, "train.sharding", t.sharding, SHARDINGS)
        check_choice(e, "train.rank_split", t.rank_split, RANK_SPLITS)
        if t.sharding == "fsdp" and t.amp == "fp16":
            e.append("train.amp: fp16 is not supported with train.sharding: fsdp (its gradient scaler sees one rank's "
                     "shards only); use bf16 or none")
        if t.sharding == "fsdp" and self.tasks:
            e.append("train.sharding: fsdp is not supported for multi-task distillation yet (each step leaves the "
                     "other tasks' heads without gradients); drop sharding")
        if self.teacher_weights is not None and any(not is_number(v) or v < 0 for v in self.teacher_weights.values()):
            e.append(f"teacher_weights: a mapping teacher -> weight >= 0, got {self.teacher_weights!r}")
        if not isinstance(self.distill, dict):
            e.append(f"distill: must be a mapping of DistillationConfig fields, got {type(self.distill).__name__}")
        else:
            try:  # checked with the rest, each error at its path in this config (distill.temperature: ...)
                self.distillation_config()
            except ConfigError as err:
                e += [m.replace("DistillationConfig.", "distill.", 1) if m.startswith("DistillationConfig.")
                      else f"distill.{m}" for m in err.errors]
        return e

    def distillation_config(self) -> DistillationConfig:
        return DistillationConfig.from_dict(dict(self.distill or {}))
