"""tensormask-reproduce: the launch through Hydra's launcher, skipping finished rows, failed rows.

The fast tests replace `tensormask.train.train` by a stand-in that writes run_summary.json the
way the real one does (or raises), so the orchestration runs in a second; the slow test at the
end trains for real.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import DictConfig

import tensormask.train
from tensormask import reproduce as rp
from tensormask.tables import collect_table, load_table
from tensormask.tables.collect import SUMMARY_FILE


def compose(tmp_path: Path, *overrides: str) -> DictConfig:
    return rp.compose(
        [
            f"runs_dir={tmp_path / 'runs'}",
            f"results_dir={tmp_path / 'results'}",
            "wandb.mode=offline",
            *overrides,
        ]
    )


class FakeTrain:
    """Stands in for `tensormask.train.train`: records each call, writes a summary, or raises."""

    def __init__(self, fail_rows=(), die_silently_rows=()):
        self.calls: list[DictConfig] = []
        self.run_dirs: list[Path] = []  # ${paths.output_dir} resolves only while the job runs
        self.fail_rows, self.die_silently_rows = set(fail_rows), set(die_silently_rows)

    def __call__(self, cfg: DictConfig):
        self.calls.append(cfg)
        run_dir = Path(cfg.paths.output_dir)
        self.run_dirs.append(run_dir)
        row = run_dir.name
        if row in self.die_silently_rows:  # raises before the run could write anything
            raise MemoryError("out of memory while building the model")
        summary = {"status": "running", "error": None, "metrics": {}, "wandb": None, "overrides": [],
                   "run_dir": str(run_dir), "steps": 0}
        run_dir.mkdir(parents=True, exist_ok=True)
        if row in self.fail_rows:
            summary.update(status="failed", error="FloatingPointError: loss is NaN at step 2")
            (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
            raise FloatingPointError("loss is NaN at step 2")
        metrics = {"bbox": {"AP": 0.25, "AP50": 0.5, "AP75": 0.2}, "segm": {"AP": 0.2, "AP50": 0.4, "AP75": 0.1}}
        summary.update(status="finished", metrics=metrics, steps=3,
                       wandb={"run_id": f"id-{row}", "project": "tensormask", "group": cfg.group, "tags": list(cfg.tags),
                              "mode": "offline"})
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
        return metrics, {}


def test_compose_reads_the_command_line():
    cfg = rp.compose(["table=table4", "scale=paper", "launcher=slurm", "rows=[tensormask]"])
    assert (cfg.table, cfg.scale, cfg.launcher, list(cfg.rows)) == ("table4", "paper", "slurm", ["tensormask"])
    assert list(cfg.scales) == ["mini", "paper"]


def test_row_overrides_file_the_run_under_its_table(tmp_path):
    cfg = compose(tmp_path, "table=table1", "train_overrides=['trainer.max_steps=2']")
    spec = load_table("table1")
    overrides = rp.row_overrides(spec, "aligned", cfg)
    assert overrides[: len(cfg.scales.mini)] == list(cfg.scales.mini)
    assert "model/mask_head=aligned" in overrides
    assert "group=table1" in overrides and "tags=[reproduce,table1,aligned,mini]" in overrides
    assert overrides[-1] == "trainer.max_steps=2"  # the user's overrides come last and win
    assert "ckpt_path=last" in overrides  # an interrupted row resumes
    forced = rp.row_overrides(spec, "aligned", compose(tmp_path, "table=table1", "force=true"))
    assert "ckpt_path=last" not in forced  # force=true retrains from scratch


def test_failed_row_is_reported_and_the_others_complete(tmp_path, monkeypatch):
    fake = FakeTrain(fail_rows={"box_head_mask_bb_nms"}, die_silently_rows={"no_box_head_mask_bb_nms"})
    monkeypatch.setattr(tensormask.train, "train", fake)
    cfg = compose(tmp_path, "table=table5")
    results = rp.reproduce(cfg)

    assert [r.status for r in results] == ["finished", "failed", "failed"]
    assert len(fake.calls) == 3
    sweep = tmp_path / "runs" / "mini" / "table5"
    assert fake.run_dirs == [sweep / r.id for r in load_table("table5").rows]
    first = fake.calls[0]
    assert first.group == "table5" and list(first.tags) == ["reproduce", "table5", "box_head_bb_nms", "mini"]
    assert first.mode == "full" and first.model.nms_boxes == "bb" and first.trainer.max_steps == 400
    assert fake.calls[2].mode == "mask_only"
    assert results[0].ours["segm.AP"] == pytest.approx(20.0) and results[0].wandb_run_id == "id-box_head_bb_nms"
    assert results[1].error == "FloatingPointError: loss is NaN at step 2"
    # The row that died without a word still gets a summary with its reason.
    assert results[2].error == "MemoryError: out of memory while building the model"
    assert json.loads((sweep / "no_box_head_mask_bb_nms" / SUMMARY_FILE).read_text())["status"] == "failed"

    md = (tmp_path / "results" / "table5.md").read_text()
    assert "failed: FloatingPointError: loss is NaN at step 2" in md and "failed: MemoryError" in md
    with (tmp_path / "results" / "table5.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished", "failed", "failed"]
    assert rows[0]["wandb_run_id"] == "id-box_head_bb_nms" and rows[0]["segm.AP ours"] == "20.00"
    # The collected table went to wandb (offline: a run folder under the sweep).
    assert list((sweep / "wandb").glob("offline-run-*"))

    # Re-running skips the finished row and retries the failed ones.
    again = FakeTrain()
    monkeypatch.setattr(tensormask.train, "train", again)
    results = rp.reproduce(cfg)
    assert [d.name for d in again.run_dirs] == ["box_head_mask_bb_nms", "no_box_head_mask_bb_nms"]
    assert [r.status for r in results] == ["finished"] * 3

    # And once everything is finished, nothing runs; force=true runs it all again.
    idle = FakeTrain()
    monkeypatch.setattr(tensormask.train, "train", idle)
    rp.reproduce(cfg)
    assert idle.calls == []
    rp.reproduce(compose(tmp_path, "table=table5", "force=true", "rows=[box_head_bb_nms]", "wandb.log_table=false"))
    assert [d.name for d in idle.run_dirs] == ["box_head_bb_nms"]


def test_plan_rejects_unknown_rows(tmp_path):
    cfg = compose(tmp_path, "table=table1", "rows=[natural,bogus]")
    with pytest.raises(KeyError, match="bogus"):
        rp.plan(load_table("table1"), cfg)


def test_main_exit_status_and_usage(tmp_path, monkeypatch, capsys):
    assert rp.main(["--help"]) == 0
    assert "table1" in capsys.readouterr().out
    assert rp.main([f"runs_dir={tmp_path}", "table=table9"]) == 2
    err = capsys.readouterr().err
    assert "no sweep file" in err and "table9.yaml" in err and "table5" in err  # names the tables there are
    monkeypatch.setattr(tensormask.train, "train", FakeTrain(fail_rows={"natural"}))
    args = [f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}", "wandb.log_table=false", "table=table1"]
    assert rp.main(args) == 1  # a row failed: the table is written, the status says so
    assert "| simple head, aligned |" in capsys.readouterr().out
    monkeypatch.setattr(tensormask.train, "train", FakeTrain())
    assert rp.main(args) == 0
    assert [r.status for r in collect_table(load_table("table1"), tmp_path / "runs" / "mini" / "table1")] == ["finished"] * 2


def test_a_row_whose_config_does_not_compose_fails_alone(tmp_path, monkeypatch):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    text = (load_table("table1").path).read_text()
    extra_row = """  - id: no_such_head
    label: a head that does not exist
    overrides: [model/mask_head=no_such_head]
    paper: {segm: {AP: null}}
    source: this test
"""
    text = text.replace("notes:", extra_row + "notes:", 1)
    (sweeps / "table1.yaml").write_text(text)
    fake = FakeTrain()
    monkeypatch.setattr(tensormask.train, "train", fake)
    results = rp.reproduce(compose(tmp_path, "table=table1", f"sweeps_dir={sweeps}", "wandb.log_table=false"))
    assert [r.status for r in results] == ["finished", "finished", "failed"]
    assert "no_such_head" in results[2].error and [d.name for d in fake.run_dirs] == ["natural", "aligned"]
    summary = json.loads((results[2].run_dir / SUMMARY_FILE).read_text())
    assert "model/mask_head=no_such_head" in summary["overrides"]


@pytest.mark.parametrize("table", ["table3", "table4"])
def test_slurm_jobs_ask_for_what_their_rows_train_on(tmp_path, table):
    """scale=paper rows train on 8 GPUs (trainer=ddp): the SLURM launcher must ask for them."""
    cfg = compose(tmp_path, f"table={table}", "scale=paper", "launcher=slurm")
    jobs, _ = rp.plan(load_table(table), cfg)
    groups, errors = rp.group_by_resources(jobs, cfg)
    assert errors == {}
    assert list(groups.values()) == [list(jobs)]  # one launch for the whole table
    resources = json.loads(next(iter(groups)))
    assert resources["gpus_per_node"] == 8 and resources["tasks_per_node"] == 8 and resources["nodes"] == 1
    assert resources["_target_"].endswith("SlurmLauncher")

    mini = compose(tmp_path, f"table={table}", "launcher=local")
    groups, _ = rp.group_by_resources(rp.plan(load_table(table), mini)[0], mini)
    (key,) = groups
    assert json.loads(key)["gpus_per_node"] == 0
