"""TextBrewer's distillers over one shared training loop (see loop.py)."""
from .basic import BasicDistiller, DistillationContext
from .general import CustomMatch, GeneralDistiller
from .multitask import MultiTaskDistiller, task_sampling_weights
from .multiteacher import MultiTeacherDistiller
from .trainer import BasicTrainer

__all__ = ["BasicDistiller", "GeneralDistiller", "MultiTeacherDistiller", "MultiTaskDistiller", "BasicTrainer",
           "CustomMatch", "DistillationContext", "task_sampling_weights"]
