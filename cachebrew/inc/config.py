"""INC 2.x's ``DistillationConfig(teacher_model=..., criterion=...)``, plus ``teacher_cache=`` beyond Intel's."""
from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import ConfigError
from ..hf.criteria import (IntermediateLayersKnowledgeDistillationLossConfig, KnowledgeDistillationLossConfig,
                           to_distillation_config)
from .metrics import Metric

_FRAMEWORKS = ("pytorch", "pytorch_fx")


class DistillationConfig:
    """What ``NLPTrainer.distill`` distils with.

    teacher_model: the teacher (a torch module; a list averages the teachers' logits) run on each train batch;
    teacher_cache: instead, a cachebrew cache directory or URI (or a list: several teachers) written by
        ``cachebrew export`` over the same training data: no teacher in memory. Give exactly one, here or as
        ``distill(teacher_model=...)``.
    criterion: a KnowledgeDistillationLossConfig (the default, INC's) or an
        IntermediateLayersKnowledgeDistillationLossConfig, or a list of both (their terms add up).
    metrics: the Metric (or list) the best model is chosen by; default: the trainer's ``metrics``.
    optimizer: INC's own training loop takes one here; NLPTrainer trains with the Trainer's, set by
        TrainingArguments, so a value here is ignored with a warning rather than silently.
    """

    def __init__(self, teacher_model=None, criterion=None, optimizer=None, metrics=None, framework="pytorch",
                 teacher_cache=None, teacher_weights=None):
        errors = []
        if framework not in _FRAMEWORKS:
            errors.append(f"DistillationConfig.framework: {framework!r} is not one of {list(_FRAMEWORKS)}")
        if teacher_model is not None and teacher_cache is not None:
            errors.append("DistillationConfig: give teacher_model (online) or teacher_cache (from a cache), not both")
        if teacher_cache is not None and not isinstance(teacher_cache, (str, Path, list, tuple)):
            errors.append(f"DistillationConfig.teacher_cache: a cache directory or URI (or a list), got "
                          f"{type(teacher_cache).__name__}")
        if metrics is not None:
            items = metrics if isinstance(metrics, (list, tuple)) else [metrics]
            if not all(isinstance(m, Metric) for m in items):
                errors.append(f"DistillationConfig.metrics: expected a metrics.Metric or a list of them, got {metrics!r}")
        self.criterion = KnowledgeDistillationLossConfig() if criterion is None else criterion
        kinds = (KnowledgeDistillationLossConfig, IntermediateLayersKnowledgeDistillationLossConfig)
        items = self.criterion if isinstance(self.criterion, (list, tuple)) else [self.criterion]
        if not items or not all(isinstance(c, kinds) for c in items):
            errors.append(f"DistillationConfig.criterion: expected a KnowledgeDistillationLossConfig or an "
                          f"IntermediateLayersKnowledgeDistillationLossConfig (or a list of both), got {criterion!r}")
        if errors:
            raise ConfigError(errors)
        if optimizer is not None:
            warnings.warn("DistillationConfig.optimizer is ignored: NLPTrainer trains with the Trainer's optimizer "
                          "(TrainingArguments optim / learning_rate / weight_decay)", stacklevel=2)
        self.teacher_model, self.teacher_cache, self.teacher_weights = teacher_model, teacher_cache, teacher_weights
        self.optimizer, self.metrics, self.framework = optimizer, metrics, framework
        self.distillation_config = to_distillation_config(self.criterion)  # INC's numerics, validated now

    def __repr__(self):
        source = f"teacher_cache={self.teacher_cache!r}" if self.teacher_cache is not None else \
            f"teacher_model={type(self.teacher_model).__name__}"
        return f"DistillationConfig({source}, criterion={self.criterion!r}, metrics={self.metrics!r})"
