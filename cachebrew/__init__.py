"""cachebrew: TextBrewer-compatible knowledge distillation, split into teacher export and cached distillation.

An existing TextBrewer script runs after replacing ``textbrewer`` by ``cachebrew`` in its imports.
"""
from .version import __version__  # noqa: F401

from .configurations import DistillationConfig, TrainingConfig  # noqa: E402
from .distillers import (BasicDistiller, BasicTrainer, GeneralDistiller, MultiTaskDistiller,  # noqa: E402
                         MultiTeacherDistiller)
from .errors import BatchError, CachebrewError, ConfigError  # noqa: E402
from .presets import (ADAPTOR_KEYS, FEATURES, KD_LOSS_MAP, MATCH_LOSS_MAP, PROJ_MAP, TEMPERATURE_SCHEDULER,  # noqa: E402
                      WEIGHT_SCHEDULER, register_new)

Distillers = {
    "Basic": BasicDistiller,
    "General": GeneralDistiller,
    "MultiTeacher": MultiTeacherDistiller,
    "MultiTask": MultiTaskDistiller,
    "Train": BasicTrainer,
}

__all__ = [
    "__version__", "TrainingConfig", "DistillationConfig", "BasicDistiller", "GeneralDistiller",
    "MultiTeacherDistiller", "MultiTaskDistiller", "BasicTrainer", "Distillers", "FEATURES", "ADAPTOR_KEYS",
    "KD_LOSS_MAP", "MATCH_LOSS_MAP", "PROJ_MAP", "WEIGHT_SCHEDULER", "TEMPERATURE_SCHEDULER", "register_new",
    "CachebrewError", "ConfigError", "BatchError",
]
