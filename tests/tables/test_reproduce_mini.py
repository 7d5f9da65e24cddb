"""End to end: `tensormask-reproduce table=<name> scale=mini` trains every row for real, collects the
table beside the paper's numbers, and skips the finished rows when run again (slow; CI runs it)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tensormask.tables import load_table

# Each row: 2 training steps on 2 images, evaluation on 4 validation images.
TINY = "train_overrides=['trainer.max_steps=2','module.warmup_steps=1','module.milestones=[1]'," \
       "'data.global_batch_size=2','data.max_val_images=4','callbacks.model_checkpoint.every_n_train_steps=2']"


def reproduce(tmp_path: Path, table: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tensormask.reproduce", f"table={table}", "scale=mini",
           f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}", "wandb.mode=offline", TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("table", ["table1", "table2d"])
def test_mini_reproduction_end_to_end(tmp_path, table):
    spec = load_table(table)
    done = reproduce(tmp_path, table)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with (tmp_path / "results" / f"{table}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == [r.id for r in spec.rows]
    for line, row in zip(rows, spec.rows):
        assert line["status"] == "finished", line["error"]
        ours = float(line["segm.AP ours"])  # a number from the run, in percent
        assert 0.0 <= ours <= 100.0
        assert float(line["segm.AP paper"]) == row.paper["segm.AP"]
        run_dir = Path(line["run_dir"])
        assert run_dir == tmp_path / "runs" / "mini" / table / row.id
        summary = json.loads((run_dir / "run_summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 2
        assert ours == pytest.approx(100 * summary["metrics"]["segm"]["AP"], abs=0.006)
        assert line["wandb_run_id"] and line["wandb_run_id"] == summary["wandb"]["run_id"]
        assert summary["wandb"]["group"] == table and row.id in summary["wandb"]["tags"]
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len({line["wandb_run_id"] for line in rows}) == len(rows)  # one wandb run per row

    md = (tmp_path / "results" / f"{table}.md").read_text()
    assert md.startswith(f"# {spec.title}") and md.count("| finished |") == len(spec.rows)
    assert md in done.stdout  # the command hands the table back
    # The collected table was logged to wandb (offline run next to the rows).
    assert list((tmp_path / "runs" / "mini" / table / "wandb").glob("offline-run-*"))

    # Run again: every row is finished, nothing trains, the table is the same.
    again = reproduce(tmp_path, table)
    assert again.returncode == 0
    assert f"{len(spec.rows)} row(s) already finished, skipped" in again.stderr + again.stdout
    assert "Launching" not in again.stderr + again.stdout
