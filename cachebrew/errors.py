"""Errors a user can act on. The CLI prints these without a traceback."""
from __future__ import annotations


class CachebrewError(Exception):
    """Base class: a problem with the user's input, config or files, not a bug in cachebrew."""


class ConfigError(CachebrewError, ValueError):
    """All problems found in one config, reported together so one edit fixes them all.

    Each entry names the field (``DistillationConfig.intermediate_matches[1].loss``) and what is wrong.
    """

    def __init__(self, errors: list[str] | str, source: str | None = None):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        head = f"invalid config{f' in {source}' if source else ''}"
        if len(self.errors) == 1:
            msg = f"{head}: {self.errors[0]}"
        else:
            msg = f"{head} ({len(self.errors)} problems):\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(msg)


class BatchError(CachebrewError, ValueError):
    """A batch or adaptor output that does not fit what the distillation config asks for."""


class CacheFormatError(CachebrewError):
    """A cache directory, manifest or shard that is missing, corrupt, or not what it claims to be."""


class CacheMismatchError(CachebrewError):
    """A cache that exists but was produced from different inputs than the ones asked for."""
