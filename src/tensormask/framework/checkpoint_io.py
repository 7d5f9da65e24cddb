"""Checkpoints that survive faults (docs/framework.md, "What survives a fault").

- Writes are atomic: a temporary sibling `.<name>.<random>.tmp`, fsync, then a rename, so a run
  killed while saving leaves the previous checkpoint intact (os.replace is atomic on POSIX). A
  write that fails (full disk, no permission, an I/O error) raises `CheckpointWriteError` naming
  the file and the cause ("no space left on <folder>") and removes its temporary file.
- A run killed in the middle of a write leaves its temporary file behind; `remove_orphans` deletes
  them on the next start of that run.
- `ckpt_path=last` resumes from the newest complete checkpoint of the run's folder (the highest
  step among `last.ckpt` and the step checkpoints), and a damaged one (empty, truncated, not a
  checkpoint) is passed over with a warning naming it: `find_resume_checkpoint`.
- Reading a damaged checkpoint raises `DamagedCheckpointError` naming the file and the cause.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tensormask.errors import MissingFileError, UserError, error_chain

log = logging.getLogger(__name__)

LAST = "last.ckpt"
# what `atomic_write` names its temporary files: `.<target name>.<mkstemp's random part>.tmp`
_TMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read; the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str, what: str) -> None:
        super().__init__(f"{what} {path}: {cause}")
        self.path = Path(path)
        self.cause = cause


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (the previous file of that name is intact)."""

    def __init__(self, path: str | os.PathLike, cause: str) -> None:
        super().__init__(path, cause, "cannot write checkpoint")


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be loaded: empty, truncated, or not a checkpoint at all."""

    def __init__(self, path: str | os.PathLike, cause: str) -> None:
        super().__init__(path, cause, "damaged checkpoint")


# -- writing -------------------------------------------------------------------------------------
def _write_failure(path: Path, error: OSError) -> str:
    """The cause of a failed write in words, naming where it happened."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {path.parent} ({os.strerror(error.errno)}); the previous checkpoint is intact"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path.parent} is not writable ({os.strerror(error.errno)})"
    return f"{os.strerror(error.errno) if error.errno else error} ({type(error).__name__})"


class _RecordingFile:
    """A file object that remembers the OSError of a failed write (torch.save's zip writer turns it
    into an opaque "unexpected pos" RuntimeError)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, fsync it, then rename it into place.

    On failure the temporary file is removed and ``path`` keeps its previous content; an OSError
    (or the error torch.save makes of one) becomes a `CheckpointWriteError` naming ``path``.
    """
    path = Path(path)
    tmp: str | None = None
    recording: _RecordingFile | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give
        with os.fdopen(fd, "wb") as f:
            recording = _RecordingFile(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise CheckpointWriteError(path, _write_failure(path, e)) from e
    except RuntimeError as e:
        if recording is not None and recording.error is not None:
            raise CheckpointWriteError(path, _write_failure(path, recording.error)) from e
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN / infinity replaced by None (null): JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (a NaN metric is written as null), readable by any JSON parser."""
    text = json.dumps(strict_json(obj), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def remove_orphans(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that runs killed during a write left in `directory`; returns them.

    Call it only when no other process writes into `directory` (the start of a run, on rank 0)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        if p.is_file() and _TMP_PATTERN.match(p.name):
            size = p.stat().st_size
            p.unlink()
            removed.append(p)
            log.warning("removed %s (%.1f MB), left by a run killed while writing it", p, size / 2**20)
    return removed


# -- reading -------------------------------------------------------------------------------------
def _damage(path: Path) -> str | None:
    """A cheap look at the file: the cause if it is surely not a complete checkpoint, else None."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # a zip archive (torch.save's format) without its end: cut short
        return f"truncated ({size} bytes, the end of the archive is missing)"
    return None  # not a zip: torch.load decides (old non-zip format, or garbage)


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool | None = False,
                    mmap: bool = False) -> dict[str, Any]:
    """`torch.load` of a checkpoint file, with errors that name the file and the cause.

    Raises FileNotFoundError if `path` does not exist and `DamagedCheckpointError` if it is empty,
    truncated or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    cause = _damage(path)
    if cause is not None:
        raise DamagedCheckpointError(path, cause)
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only,
                           mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types for a bad file
        raise DamagedCheckpointError(path, f"not a loadable checkpoint ({type(e).__name__}: {str(e).strip()[:300]})") from e
    if not isinstance(state, dict):
        raise DamagedCheckpointError(path, f"not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a (Lightning) checkpoint was saved at, reading no tensor data (mmap)."""
    state = read_checkpoint(path, mmap=True)
    if "global_step" not in state:
        raise DamagedCheckpointError(path, "no 'global_step' in it: not a training checkpoint of this framework")
    return int(state["global_step"])


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[Path | None, list[DamagedCheckpointError]]:
    """The newest complete checkpoint in `checkpoint_dir` and the damaged ones passed over.

    Candidates: every `*.ckpt` file of the folder (`last.ckpt` and the step checkpoints). The one
    with the highest step wins; at equal steps `last.ckpt`. A damaged file is skipped, with a
    warning naming it and the cause. (None, [...]) when there is no complete checkpoint."""
    directory = Path(checkpoint_dir)
    damaged: list[DamagedCheckpointError] = []
    best: tuple[int, int, Path] | None = None
    if not directory.is_dir():
        return None, damaged
    for path in sorted(directory.glob("*.ckpt")):
        if not path.is_file():
            continue
        try:
            step = checkpoint_step(path)
        except DamagedCheckpointError as e:
            damaged.append(e)
            log.warning("%s; passed over for the newest complete checkpoint", e)
            continue
        key = (step, int(path.name == LAST), path)
        if best is None or key[:2] > best[:2]:
            best = key
    return (best[2] if best else None), damaged


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """The checkpoint a run starts from.

    None/"" -> None (fresh). "last" -> the newest complete checkpoint of `checkpoint_dir`
    (`find_resume_checkpoint`; None: a fresh start). A run folder (or a `latest` link) -> its
    last.ckpt (`checkpoint_file`). A path must exist and load (`MissingFileError` /
    `DamagedCheckpointError` otherwise)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        path, _ = find_resume_checkpoint(checkpoint_dir)
        return str(path) if path is not None else None
    path = checkpoint_file(ckpt_path)
    checkpoint_step(path)
    return str(path)


def checkpoint_file(ckpt_path: str | os.PathLike) -> Path:
    """The checkpoint file `ckpt_path` names: a file, or a run folder / its `checkpoints/` folder
    (-> `last.ckpt` in it). Raises `MissingFileError` naming the path when there is none."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        raise MissingFileError(f"ckpt_path={ckpt_path}: this folder holds no checkpoints/last.ckpt (nor "
                               "last.ckpt); give a .ckpt file or a training run's folder")
    if not path.is_file():
        raise MissingFileError(f"ckpt_path={ckpt_path}: no such checkpoint file or run folder; give an existing "
                               ".ckpt (or .pkl) file or a training run's folder (e.g. outputs/train/latest)")
    return path


# -- Lightning ---------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose files appear only once completely written, and whose load errors
    name the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` whose retention holds across interruptions.

    With `save_top_k=1` and no monitor (the newest step checkpoint plus `last.ckpt`), each save
    removes every other step checkpoint of the folder (files matching `filename`), also the one the
    run resumed from, which Lightning itself never deletes; versioned names (`-v1`) are not made:
    a file of the same name is replaced (atomically)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A user's mistake met mid-training (a damaged or missing image of their data set, found
        when its batch is loaded) stops the run between two steps: `last.ckpt` then keeps the steps
        trained since the previous checkpoint, and `ckpt_path=last` resumes there once the file is
        fixed (docs/framework.md "What survives a fault"). One process only: a save is collective
        across the processes of a distributed run, which the others, not failing, never join."""
        chain = list(error_chain(exception))
        if (not any(isinstance(e, UserError) for e in chain) or any(isinstance(e, CheckpointError) for e in chain)
                or trainer.state.fn != "fit" or trainer.sanity_checking or trainer.world_size != 1
                or self.dirpath is None or trainer.global_step == 0
                or self._last_global_step_saved == trainer.global_step):
            return
        path = Path(self.dirpath) / LAST
        try:
            trainer.save_checkpoint(str(path))
        except Exception as err:  # noqa: BLE001 - the user's error is the one to report
            log.warning("could not keep the %d steps trained in %s: %s", trainer.global_step, path, err)
            return
        self._last_global_step_saved = trainer.global_step
        log.warning("the run stopped at step %d; the steps trained are kept in %s: fix the cause and resume "
                    "with the same command + ckpt_path=last", trainer.global_step, path)

    def _step_file_pattern(self) -> re.Pattern:
        template = self.filename or "{epoch}-{step}"
        parts = re.split(r"\{[^}]*\}", template)
        return re.compile("^" + ".+".join(re.escape(p) for p in parts) + r"(-v\d+)?" + re.escape(self.FILE_EXTENSION) + "$")

    def _save_none_monitor_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_none_monitor_checkpoint(trainer, monitor_candidates)
        if self.save_top_k != 1 or not trainer.is_global_zero or self.dirpath is None:
            return
        keep = Path(self.best_model_path).name
        pattern = self._step_file_pattern()
        for p in Path(self.dirpath).iterdir():
            if p.name != keep and p.name != LAST and pattern.match(p.name) and p.is_file():
                p.unlink()
                log.info("removed %s, superseded by %s (save_top_k=1)", p, keep)
