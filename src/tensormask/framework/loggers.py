"""Experiment loggers: Weights & Biases (default; offline unless a key is configured), csv, tensorboard."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(mode: str = "auto") -> str:
    """`auto` is online only when the environment holds a W&B key (WANDB_API_KEY) or WANDB_MODE says
    online; otherwise offline, and the run is synced later with `wandb sync <run dir>/wandb/...`."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}: must be one of {', '.join(WANDB_MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "disabled", "online"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_logger(
    *,
    project: str = "tensormask",
    save_dir: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str = "auto",
    entity: str | None = None,
    job_type: str = "train",
    **kwargs: Any,
):
    """A Lightning WandbLogger; `mode` auto/online/offline/disabled (see `wandb_mode`)."""
    from lightning.pytorch.loggers import WandbLogger

    resolved = wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    run_id = kwargs.pop("id", None) or _run_id(save_dir)
    return WandbLogger(
        project=project, save_dir=save_dir, name=name, group=group, tags=list(tags or []), id=run_id,
        entity=entity, job_type=job_type, offline=resolved == "offline", mode=resolved, log_model=False, **kwargs,
    )


def _run_id(save_dir: str) -> str:
    """The W&B run id of this run folder: made once, then read back, so that a run resumed with
    `ckpt_path=last` (same command, same folder) continues the same W&B run."""
    path = os.path.join(save_dir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    from tensormask.framework.checkpoint_io import atomic_write_bytes

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # other processes never start a W&B run
        atomic_write_bytes(path, run_id.encode())
    return run_id


def wandb_info(loggers: Sequence[Any]) -> dict[str, Any] | None:
    """{"run_id", "project", "group", "tags", "mode"} of the W&B run among `loggers`, or None."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run_id = getattr(run, "id", None)
            if not isinstance(run_id, str):  # a non-zero rank's dummy experiment
                return None
            settings = getattr(run, "settings", None)
            mode = getattr(settings, "mode", None) if settings is not None else None
            return {
                "run_id": run_id,
                "project": getattr(run, "project", None),
                "group": getattr(run, "group", None) or None,
                "tags": list(getattr(run, "tags", ()) or ()),
                "mode": str(mode) if mode is not None else None,
                "dir": getattr(run, "dir", None),
            }
    return None
