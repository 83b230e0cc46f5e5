"""The distill phase: a student trains from teacher caches (cachebrew.cache) with no teacher in memory."""
from .config import DistillRunConfig
from .run import DistillResult, run_distill

__all__ = ["DistillRunConfig", "DistillResult", "run_distill"]
