"""Faults lose nothing (docs/framework.md, "What survives a fault"): a run killed inside a checkpoint
write resumes from the newest complete checkpoint, damaged checkpoints are named and passed over,
failing writes name the file and the cause and keep the previous checkpoint, the progress bar and
the CSV record continue across a resume."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import multiprocessing
import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from framework_helpers import tiny_train_config
from tensormask.errors import UserError
from tensormask.framework.checkpoint_io import (
    AtomicCheckpointIO, CheckpointWriteError, DamagedCheckpointError, find_resume_checkpoint, read_checkpoint,
    remove_orphans, resolve_ckpt_path,
)
from tensormask.train import train


def _ckpt(path: Path, step: int, size: int = 64) -> Path:
    torch.save({"global_step": step, "state_dict": {"model.w": torch.arange(size, dtype=torch.float32)}}, path)
    return path


# -- damaged checkpoints -----------------------------------------------------------------------------
def test_damaged_checkpoints_name_the_file_and_the_cause(tmp_path):
    good = _ckpt(tmp_path / "good.ckpt", 4, size=4096)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    assert read_checkpoint(good)["global_step"] == 4
    for path, cause in ((empty, "empty file"), (truncated, "truncated"), (garbage, "not a loadable checkpoint")):
        with pytest.raises(DamagedCheckpointError, match=rf"damaged checkpoint .*{path.name}: {cause}") as info:
            resolve_ckpt_path(str(path), tmp_path)  # an explicit ckpt_path is checked before any work
        assert isinstance(info.value, UserError) and info.value.path == path
        # Lightning's resume reads through the plugin: the same named error
        with pytest.raises(DamagedCheckpointError, match=path.name):
            AtomicCheckpointIO().load_checkpoint(path)


def test_eval_and_predict_name_a_damaged_checkpoint(tmp_path):
    from tensormask.framework.builders import load_model_weights

    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match=r"damaged checkpoint .*last\.ckpt: empty file"):
        load_model_weights(torch.nn.Linear(2, 2), damaged)


def test_resume_takes_the_newest_complete_checkpoint_passing_over_damaged_ones(tmp_path, caplog):
    # killed inside the first last.ckpt write: only a step checkpoint is complete
    _ckpt(tmp_path / "step0000050.ckpt", 50)
    (tmp_path / ".last.ckpt.k2j4x9q1.tmp").write_bytes(b"PK\x03\x04half")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "step0000050.ckpt")
    # killed inside a later last.ckpt write: last.ckpt is older than the newest step checkpoint
    _ckpt(tmp_path / "last.ckpt", 50)
    _ckpt(tmp_path / "step0000100.ckpt", 100)
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "step0000100.ckpt")
    _ckpt(tmp_path / "last.ckpt", 100)  # the same step: last.ckpt
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "last.ckpt")
    # a damaged newest checkpoint: passed over, with a warning naming it
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "step0000100.ckpt").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        found, damaged = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "step0000050.ckpt"
    assert sorted(e.path.name for e in damaged) == ["last.ckpt", "step0000100.ckpt"]
    warned = " | ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "last.ckpt: truncated" in warned and "step0000100.ckpt: empty file" in warned
    # the temporary file of the killed write goes on the next start
    assert [p.name for p in remove_orphans(tmp_path)] == [".last.ckpt.k2j4x9q1.tmp"]
    assert not list(tmp_path.glob(".*.tmp"))


# -- failing writes ----------------------------------------------------------------------------------
class _FailingFile:
    """A file that fails like a full disk once `budget` bytes are written."""

    def __init__(self, f, budget: int, err: int) -> None:
        self.f, self.budget, self.err = f, budget, err

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data) -> int:
        if self.budget < len(data):
            raise OSError(self.err, os.strerror(self.err))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.fixture
def fail_checkpoint_write(monkeypatch):
    """fail(nth, err, budget): the `nth` checkpoint write (1-based) from now on fails with `err`
    after `budget` bytes, at the OS level (the file object the atomic write gets)."""
    real_fdopen = os.fdopen
    state = {"count": 0, "nth": None}

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if "w" in mode and ".ckpt." in name and name.endswith(".tmp"):
            state["count"] += 1
            if state["count"] == state["nth"]:
                return _FailingFile(f, state["budget"], state["err"])
        return f

    def fail(nth: int, err: int = errno.ENOSPC, budget: int = 1000) -> None:
        state.update(count=0, nth=nth, err=err, budget=budget)

    monkeypatch.setattr(os, "fdopen", fdopen)
    return fail


def test_full_disk_and_unwritable_name_the_file_and_keep_the_previous_checkpoint(tmp_path, fail_checkpoint_write):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    big = {"global_step": 2, "w": torch.zeros(100_000)}
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(10)}, path)
    fail_checkpoint_write(1, errno.ENOSPC, budget=5000)
    with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint {path}: no space left on {tmp_path}"):
        io_.save_checkpoint(big, path)
    fail_checkpoint_write(1, errno.EACCES, budget=0)
    with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint {path}: {tmp_path} is not writable"):
        io_.save_checkpoint(big, path)
    fail_checkpoint_write(1, errno.EIO, budget=100)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt: Input/output error"):
        io_.save_checkpoint(big, path)
    assert read_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_full_tmpfs(tmp_path):
    """A real full file system (a 256 KiB tmpfs; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        io_ = AtomicCheckpointIO()
        io_.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, mnt / "last.ckpt")
        with pytest.raises(CheckpointWriteError, match=rf"last\.ckpt: no space left on {mnt}"):
            io_.save_checkpoint({"global_step": 2, "w": torch.ones(200_000)}, mnt / "last.ckpt")
        assert read_checkpoint(mnt / "last.ckpt")["global_step"] == 1
        assert sorted(p.name for p in mnt.iterdir()) == ["last.ckpt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- whole runs --------------------------------------------------------------------------------------
def _cfg(run_dir, *extra):
    cfg = tiny_train_config(run_dir, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2",
                            "module.warmup_steps=1", "evaluate=false", "trainer.enable_progress_bar=true", *extra)
    with open_dict(cfg):
        cfg.callbacks.progress_bar = {"_target_": "tensormask.framework.callbacks.StepProgressBar", "refresh_rate": 1}
    return cfg


def _killed_run(cfg, kill_at_save: int) -> None:
    """(In a fresh process) train, and die like `kill -9` half-way through checkpoint write
    `kill_at_save` (1-based): the temporary file is half-written, nothing cleans up."""
    import tensormask.framework  # noqa: F401

    real_save = torch.save
    count = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "global_step" in obj:
            count["n"] += 1
            if count["n"] == kill_at_save:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os._exit(137)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    train(cfg)


class BarProbe(L.Callback):
    """Records the progress bar's (n, total) after each step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, object]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((int(bar.n), bar.total))


def test_run_killed_inside_a_checkpoint_write_resumes_from_the_newest_complete_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    # saves: 1 step0000002, 2 last.ckpt@2, 3 step0000004, 4 last.ckpt@4 <- killed half-way through
    child = multiprocessing.get_context("spawn").Process(target=_killed_run, args=(_cfg(run_dir), 4))
    child.start()
    child.join(timeout=900)
    assert child.exitcode == 137
    orphans = list(ckpts.glob(".last.ckpt.*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 2
    assert read_checkpoint(ckpts / "step0000004.ckpt")["global_step"] == 4

    cfg = _cfg(run_dir, "ckpt_path=last")
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": f"{__name__}.BarProbe"}
    _, objects = train(cfg)
    out = capsys.readouterr().out
    assert f"ckpt_path=last: resuming from {ckpts / 'step0000004.ckpt'} (step 4" in out
    probe = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, BarProbe))
    assert probe.seen == [(5, 6), (6, 6)]  # resumed at step 4, the bar keeps its total
    # the orphan is gone, and retention (save_top_k=1) left only the newest step checkpoint
    assert sorted(p.name for p in ckpts.iterdir()) == ["config.yaml", "last.ckpt", "step0000006.ckpt"]
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 6
    # one continuous CSV record: each step once, in one version folder
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    # (step 3's row is logged by Lightning right after the step-4 checkpoint, so the kill inside that
    # write took it; the resumed run starts at step 4)
    assert steps == [0, 1, 2, 4, 5]


def test_csv_record_continues_without_the_replayed_steps(tmp_path):
    from tensormask.framework.loggers import RunCSVLogger

    first = RunCSVLogger(str(tmp_path))
    for step in range(6):  # a run killed after logging step 5, its newest checkpoint at step 4
        first.log_metrics({"train/loss": float(step)}, step=step)
    resumed = RunCSVLogger(str(tmp_path))
    resumed.continue_at(4)
    for step in (4, 5, 6):
        resumed.log_metrics({"train/loss": 10.0 + step, "val/AP": 0.5}, step=step)
    resumed.finalize("success")
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f)]
    assert rows == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    fresh = RunCSVLogger(str(tmp_path))  # a fresh start of the run begins a new record
    fresh.continue_at(0)
    assert not (tmp_path / "csv" / "version_0" / "metrics.csv").exists()


def test_run_with_a_failing_checkpoint_write_names_it_and_keeps_the_previous(tmp_path, fail_checkpoint_write):
    run_dir = tmp_path / "run"
    fail_checkpoint_write(3, errno.ENOSPC, budget=20_000)  # step0000004.ckpt: the disk fills up
    with pytest.raises(CheckpointWriteError, match=r"step0000004\.ckpt: no space left on .*checkpoints") as info:
        train(_cfg(run_dir, "trainer.max_steps=4"))
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "failed" and "no space left on" in summary["error"]
    assert str(info.value.path).endswith("step0000004.ckpt")
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["config.yaml", "last.ckpt", "step0000002.ckpt"]
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 2


def test_a_damaged_image_found_mid_run_keeps_the_steps_trained(tmp_path, monkeypatch, capsys):
    # a user's own data set with one damaged image, in the 4th batch of a run checkpointing every
    # 100 steps: the run stops with the error naming the file, and last.ckpt keeps the steps trained
    # (2: Lightning loads one batch ahead), from which ckpt_path=last resumes once the file is fixed
    # (docs/framework.md "What survives a fault")
    from tensormask.data.coco import CocoFormatError, CocoInstances

    original, served = CocoInstances.__getitem__, []

    def damaged_in_batch_4(self, index):
        if self.train:
            served.append(index)
            if len(served) == 7:  # global_batch_size=2
                raise CocoFormatError("cannot decode image mine/train/a.png (image id 7 in mine/train.json): truncated")
        return original(self, index)

    monkeypatch.setattr(CocoInstances, "__getitem__", damaged_in_batch_4)
    run_dir = tmp_path / "run"
    # one loader worker, as users run it: the error comes back re-raised with the worker's traceback
    cfg = _cfg(run_dir, "callbacks.model_checkpoint.every_n_train_steps=100", "data.num_workers=1")
    with pytest.raises(UserError, match="mine/train/a.png"):
        train(cfg)
    found, _ = find_resume_checkpoint(run_dir / "checkpoints")
    assert found == run_dir / "checkpoints" / "last.ckpt" and read_checkpoint(found)["global_step"] == 2
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == ("CocoFormatError: cannot decode image mine/train/a.png (image id 7 in mine/train.json): "
                                "truncated")  # the message, not the worker's traceback
    monkeypatch.setattr(CocoInstances, "__getitem__", original)  # the file fixed
    _, objects = train(_cfg(run_dir, "callbacks.model_checkpoint.every_n_train_steps=100", "data.num_workers=0",
                            "ckpt_path=last"))
    assert f"resuming from {found} (step 2" in capsys.readouterr().out and objects["trainer"].global_step == 6


def test_an_evaluation_failing_after_training_says_the_training_is_kept(tmp_path, monkeypatch, caplog):
    # a damaged validation image of one's own data, met by the evaluation after training: the
    # trained run is kept and the warning says to evaluate it (the same train command again would
    # start afresh and replace its checkpoints)
    from tensormask.data.coco import CocoFormatError, CocoInstances

    original = CocoInstances.__getitem__

    def damaged_validation_image(self, index):
        if not self.train:
            raise CocoFormatError("cannot decode image mine/val/b.png (image id 9 in mine/val.json): truncated")
        return original(self, index)

    monkeypatch.setattr(CocoInstances, "__getitem__", damaged_validation_image)
    run_dir = tmp_path / "run"
    cfg = tiny_train_config(run_dir, "data.num_workers=0")
    with caplog.at_level(logging.WARNING, logger="tensormask.train"), pytest.raises(UserError, match="mine/val/b.png"):
        train(cfg)
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert f"training finished (2 steps, {run_dir / 'checkpoints' / 'last.ckpt'})" in caplog.text
    assert f"tensormask.evaluate ckpt_path={run_dir}" in caplog.text
