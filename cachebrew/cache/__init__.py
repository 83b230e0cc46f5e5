"""The teacher cache: the on-disk contract between `export` and `distill` (see docs/cache-format.md).

This package knows nothing of training: it writes, describes, verifies and reads shards.
"""
from .format import FORMAT_VERSION, TensorSpec
from .manifest import MANIFEST, Manifest
from .reader import CacheReader
from .shards import ShardInfo, ShardWriter

__all__ = ["FORMAT_VERSION", "TensorSpec", "MANIFEST", "Manifest", "CacheReader",
           "ShardInfo", "ShardWriter"]
