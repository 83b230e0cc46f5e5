"""Distillation inside ``transformers.Trainer`` (needs the ``hf`` extra): ``DistillationTrainer`` and the
criterion configs Intel Neural Compressor users know."""
from .criteria import (IntermediateLayersKnowledgeDistillationLossConfig, KnowledgeDistillationLossConfig,
                       to_distillation_config)
from .trainer import DistillationTrainer

__all__ = ["DistillationTrainer", "KnowledgeDistillationLossConfig",
           "IntermediateLayersKnowledgeDistillationLossConfig", "to_distillation_config"]
