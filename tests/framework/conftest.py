"""Framework test fixtures: a private dataset cache, W&B offline."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory):
    """Synthetic datasets go to a per-session cache (never the user's)."""
    old = {k: os.environ.get(k) for k in ("TENSORMASK_CACHE", "WANDB_MODE", "WANDB_SILENT")}
    os.environ["TENSORMASK_CACHE"] = str(tmp_path_factory.mktemp("tensormask_cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
