"""DDP on two CPU processes (gloo): the same evaluation as one process; a two-process training run.

These start the real console entry points in subprocesses (Lightning's DDP launcher re-runs the
command once per process), so they are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework_helpers import DETECTING_MIN_AP, TINY_DATA, TINY_MODEL, TINY_RUN, compose_config
from tensormask.evaluate import evaluate
from tensormask.framework.checkpoint_io import strict_json

REPO = Path(__file__).resolve().parents[2]


def _run(module: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


DDP2 = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy.process_group_backend=gloo"]


@pytest.mark.slow
def test_two_process_evaluation_equals_one(detecting_run, tmp_path):
    # the session's model that detects (conftest.py), evaluated on 3 images: the two processes get 2
    # and 1 (the sampler pads rank 1 with a repeat, which must count once)
    run_dir, _, objects = detecting_run
    assert len(objects["datamodule"].val_dataset) == 3
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    one, _ = evaluate(compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "eval1"))
    for task, least in DETECTING_MIN_AP.items():
        assert one[task]["AP"] > least  # real detections on both sides of the comparison

    _run("tensormask.evaluate", [f"ckpt_path={ckpt}", *DDP2], tmp_path)
    # outputs/eval/<checkpoint>/<settings>/metrics.json (docs/framework.md#where-outputs-land), strict JSON
    (metrics_file,) = (tmp_path / "outputs" / "eval").glob("*/*/metrics.json")
    two = json.loads(metrics_file.read_text())["metrics"]
    one = strict_json(one)  # NaN (no objects of a size) -> None, as written
    assert two.keys() == one.keys() == {"bbox", "segm"}
    for task in one:
        for k, v in one[task].items():
            assert two[task][k] == (None if v is None else pytest.approx(v, abs=1e-9)), (task, k)


@pytest.mark.slow
def test_two_process_training_run(tmp_path):
    args = [*TINY_MODEL, *TINY_DATA, *TINY_RUN, *DDP2, "data.global_batch_size=4", "trainer.max_steps=3"]
    _run("tensormask.train", args, tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert summary["metrics"]["segm"].keys() >= {"AP", "AP50", "AP75"}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # the same command with ckpt_path=last finds this run's folder and its last checkpoint
    proc = _run("tensormask.train", [*args, "ckpt_path=last"], tmp_path)
    assert [p.name for p in (tmp_path / "outputs" / "train" / "runs").iterdir()] == [run_dir.name]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert "ckpt_path=last" in summary["overrides"]
    assert "resuming from" in proc.stdout + proc.stderr
