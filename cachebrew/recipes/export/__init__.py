"""The export phase: teachers run once over the data; their outputs become a cache (cachebrew.cache)."""
from .config import ExportConfig
from .recipe import ExportRecipe, ExportResult, run_export

__all__ = ["ExportConfig", "ExportRecipe", "ExportResult", "run_export"]
