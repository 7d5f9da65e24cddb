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


@pytest.fixture(scope="session")
def detecting_run(_dataset_cache, tmp_path_factory):
    """A finished training run whose model really detects (framework_helpers.DETECTING_RUN), trained
    once per test session: (run folder, the run's final metrics, train()'s objects). Eval, predict and
    DDP eval tests compare against it, so their equality checks compare real detections."""
    import time

    from framework_helpers import DETECTING_MIN_AP, compose_config, DETECTING_RUN
    from tensormask.train import train

    run_dir = tmp_path_factory.mktemp("detecting") / "run"
    start = time.perf_counter()
    metrics, objects = train(compose_config("train", DETECTING_RUN, run_dir))
    print(f"\ndetecting_run: trained in {time.perf_counter() - start:.1f} s, bbox AP {metrics['bbox']['AP']:.3f}, "
          f"segm AP {metrics['segm']['AP']:.3f}")
    for task, least in DETECTING_MIN_AP.items():
        assert metrics[task]["AP"] > least, (task, metrics[task])
    return run_dir, metrics, objects
