"""DistillRunConfig: the `cachebrew distill` job — student, caches, distillation, optimisation, evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..configurations import DistillationConfig
from ..core.config_files import apply_overrides, config_to_dict, is_int, is_number, read_config_file
from ..errors import ConfigError


@dataclass
class StudentConfig:
    path: str | None = None          # Hugging Face model directory (from_pretrained)
    config: dict | str | None = None  # config fields (with model_type) or a config.json path: random init
    entry_point: str | None = None   # "module:function" returning an nn.Module
    model_class: str | None = None   # default: sequence or token classification from the cache
    overrides: dict | None = None    # config fields to change, e.g. {num_hidden_layers: 3}: keep the first layers


@dataclass
class TaskConfig:
    caches: list = field(default_factory=list)
    eval_cache: str | None = None


@dataclass
class TrainConfig:
    epochs: int | None = 3
    steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    amp: str | None = "auto"         # auto: bf16 on GPU; none / bf16 / fp16
    shuffle_buffer: int = 2048
    num_workers: int | None = None   # loader processes decoding shards; None: 2 on GPU, 0 on CPU
    eval_every: int | None = None    # optimizer steps; None: every epoch (or every `save_every` with steps)
    save_every: int | None = None    # optimizer steps between resumable checkpoints; None: with every eval
    keep_checkpoints: int = 2
    device: str | None = None
    progress_bar: bool = True
    log_steps: int = 50              # optimizer steps between loss read-backs (tensorboard, progress bar)
    verify_caches: bool = True       # sha256 of every shard before training: a corrupt cache stops the run early


@dataclass
class DistillRunConfig:
    output_dir: str = ""
    seed: int = 42
    student: StudentConfig = field(default_factory=StudentConfig)
    caches: list = field(default_factory=list)
    eval_cache: str | None = None
    teachers: list | None = None
    teacher_weights: dict | None = None
    tasks: dict | None = None        # {task: {caches: [...], eval_cache: ...}} for multi-task distillation
    tau: float = 1.0
    distill: dict = field(default_factory=dict)  # DistillationConfig fields
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_file(cls, path, overrides=None) -> "DistillRunConfig":
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError("top level must be a mapping", str(path))
        apply_overrides(data, overrides or [])
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "DistillRunConfig":
        errors = []
        known = {f.name for f in fields(cls)}
        errors += [f"{k}: unknown field (valid: {', '.join(sorted(known))})" for k in d if k not in known]
        kwargs = {k: v for k, v in d.items() if k in known}
        for key, sub in (("student", StudentConfig), ("train", TrainConfig)):
            value = kwargs.get(key) or {}
            if not isinstance(value, dict):
                errors.append(f"{key}: expected a mapping")
                kwargs.pop(key, None)
                continue
            sub_known = {f.name for f in fields(sub)}
            errors += [f"{key}.{k}: unknown field (valid: {', '.join(sorted(sub_known))})" for k in value
                       if k not in sub_known]
            value = {k: v for k, v in value.items() if k in sub_known}
            if key == "train" and value.get("steps") is not None and "epochs" not in value:
                value["epochs"] = None  # `steps: N` alone means a step budget, not steps plus the default epochs
            kwargs[key] = sub(**value)
        if isinstance(kwargs.get("tasks"), dict):
            tasks = {}
            for name, t in kwargs["tasks"].items():
                if not isinstance(t, dict) or set(t) - {"caches", "eval_cache"}:
                    errors.append(f"tasks.{name}: expected {{caches: [...], eval_cache: ...}}, got {t!r}")
                    continue
                tasks[name] = TaskConfig(**t)
            kwargs["tasks"] = tasks
        cfg = cls(**kwargs)
        errors += cfg.problems()
        if errors:
            raise ConfigError(errors, source)
        return cfg

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
            v = getattr(t, name)
            if v is not None and (not is_int(v) or v < 1):
                e.append(f"train.{name}: must be an integer >= 1, got {v!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "shuffle_buffer", "keep_checkpoints", "log_steps"):
            v = getattr(t, name)
            if not is_int(v) or v < 1:
                e.append(f"train.{name}: must be an integer >= 1, got {v!r}")
        if t.num_workers is not None and (not is_int(t.num_workers) or t.num_workers < 0):
            e.append(f"train.num_workers: must be an integer >= 0, got {t.num_workers!r}")
        if not (is_number(t.lr) and t.lr > 0):
            e.append(f"train.lr: must be a number > 0, got {t.lr!r}")
        if not (is_number(t.warmup_ratio) and 0 <= t.warmup_ratio < 1):
            e.append(f"train.warmup_ratio: must be a number in [0, 1), got {t.warmup_ratio!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (is_number(getattr(t, name)) and getattr(t, name) >= 0):
                e.append(f"train.{name}: must be a number >= 0, got {getattr(t, name)!r}")
        if not (is_number(self.tau) and self.tau >= 0):
            e.append(f"tau: must be a number >= 0, got {self.tau!r}")
        if not is_int(self.seed):
            e.append(f"seed: must be an integer, got {self.seed!r}")
        for name in ("progress_bar", "verify_caches"):
            if not isinstance(getattr(t, name), bool):
                e.append(f"train.{name}: must be true or false, got {getattr(t, name)!r}")
        if t.amp not in ("auto", None, "none", "bf16", "fp16"):
            e.append(f"train.amp: one of auto, none, bf16, fp16, got {t.amp!r}")
        if self.teacher_weights is not None and (not isinstance(self.teacher_weights, dict) or any(
                not isinstance(v, (int, float)) or v < 0 for v in self.teacher_weights.values())):
            e.append(f"teacher_weights: a mapping teacher -> weight >= 0, got {self.teacher_weights!r}")
        try:
            self.distillation_config()
        except ConfigError as err:
            e += [f"distill: {m}" for m in err.errors]
        return e

    def distillation_config(self) -> DistillationConfig:
        return DistillationConfig.from_dict(dict(self.distill or {}))

    def to_dict(self) -> dict:
        return config_to_dict(self)
