"""The distill phase: a student trains from teacher caches (cachebrew.cache) with no teacher in memory."""
from .config import DistillRunConfig
from .recipe import DistillRecipe, DistillResult, run_distill

__all__ = ["DistillRunConfig", "DistillRecipe", "DistillResult", "run_distill"]
