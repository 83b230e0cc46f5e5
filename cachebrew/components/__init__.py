"""Components the recipes and the Trainer front end assemble: data files → tokenized examples (`data`),
students (`students`), the one scorer (`metrics`), and cache → `teacher_cache` batches (`loader`)."""
from .loader import CacheBatches, CacheLoader, JoinedCaches, RankShare

__all__ = ["CacheBatches", "CacheLoader", "JoinedCaches", "RankShare"]
