"""OmegaConf resolvers the configs use (registered on import of `tensormask.framework`).

Run folders (docs/framework.md#where-outputs-land) are named from the command line's overrides so
that the same command finds the same folder again (what `ckpt_path=last` relies on), in names
safe to paste into a shell and into another override: `[A-Za-z0-9._+-]` only (Hydra's override
grammar splits on `=` and `,`). The overrides themselves are recorded inside the folder.
"""

from __future__ import annotations

import hashlib
import os
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


def scaled_steps(steps, reference: int, at_most: int | None = None, *, _root_):
    """Step numbers of a schedule written for `reference` steps, scaled to this run's
    `trainer.max_steps`: a schedule given only a new `trainer.max_steps` moves its milestones and
    warm-up with it (docs/framework.md "Schedules"). `steps`: one number or a list; exact when
    max_steps equals the reference; `at_most` caps the result (a warm-up that shrinks with a short
    run but does not grow with a long one)."""
    max_steps = int(_root_.trainer.max_steps)

    def scale(s) -> int:
        value = int(round(int(s) * max_steps / int(reference)))
        return value if at_most is None else min(value, int(at_most))

    if isinstance(steps, (int, float, str)):
        return scale(steps)
    return [scale(s) for s in steps]


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where unsupported)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def num_workers(cap: int = 4) -> int:
    """Data-loader workers: the machine's cores, at most `cap` (2 on a 2-core machine, not 4)."""
    return max(0, min(int(cap), available_cpus()))


def _register() -> None:
    from tensormask.framework.pretrained import imagenet_file

    for name, fn in (("tm.run_name", run_name), ("tm.checkpoint_name", checkpoint_name),
                     ("tm.imagenet_file", imagenet_file), ("tm.scaled_steps", scaled_steps),
                     ("tm.num_workers", num_workers)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register()
