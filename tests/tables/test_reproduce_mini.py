"""End to end: the rows of Table 1 as a plain Hydra multirun (`tensormask-train -m hydra/sweeper=rows`, the
basic launcher) trained for real, then `tensormask-reproduce` collects them without training (slow; CI runs it)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tensormask.tables import load_table

# Each row: 2 training steps on 2 images, evaluation on 4 validation images.
TINY = ["trainer.max_steps=2", "module.warmup_steps=1", "module.milestones=[1]", "data.global_batch_size=2",
        "data.max_val_images=4", "callbacks.model_checkpoint.every_n_train_steps=2"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})


@pytest.mark.slow
def test_two_rows_as_a_hydra_multirun_then_collected(tmp_path):
    spec = load_table("table1")
    runs = tmp_path / "runs"
    done = run("tensormask.train", "-m", "hydra/sweeper=rows", "hydra.sweeper.table=table1", f"hydra.sweeper.runs_dir={runs}",
               f"hydra.sweep.dir={runs / 'mini'}", *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for row in spec.rows:
        summary = json.loads((runs / "mini" / "table1" / row.id / "run_summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 2
        assert (runs / "mini" / "table1" / row.id / "checkpoints" / "last.ckpt").is_file()

    quoted = ",".join(f"'{o}'" for o in TINY)
    collected = run("tensormask.reproduce", "table=table1", f"runs_dir={runs}", f"results_dir={tmp_path / 'results'}",
                    f"train_overrides=[{quoted}]")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "Launching" not in collected.stdout + collected.stderr  # both rows were finished with this config
    with (tmp_path / "results" / "table1.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == [r.id for r in spec.rows]
    for line, row in zip(rows, spec.rows):
        assert line["status"] == "finished", line["error"]
        run_dir = Path(line["run_dir"])
        assert run_dir == runs / "mini" / "table1" / row.id
        summary = json.loads((run_dir / "run_summary.json").read_text())
        assert float(line["segm.AP ours"]) == pytest.approx(100 * summary["metrics"]["segm"]["AP"], abs=0.006)
        assert float(line["segm.AP paper"]) == row.paper["segm.AP"]
        assert line["wandb_run_id"] and line["wandb_run_id"] == summary["wandb"]["run_id"]
        assert f"table1.{row.id}" in summary["wandb"]["tags"]
    md = (tmp_path / "results" / "table1.md").read_text()
    assert md.startswith(f"# {spec.title}") and md.count("| finished |") == 2
    assert md in collected.stdout  # the command hands the table back
    assert list((runs / "mini" / "table1" / "wandb").glob("offline-run-*"))  # the table went to wandb


@pytest.mark.slow
def test_two_rows_through_the_joblib_launcher(tmp_path):
    """The same two rows with `hydra/launcher=joblib` (hydra-joblib-launcher, the dev extra): two worker processes."""
    spec = load_table("table1")
    runs = tmp_path / "runs"
    done = run("tensormask.train", "-m", "hydra/sweeper=rows", "hydra.sweeper.table=table1", f"hydra.sweeper.runs_dir={runs}",
               f"hydra.sweep.dir={runs / 'mini'}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr  # the joblib launcher ran the rows, not the basic one
    plan = json.loads((runs / "mini" / "plan.json").read_text())
    for row in spec.rows:
        summary = json.loads((runs / "mini" / "table1" / row.id / "run_summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 2
        assert (runs / "mini" / "table1" / row.id / "checkpoints" / "last.ckpt").is_file()
        assert plan["rows"][f"table1/{row.id}"]["runs"]["0"]["error"] is None
