"""tensormask-reproduce: the multirun through the rows sweeper, shared trainings, seeds, stale runs, failures.

The fast tests replace `tensormask.train.train` by a stand-in that writes checkpoints/config.yaml and
run_summary.json the way the real one does (or raises); Hydra's basic launcher runs it in this
process, so the orchestration runs in seconds. tests/tables/test_reproduce_mini.py trains for real.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import DictConfig

import tensormask.train
from tensormask import reproduce as rp
from tensormask.framework.builders import save_run_config
from tensormask.tables import load_table
from tensormask.tables.collect import SUMMARY_FILE


def compose(tmp_path: Path, *overrides: str) -> DictConfig:
    return rp.compose([f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}", "wandb.mode=offline", *overrides])


def ap_of(cfg: DictConfig) -> float:
    """The stand-in's mask AP: a function of the row's head, its seed and its NMS boxes, so tests can check every number."""
    head = str(cfg.model.get("mask_head", {}).get("_target_", "none")) if "mask_head" in cfg.model else "none"
    base = {"SimpleNaturalMaskHead": 0.20, "SimpleAlignedMaskHead": 0.30}.get(head.rsplit(".", 1)[-1], 0.40)
    if cfg.model.get("nms_boxes") == "mask-bb":
        base -= 0.05
    return round(base + 0.01 * int(cfg.seed), 4)


class FakeTrain:
    """Stands in for `tensormask.train.train`: records each call, saves the run's config, writes a summary, or raises."""

    def __init__(self, fail=(), die=()):
        self.calls: list[DictConfig] = []
        self.run_dirs: list[Path] = []  # ${paths.output_dir} resolves only while the job runs
        self.fail, self.die = set(fail), set(die)

    def __call__(self, cfg: DictConfig):
        self.calls.append(cfg)
        run_dir = Path(cfg.paths.output_dir)
        self.run_dirs.append(run_dir)
        name = run_dir.name
        if name in self.die:  # raises before the run could write anything
            raise MemoryError("out of memory while building the model")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, Path(cfg.paths.checkpoint_dir))
        summary = {"status": "running", "error": None, "metrics": {}, "wandb": None, "overrides": [], "run_dir": str(run_dir), "steps": 0}
        if name in self.fail:
            summary.update(status="failed", error="FloatingPointError: loss is NaN at step 2")
            (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
            raise FloatingPointError("loss is NaN at step 2")
        ap = ap_of(cfg)
        metrics = {"bbox": {"AP": ap + 0.1, "AP50": 0.5, "AP75": 0.2}, "segm": {"AP": ap, "AP50": 0.4, "AP75": 0.1}}
        summary.update(status="finished", metrics=metrics, steps=int(cfg.trainer.max_steps) if cfg.get("train", True) else 0,
                       wandb={"run_id": f"id-{name}", "project": "tensormask", "group": cfg.group, "tags": list(cfg.tags), "mode": "offline"})
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
        return metrics, {}


@pytest.fixture
def fake(monkeypatch):
    def install(**kwargs) -> FakeTrain:
        stand_in = FakeTrain(**kwargs)
        monkeypatch.setattr(tensormask.train, "train", stand_in)
        return stand_in

    return install


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_compose_reads_the_command_line():
    cfg = rp.compose(["table=table4", "scale=paper", "launcher=slurm", "rows=[tensormask]", "seeds=3", "dry_run=true"])
    assert (cfg.table, cfg.scale, cfg.launcher, list(cfg.rows), cfg.seeds, cfg.dry_run) == ("table4", "paper", "slurm", ["tensormask"], 3, True)


def test_the_command_is_a_plain_hydra_multirun(tmp_path):
    cfg = compose(tmp_path, "table=all", "seeds=[0,7]", "launcher=local", "imagenet_weights=/weights", "train_overrides=['trainer=gpu']")
    args = rp.multirun_arguments(cfg)
    assert args[:3] == ["-m", "hydra/sweeper=rows", "hydra/launcher=local"]
    assert "hydra.sweeper.table=['table1','table2a','table2b','table2c','table2d','table3','table4','table5']" in args
    assert "hydra.sweeper.seeds=[0,7]" in args and "trainer=gpu" in args
    assert args[-1] == "++imagenet_weights='/weights'"  # reaches every row's training


def test_shared_trainings_run_once_and_inference_rows_evaluate_their_checkpoint(tmp_path, fake):
    stand_in = fake()
    results = rp.reproduce(compose(tmp_path, "table=[table2d,table5]"))
    root = tmp_path / "runs" / "mini"
    # Two trainings (one window, named after Table 2c's bipyramid row which trains it first in paper
    # order; two windows = table 5's box-head rows) + table 5's mask-only training, then three
    # evaluations with the rows' NMS boxes.
    assert [d.relative_to(root).as_posix() for d in stand_in.run_dirs] == [
        "table2c/tensor_bipyramid", "table2d/two_windows", "table5/no_box_head_mask_bb_nms",
        "table5/box_head_bb_nms", "table5/box_head_mask_bb_nms", "table5/no_box_head_mask_bb_nms-eval",
    ]
    evals = stand_in.calls[3:]
    assert [c.train for c in evals] == [False] * 3 and [c.model.nms_boxes for c in evals] == ["bb", "mask-bb", "mask-bb"]
    assert evals[0].ckpt_path == str(root / "table2d" / "two_windows" / "checkpoints" / "last.ckpt")
    assert all(c.trainer.max_steps == 500 for c in stand_in.calls)
    two = stand_in.calls[1]
    assert set(two.tags) >= {"reproduce", "mini", "table2d.two_windows", "table5.box_head_bb_nms", "table5.box_head_mask_bb_nms"}
    assert [r.status for r in results] == ["finished"] * 5
    assert [r.ours["segm.AP"] for r in results] == pytest.approx([40.0, 40.0, 40.0, 35.0, 35.0])
    assert [r.run_dir.relative_to(root).as_posix() for r in results] == [
        "table2c/tensor_bipyramid", "table2d/two_windows", "table5/box_head_bb_nms", "table5/box_head_mask_bb_nms",
        "table5/no_box_head_mask_bb_nms-eval"]
    md = (tmp_path / "results" / "table5.md").read_text()
    assert "| box head, NMS on bb |" in md and "## The paper's comparisons" in md
    assert list((root / "table5" / "wandb").glob("offline-run-*"))  # the collected table went to wandb

    # Everything finished with this config: nothing runs again.
    again = fake()
    rp.reproduce(compose(tmp_path, "table=[table2d,table5]", "wandb.log_table=false"))
    assert again.calls == []


def test_failed_rows_fail_alone_and_rerun(tmp_path, fake):
    fake(fail={"aligned"}, die={"natural"})
    cfg = compose(tmp_path, "table=table1", "wandb.log_table=false")
    results = rp.reproduce(cfg)
    assert [r.status for r in results] == ["failed", "failed"]
    assert results[0].error == "MemoryError: out of memory while building the model"  # no summary of its own: the job's error
    assert results[1].error == "FloatingPointError: loss is NaN at step 2"
    rows = read_csv(tmp_path / "results" / "table1.csv")
    assert [r["status"] for r in rows] == ["failed", "failed"] and rows[0]["error"].startswith("MemoryError")

    again = fake()
    results = rp.reproduce(cfg)
    assert [d.name for d in again.run_dirs] == ["natural", "aligned"]  # failed rows run again (resuming)
    assert [r.status for r in results] == ["finished", "finished"]
    assert [c.ckpt_path for c in again.calls] == ["last", "last"]


@pytest.mark.parametrize("blocker", ["folder", "log file"])
def test_an_unwritable_row_fails_that_row_only(tmp_path, fake, blocker):
    sweep = tmp_path / "runs" / "mini" / "table1"
    sweep.mkdir(parents=True)
    if blocker == "folder":
        (sweep / "natural").write_text("a file where the row's folder should be")
    else:
        (sweep / "natural" / "train.log").mkdir(parents=True)  # the job's log file cannot be opened
    stand_in = fake()
    assert rp.main([f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}", "wandb.log_table=false", "table=table1"]) == 1
    assert [d.name for d in stand_in.run_dirs] == ["aligned"]
    rows = read_csv(tmp_path / "results" / "table1.csv")
    assert [r["status"] for r in rows] == ["failed", "finished"]
    assert ("Error" in rows[0]["error"]) and ("natural" in rows[0]["error"] or "train.log" in rows[0]["error"])
    assert float(rows[1]["segm.AP ours"]) == pytest.approx(30.0)


def test_a_stale_finished_row_is_not_reused(tmp_path, fake, capsys):
    fake()
    smoke = compose(tmp_path, "table=table1", "wandb.log_table=false", "train_overrides=['trainer.max_steps=30']")
    assert [r.steps for r in rp.reproduce(smoke)] == [30, 30]

    # The plain command must not serve the 30-step runs: it trains again into new folders, keeping the old ones.
    stand_in = fake()
    results = rp.reproduce(compose(tmp_path, "table=table1", "wandb.log_table=false"))
    assert [d.name for d in stand_in.run_dirs] == ["natural-v2", "aligned-v2"]
    assert [r.steps for r in results] == [500, 500] and [r.run_dir.name for r in results] == ["natural-v2", "aligned-v2"]
    old = json.loads((tmp_path / "runs" / "mini" / "table1" / "natural" / SUMMARY_FILE).read_text())
    assert old["steps"] == 30  # kept
    # collect_only trains nothing and collects what is there: the 500-step runs' table
    idle = fake()
    collected = rp.reproduce(compose(tmp_path, "table=table1", "wandb.log_table=false", "collect_only=true", "seeds=2"))
    assert idle.calls == [] and [(r.status, r.seeds_finished, r.steps) for r in collected] == [("missing", 1, 500)] * 2
    # Asking for the 30-step runs again finds them; on_stale=stop names the keys instead of training.
    idle = fake()
    assert [r.steps for r in rp.reproduce(smoke)] == [30, 30] and idle.calls == []
    args = [f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}", "wandb.log_table=false", "table=table1",
            "on_stale=stop", "train_overrides=['trainer.max_steps=50']"]
    assert rp.main(args) == 2
    err = capsys.readouterr().err
    assert "trainer.max_steps: 30 -> 50" in err and "on_stale=retrain" in err
    assert idle.calls == []


def test_seeds_train_every_row_per_seed_and_aggregate(tmp_path, fake):
    stand_in = fake()
    results = rp.reproduce(compose(tmp_path, "table=table1", "seeds=3", "wandb.log_table=false"))
    # seed by seed, every training of a seed before the next seed
    assert [d.name for d in stand_in.run_dirs] == ["natural", "aligned", "natural-seed1", "aligned-seed1", "natural-seed2", "aligned-seed2"]
    assert [int(c.seed) for c in stand_in.calls] == [0, 0, 1, 1, 2, 2]
    natural, aligned = results
    # AP = base + 0.01 * seed: mean base + 1 point, sample std 1 point
    assert natural.ours["segm.AP"] == pytest.approx(21.0) and natural.std["segm.AP"] == pytest.approx(1.0)
    assert aligned.ours["segm.AP"] == pytest.approx(31.0) and aligned.seeds_finished == 3
    md = (tmp_path / "results" / "table1.md").read_text()
    assert "| 21.0 ± 1.0 | 28.5 |" in md and "finished (3/3 seeds)" in md
    # aligned - natural: paper +0.4, ours +10.0 > 1.0 + 1.0
    assert "| aligned vs natural | AP | 0.4 | 10.0 | 2.0 | agrees, gap > spread |" in md
    rows = read_csv(tmp_path / "results" / "table1.csv")
    assert rows[0]["segm.AP ours std"] == "1.00" and rows[0]["seeds"] == "3" and rows[0]["seeds finished"] == "3"
    # Run again: every seed's run is found finished with its own config (keys that follow the seed, e.g. data.seed, included).
    idle = fake()
    assert [r.seeds_finished for r in rp.reproduce(compose(tmp_path, "table=table1", "seeds=3", "wandb.log_table=false"))] == [3, 3]
    assert idle.calls == []


def test_rows_selection_and_unknown_names(tmp_path, fake, capsys):
    stand_in = fake()
    results = rp.reproduce(compose(tmp_path, "table=table1", "rows=[aligned]", "wandb.log_table=false"))
    assert [d.name for d in stand_in.run_dirs] == ["aligned"]
    assert [r.status for r in results] == ["missing", "finished"]
    base = [f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}"]
    assert rp.main([*base, "table=table9"]) == 2
    err = capsys.readouterr().err
    assert "table9" in err and "table5" in err  # names the tables there are
    assert rp.main([*base, "table=table1", "rows=[bogus]"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert rp.main(["--help"]) == 0


def test_a_row_whose_config_does_not_compose_fails_alone(tmp_path, fake):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    text = load_table("table1").path.read_text().replace("comparisons:", """  - id: no_such_head
    label: a head that does not exist
    overrides: [model/mask_head=no_such_head]
    paper: {segm: {AP: null}}
    source: this test
comparisons:""", 1)
    (sweeps / "table1.yaml").write_text(text)
    stand_in = fake()
    results = rp.reproduce(compose(tmp_path, "table=table1", f"sweeps_dir={sweeps}", "wandb.log_table=false"))
    assert [r.status for r in results] == ["finished", "finished", "failed"]
    assert "no_such_head" in results[2].error and [d.name for d in stand_in.run_dirs] == ["natural", "aligned"]


def test_dry_run_plan_of_the_real_sweeps(tmp_path, capsys, fake):
    """All 31 paper rows: 21 distinct trainings (docs/reproduce.md lists which rows share), nothing runs."""
    stand_in = fake()
    assert rp.main([f"runs_dir={tmp_path / 'runs'}", "table=all", "scale=paper", "dry_run=true"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "plan: 31 rows, 21 training runs"
    assert stand_in.calls == [] and not (tmp_path / "results").exists()
    text = "\n".join(out)
    block = text[text.index("- table4/tensormask:"):].split("\n- ")[0]
    assert "run folder: table2d/two_windows" in block and "cost: 0 (trained by table2d/two_windows)" in block
    assert "shares its training with: table2d/two_windows, table3/tensormask_r50, table5/box_head_bb_nms" in block
    block = text[text.index("- table2d/two_windows:"):].split("\n- ")[0]
    assert "cost: 540000 steps x 8 devices" in block and "sets: mode=full model/mask_head=bipyramid experiment=r50_6x model.window_sizes=[11,15]" in block
    block = text[text.index("- table5/box_head_mask_bb_nms:"):].split("\n- ")[0]
    assert "evaluated with its inference overrides" in block and "model.nms_boxes=mask-bb" in block
    assert text.count("cost: 540000 steps x 8 devices") + text.count("cost: 180000 steps x 8 devices") == 21


def test_imagenet_weights_reach_every_row_of_a_mixed_table(tmp_path):
    """Table 4 mixes TensorMask and torchvision baselines: every row's training composes with the folder."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from tensormask.framework.validation import validate_config

    for name in ("R-50.pkl", "R-101.pkl", "resnet50-0676ba61.pth", "resnet101-63fe2227.pth"):
        (tmp_path / name).write_bytes(b"")  # the files the rows' backbones read (checked by name only here)
    cfg = compose(tmp_path, "table=table4", "scale=paper", f"imagenet_weights={tmp_path}")
    extra = [a for a in rp.multirun_arguments(cfg) if not a.startswith(("-m", "hydra"))]
    assert extra == [f"++imagenet_weights='{tmp_path}'"]
    sweeper = OmegaConf.load(rp.default_conf_dir() / "hydra" / "sweeper" / "rows.yaml")
    spec = load_table("table4")
    with initialize_config_dir(config_dir=str(rp.default_conf_dir()), version_base="1.3"):
        for row in spec.rows:
            train_cfg = hydra_compose("train", [*spec.job_overrides(row, "paper", list(sweeper.scales.paper)), *extra])
            validate_config(train_cfg)
            assert train_cfg.imagenet_weights == str(tmp_path), row.id
            try:  # the ImageNet guard (issue 11): every row finds its backbone's file in the folder
                from tensormask.framework.pretrained import check_pretrained
            except ImportError:
                continue
            check_pretrained(train_cfg)
            weights = OmegaConf.select(train_cfg, "model.backbone.weights") or OmegaConf.select(train_cfg, "model.weights_backbone")
            assert weights and Path(weights).parent == tmp_path, (row.id, weights)


def test_cluster_jobs_ask_for_what_their_rows_train_on(tmp_path, capsys):
    """scale=paper rows train on 8 GPUs (trainer=ddp): the SLURM launcher's jobs must ask for them."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    assert rp.main([f"runs_dir={tmp_path / 'runs'}", "table=table3", "scale=paper", "dry_run=true", "launcher=slurm"]) == 0
    out = capsys.readouterr().out
    groups = [line for line in out.splitlines() if line.startswith("launch group")]
    assert len(groups) == 1 and groups[0].startswith("launch group of 4 run(s)")
    assert all(f"{k}=8" in groups[0] for k in ("tasks_per_node", "gpus_per_node")) and "nodes=1 " in groups[0]
    assert "SlurmLauncher" in groups[0]


def test_a_results_dir_it_cannot_write_stops_before_any_training(tmp_path, monkeypatch):
    """The tables are written after every training: a results_dir that cannot hold them is refused first,
    naming it (not an OSError hours later)."""
    from tensormask.errors import UserError

    monkeypatch.setattr(rp, "run_multirun", lambda arguments: pytest.fail("trained before checking results_dir"))
    (tmp_path / "file").write_text("x")
    cfg = rp.compose([f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'file' / 'results'}", "table=table1"])
    with pytest.raises(UserError, match=r"results_dir=.*file/results: cannot write"):
        rp.reproduce(cfg)


def test_options_a_user_mistypes_are_refused_or_read_as_meant(tmp_path, monkeypatch, capsys):
    """force=no (the string "no", truthy to Python) would retrain every finished run from scratch: flags
    must be true/false, seeds numbers, before anything runs; rows=natural (one name) is a list of one."""
    from tensormask.errors import UserError

    monkeypatch.setattr(rp, "run_multirun", lambda arguments: pytest.fail("ran despite a bad option"))
    for bad, named in (("force=no", "force='no': must be true or false"),
                       ("dry_run=maybe", "dry_run='maybe': must be true or false"),
                       ("collect_only=1", "collect_only=1: must be true or false"),
                       ("seeds=abc", "seeds='abc': give a number of seeds"),
                       ("seeds=[0,x]", "seeds=[0, 'x']")):
        with pytest.raises(UserError) as info:
            rp.reproduce(compose(tmp_path, "table=table1", bad))
        assert named in str(info.value)
    assert rp.main([f"runs_dir={tmp_path / 'runs'}", "table=table1", "force=no"]) == 2
    assert "force='no'" in capsys.readouterr().err
    monkeypatch.setattr(rp, "run_multirun", lambda arguments: None)
    cfg = compose(tmp_path, "table=table1", "rows=natural", "dry_run=true", "train_overrides='trainer.max_steps=3'")
    rp.reproduce(cfg)
    assert list(cfg.rows) == ["natural"] and list(cfg.train_overrides) == ["trainer.max_steps=3"]
    args = rp.multirun_arguments(cfg)
    assert "hydra.sweeper.rows=['natural']" in args and args[-1] == "trainer.max_steps=3"


def test_the_sweeper_refuses_a_flag_that_is_not_a_bool_and_takes_one_row_name():
    from hydra_plugins.tensormask_rows.rows_sweeper import RowsSweeper

    from tensormask.errors import UserError

    assert RowsSweeper(table="table1", rows="natural").rows == ["natural"]
    for key in ("force", "dry_run"):
        with pytest.raises(UserError, match=f"{key}='no': must be true or false"):
            RowsSweeper(table="table1", **{key: "no"})
