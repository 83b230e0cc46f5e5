"""Intel's distillation workflow (ITREX ``NLPTrainer.distill`` over INC 2.x configs) on cachebrew.

A script written from Intel's documentation runs after changing its imports::

    from cachebrew.inc import (NLPTrainer, metrics, DistillationConfig, KnowledgeDistillationLossConfig)

    trainer = NLPTrainer(model=student, args=training_args, train_dataset=..., eval_dataset=...,
                         compute_metrics=...)
    trainer.metrics = metrics.Metric(name="eval_accuracy")
    d_conf = DistillationConfig(teacher_model=teacher, criterion=KnowledgeDistillationLossConfig())
    model = trainer.distill(distillation_config=d_conf)

and ``DistillationConfig(teacher_cache="caches/train", criterion=...)`` distils from a cachebrew cache with no
teacher in memory. The criterion configs keep INC's numerics (KD term x T**2, INC's reductions and checks).
"""
from ..hf.criteria import IntermediateLayersKnowledgeDistillationLossConfig, KnowledgeDistillationLossConfig
from . import metrics
from .config import DistillationConfig
from .metrics import Metric
from .trainer import BestModelTracker, NLPTrainer

__all__ = ["NLPTrainer", "DistillationConfig", "KnowledgeDistillationLossConfig",
           "IntermediateLayersKnowledgeDistillationLossConfig", "metrics", "Metric", "BestModelTracker"]
