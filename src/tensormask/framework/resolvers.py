"""OmegaConf resolvers the configs use (registered on import of `tensormask.framework`).

Run folders (docs/framework.md#where-outputs-land) are named from the command line's overrides so
that the same command finds the same folder again (what `ckpt_path=last` relies on), in names
safe to paste into a shell and into another override: `[A-Za-z0-9._+-]` only (Hydra's override
grammar splits on `=` and `,`). The overrides themselves are recorded inside the folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MAX_NAME = 60


def _safe(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")
    return text or "x"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def run_name(overrides: Any = (), exclude: Any = (), default: str = "default") -> str:
    """A short folder name for a run's overrides: `<leaf key>-<value>` per override (sorted), joined
    by `+`, cut to 60 characters, and a hash of all of them, e.g. `mask_head-natural+max_steps-400_1c9e2f`.
    `exclude`: keys that do not change what is computed (logger, number of workers, ...);
    no overrides left -> `default`."""
    if isinstance(overrides, str):  # a Hydra override_dirname ("a=1,b=2"), as older configs pass
        overrides = [o for o in overrides.split(",") if o]
    excluded = set(exclude or ())
    kept = sorted(str(o) for o in overrides or () if _override_key(str(o)) not in excluded)
    if not kept:
        return default
    parts = []
    for override in kept:
        key, _, value = override.partition("=")
        leaf = re.split(r"[./]", key.lstrip("+~"))[-1]
        parts.append(f"{_safe(leaf)}-{_safe(value)}" if value else _safe(leaf))
    name = "+".join(parts)
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME].rstrip("+-.")
    return f"{name}_{_digest(chr(10).join(kept))}"


def checkpoint_name(ckpt_path: Any) -> str:
    """A folder name per checkpoint, for the outputs of eval and predict: `<run folder>-<file stem>`
    and a hash of the file's absolute path, e.g. `default-last_5e0c1a` for
    outputs/train/runs/default/checkpoints/last.ckpt. A run folder (or a `latest` link) stands for
    its last.ckpt."""
    from tensormask.framework.checkpoint_io import checkpoint_file

    path = Path(str(ckpt_path)).expanduser()
    try:
        path = checkpoint_file(path)
    except Exception:  # noqa: BLE001 - the entry point reports a missing checkpoint itself
        pass
    path = path.resolve()
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    name = _safe(f"{folder.name}-{path.stem}")[:MAX_NAME].rstrip("+-.")
    return f"{name}_{_digest(str(path))}"


def _register() -> None:
    if not OmegaConf.has_resolver("tm.run_name"):
        OmegaConf.register_new_resolver("tm.run_name", run_name)
    if not OmegaConf.has_resolver("tm.checkpoint_name"):
        OmegaConf.register_new_resolver("tm.checkpoint_name", checkpoint_name)


_register()
