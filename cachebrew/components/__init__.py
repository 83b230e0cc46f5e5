"""Components the recipes and the Trainer front end assemble: data files → tokenized examples (`data`),
students (`students`), the one scorer (`metrics`), and cache → `teacher_cache` batches (`loader`)."""
from .data import DataConfig
from .loader import CacheBatches, CacheLoader, JoinedCaches, RankShare
from .metrics import predictions, score
from .students import StudentConfig

__all__ = ["CacheBatches", "CacheLoader", "DataConfig", "JoinedCaches", "RankShare", "StudentConfig", "predictions",
           "score"]
