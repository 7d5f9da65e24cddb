"""Checkpoints that are either complete or absent: written to a temporary sibling, then renamed.

A run killed while saving leaves the previous checkpoint intact (os.replace is atomic on POSIX),
so `ckpt_path=last` always finds a loadable file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose files appear only once completely written."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """`last` -> `<checkpoint_dir>/last.ckpt` if it exists (else None: a fresh start); a path must exist."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = Path(checkpoint_dir) / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(ckpt_path)
