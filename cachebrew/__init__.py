"""cachebrew: TextBrewer-compatible knowledge distillation, split into teacher export and cached distillation.

An existing TextBrewer script runs after replacing ``textbrewer`` by ``cachebrew`` in its imports.

The public names are imported on first use (PEP 562): `import cachebrew` does not load torch, so the
`cachebrew` command answers `--help`, `--version` and a mistyped command in a fraction of a second.
"""
from __future__ import annotations

import importlib

from .version import __version__  # noqa: F401

_HOMES = {
    "TrainingConfig": "configurations", "DistillationConfig": "configurations",
    "BasicDistiller": "distillers", "BasicTrainer": "distillers", "GeneralDistiller": "distillers",
    "MultiTaskDistiller": "distillers", "MultiTeacherDistiller": "distillers",
    "BatchError": "errors", "CachebrewError": "errors", "ConfigError": "errors",
    "ADAPTOR_KEYS": "registry", "FEATURES": "registry", "KD_LOSS_MAP": "registry", "MATCH_LOSS_MAP": "registry",
    "PROJ_MAP": "registry", "TEMPERATURE_SCHEDULER": "registry", "WEIGHT_SCHEDULER": "registry",
    "register_new": "registry",
}

__all__ = [
    "__version__", "TrainingConfig", "DistillationConfig", "BasicDistiller", "GeneralDistiller",
    "MultiTeacherDistiller", "MultiTaskDistiller", "BasicTrainer", "Distillers", "FEATURES", "ADAPTOR_KEYS",
    "KD_LOSS_MAP", "MATCH_LOSS_MAP", "PROJ_MAP", "WEIGHT_SCHEDULER", "TEMPERATURE_SCHEDULER", "register_new",
    "CachebrewError", "ConfigError", "BatchError",
]


def __getattr__(name: str):
    if name == "Distillers":
        d = importlib.import_module(".distillers", __name__)
        value = {"Basic": d.BasicDistiller, "General": d.GeneralDistiller, "MultiTeacher": d.MultiTeacherDistiller,
                 "MultiTask": d.MultiTaskDistiller, "Train": d.BasicTrainer}
    elif name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'cachebrew' has no attribute {name!r}")
    globals()[name] = value  # once imported, a plain module attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
