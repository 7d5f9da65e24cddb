"""Runs that survive: an interrupted run resumed with ckpt_path=last ends exactly where an
uninterrupted one does (step, weights, optimizer and scheduler state, metrics)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from framework_helpers import tiny_train_config
from tensormask.framework.checkpoint_io import AtomicCheckpointIO, resolve_ckpt_path
from tensormask.train import train


class Interrupt(L.Callback):
    """Kills the run (an exception, as a preempted job dies) when `step` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated preemption at step {trainer.global_step}")


class FirstStep(L.Callback):
    def __init__(self) -> None:
        self.first = None

    def on_train_batch_start(self, trainer, *args) -> None:
        if self.first is None:
            self.first = trainer.global_step


def _cfg(run_dir, *extra):
    return tiny_train_config(run_dir, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2",
                             "module.warmup_steps=3", "module.milestones=[4]", "data.global_batch_size=2", *extra)


def _with_callback(cfg, name, target, **kwargs):
    with open_dict(cfg):
        cfg.callbacks[name] = {"_target_": target, **kwargs}
    return cfg


def test_resume_matches_uninterrupted_run(tmp_path):
    ref_metrics, ref = train(_cfg(tmp_path / "reference"))
    # plain data only: loadable without unpickling arbitrary objects (what Lightning's resume does)
    ref_state = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ref_state["global_step"] == 6

    run_dir = tmp_path / "interrupted"
    cfg = _with_callback(_cfg(run_dir), "interrupt", f"{__name__}.Interrupt", step=5)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(cfg)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "failed" and "simulated preemption" in summary["error"]
    # the last checkpoint is the one of step 4, complete (written atomically), nothing half-written
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    # the same command with ckpt_path=last finds that checkpoint and continues at step 4
    cfg = _with_callback(_cfg(run_dir, "ckpt_path=last"), "first_step", f"{__name__}.FirstStep")
    metrics, objects = train(cfg)
    first_step = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, FirstStep)).first
    assert first_step == 4
    assert objects["trainer"].global_step == 6

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    for key, value in ref_state["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    ref_opt, opt = ref_state["optimizer_states"][0]["state"], state["optimizer_states"][0]["state"]
    assert ref_opt.keys() == opt.keys()
    for k in ref_opt:  # AdamW (the quickstart's): step, exp_avg, exp_avg_sq of every parameter
        assert ref_opt[k].keys() == opt[k].keys() and ref_opt[k]
        for name, value in ref_opt[k].items():
            torch.testing.assert_close(opt[k][name], value, rtol=1e-5, atol=1e-6, msg=f"{k}.{name}")
    assert state["lr_schedulers"] == ref_state["lr_schedulers"]
    assert metrics.keys() == ref_metrics.keys()
    for task in metrics:
        for k, v in ref_metrics[task].items():
            assert metrics[task][k] == pytest.approx(v, abs=1e-6, nan_ok=True), (task, k)


def test_ckpt_path_resolution(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("last", tmp_path) is None  # nothing yet: a fresh start
    (tmp_path / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) is None  # only a damaged one: passed over (test_faults.py)
    torch.save({"global_step": 3}, tmp_path / "last.ckpt")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), tmp_path)


def test_atomic_checkpoint_io_keeps_old_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
