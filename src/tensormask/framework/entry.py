"""Shared pieces of the entry points: the config folder, the command line's overrides, the summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_dir() -> str:
    """The `conf/` folder: $TENSORMASK_CONFIG_DIR, else the repository's `conf/` beside `src/`."""
    env = os.environ.get("TENSORMASK_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[3] / "conf")


def command_overrides(cfg: DictConfig | None = None) -> list[str]:
    """The Hydra overrides of this run (the command line's `key=value`s), [] outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    if cfg is not None and "overrides" in cfg:
        return list(cfg.overrides)
    return []


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    from tensormask.evaluation import format_metrics

    return format_metrics({k: v for k, v in metrics.items() if isinstance(v, dict)})


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def quiet_known_warnings() -> None:
    """Silence Lightning warnings that do not apply here (each explained)."""
    import warnings

    # the run's config.yaml is written into the checkpoint folder before the first checkpoint
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # raised inside Lightning for torch >= 2.10, nothing to act on here
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
