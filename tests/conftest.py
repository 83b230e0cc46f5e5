"""pytest fixtures only (the oracle and implementation modules, a clean torchrun environment); the shared
builders tests import live in helpers.py (models and training scripts) and fixtures.py (files and caches)."""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import import_oracle

warnings.filterwarnings("ignore", category=SyntaxWarning)  # textbrewer 0.2.1 uses `is not 'none'`
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def textbrewer():
    """The oracle: fails (not skips) when it cannot be imported, unless CACHEBREW_ALLOW_NO_TEXTBREWER=1."""
    return import_oracle("textbrewer")


@pytest.fixture(scope="session")
def cachebrew():
    import cachebrew as cb

    return cb


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    yield
