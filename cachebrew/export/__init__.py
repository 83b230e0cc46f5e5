"""The export phase: teachers run once over the data; their outputs become a cache (cachebrew.cache)."""
from .config import ExportConfig
from .run import ExportResult, run_export

__all__ = ["ExportConfig", "ExportResult", "run_export"]
