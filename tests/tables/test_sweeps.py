"""Every sweep file: its paper numbers, its jobs (how many, which overrides), and that every job's
training config composes against the real conf/ at both scales and passes validation."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tensormask import reproduce as rp
from tensormask.framework.validation import validate_config
from tensormask.tables import SCALES, TABLES, list_tables, load_table

# table -> row id -> the overrides that make the row what it is (beyond the table's shared ones)
EXPECTED_ROWS = {
    "table1": {
        "natural": ["model/mask_head=natural"],
        "aligned": ["model/mask_head=aligned"],
    },
    "table2a": {
        f"{rep}_lambda{lam}": [f"model/mask_head=upscale_{rep}", f"model.mask_head.lambda_val={lam}"]
        for lam in ("1.5", "3", "5")
        for rep in ("natural", "aligned")
    },
    "table2b": {
        f"{interp}_lambda{lam}": [f"model.mask_head.interpolation={interp}", f"model.mask_head.lambda_val={lam}"]
        for lam in ("1.5", "3", "5")
        for interp in ("bilinear", "nearest")
    },
    "table2c": {
        "feature_pyramid": ["model/mask_head=aligned"],
        "tensor_bipyramid": ["model/mask_head=bipyramid"],
    },
    "table2d": {
        "one_window": ["model.window_sizes=[15]"],
        "two_windows": ["model.window_sizes=[11,15]"],
    },
    "table3": {
        "maskrcnn_r50": ["model=maskrcnn"],
        "tensormask_r50": ["mode=full"],
        "maskrcnn_r101": ["model=maskrcnn"],
        "tensormask_r101": ["mode=full"],
    },
    "table4": {
        "retinanet_24ep": ["model=retinanet"],
        "retinanet_72ep": ["model=retinanet"],
        "fasterrcnn": ["model=fasterrcnn"],
        "maskrcnn": ["model=maskrcnn"],
        "tensormask_box_only": ["mode=box_only"],
        "tensormask": ["mode=full"],
    },
    "table5": {  # NMS boxes act at inference only: the row's `inference` overrides
        "box_head_bb_nms": ["mode=full", "model.nms_boxes=bb"],
        "box_head_mask_bb_nms": ["mode=full", "model.nms_boxes=mask-bb"],
        "no_box_head_mask_bb_nms": ["mode=mask_only", "model.nms_boxes=mask-bb"],
    },
}

# Paper numbers spot-checked against the paper's Tables 1-3 and its appendix (Tables 4, 5).
PAPER_SPOT_CHECKS = [
    ("table1", "natural", "segm.AP", 28.5),
    ("table2a", "natural_lambda5", "segm.AP", 19.2),
    ("table2a", "aligned_lambda5", "segm.AP", 28.4),
    ("table2b", "nearest_lambda5", "segm.AP", 25.3),
    ("table2c", "tensor_bipyramid", "segm.APl", 48.4),
    ("table2c", "feature_pyramid", "segm.AP50", 52.5),
    ("table2d", "two_windows", "segm.AP", 35.2),
    ("table3", "tensormask_r101", "segm.AP75", 39.4),
    ("table3", "maskrcnn_r50", "segm.AP", 36.8),
    ("table3", "maskrcnn_r50", "segm.AP50", 59.2),
    ("table3", "maskrcnn_r101", "segm.APl", 54.1),
    ("table4", "retinanet_24ep", "bbox.AP", 37.1),
    ("table4", "tensormask_box_only", "bbox.AP75", 43.9),
    ("table4", "maskrcnn", "bbox.AP50", 62.5),
    ("table5", "no_box_head_mask_bb_nms", "bbox.AP", 39.4),
    ("table5", "box_head_mask_bb_nms", "segm.AP50", 56.0),
]


def test_there_is_one_sweep_file_per_paper_table():
    assert list_tables() == list(TABLES)
    assert set(EXPECTED_ROWS) == set(TABLES)


@pytest.mark.parametrize("table", TABLES)
def test_rows_and_their_overrides(table):
    spec = load_table(table)
    expected = EXPECTED_ROWS[table]
    assert [r.id for r in spec.rows] == list(expected)
    for scale in SCALES:
        jobs = {r.id: [*o, *spec.row(r.id).inference] for r, o in zip(spec.rows, spec.jobs(scale).values())}
        assert len(jobs) == len(expected)
        for row_id, overrides in jobs.items():
            assert set(expected[row_id]) <= set(overrides), (table, row_id, scale)
        # rows differ from each other, in training or at inference
        assert len({tuple(o) for o in jobs.values()}) == len(jobs)
    for row in spec.rows:
        assert all(o.startswith("model.nms_boxes=") for o in row.inference), "only inference keys in `inference`"
    for row in spec.rows:
        assert row.source, f"{table}/{row.id} needs the source of its paper numbers"
        for column in spec.columns:
            value = row.paper_value(column)
            assert value is None or 0 < value < 100


@pytest.mark.parametrize("table,row,column,value", PAPER_SPOT_CHECKS)
def test_paper_numbers(table, row, column, value):
    spec = load_table(table)
    assert spec.row(row).paper[column] == value


def _compose_rows(table: str, scale: str):
    """Every row's evaluated config: the scale's base (conf/hydra/sweeper/rows.yaml), the row's training
    overrides and its inference overrides, with the bookkeeping the rows sweeper adds."""
    base = list(OmegaConf.load(rp.default_conf_dir() / "hydra" / "sweeper" / "rows.yaml").scales[scale])
    spec = load_table(table)
    with initialize_config_dir(config_dir=str(rp.default_conf_dir()), version_base="1.3"):
        for row in spec.rows:
            overrides = [*spec.job_overrides(row, scale, base), *row.inference, f"group={table}",
                         f"tags=[reproduce,{table},{row.id},{scale}]"]
            yield row.id, compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("table", TABLES)
def test_every_job_composes_against_the_training_config(table, scale):
    composed = dict(_compose_rows(table, scale))
    assert list(composed) == list(EXPECTED_ROWS[table])
    for row_id, train_cfg in composed.items():
        validate_config(train_cfg)
        assert train_cfg.group == table
        assert list(train_cfg.tags) == ["reproduce", table, row_id, scale]
        assert train_cfg.data.get("synthetic") is not None if scale == "mini" else "coco" in train_cfg.data.val_annotations
        OmegaConf.to_container(train_cfg.model, resolve=True)  # every interpolation of the model resolves


def _target(cfg, key):
    return OmegaConf.select(cfg, key)


def test_composed_values_are_the_rows_design():
    """What each ablation row actually changes, read back from the composed training config."""
    t1 = dict(_compose_rows("table1", "paper"))
    assert _target(t1["natural"], "model.mask_head._target_").endswith("SimpleNaturalMaskHead")
    assert _target(t1["aligned"], "model.mask_head._target_").endswith("SimpleAlignedMaskHead")
    assert list(t1["natural"].model.window_sizes) == [15]
    assert t1["natural"].model.backbone.depth == 50  # the row's head wins over the experiment's default head

    t2a = dict(_compose_rows("table2a", "mini"))
    assert t2a["natural_lambda1.5"].model.mask_head.lambda_val == 1.5
    assert _target(t2a["aligned_lambda5"], "model.mask_head._target_").endswith("UpscalingAlignedMaskHead")
    t2b = dict(_compose_rows("table2b", "mini"))
    assert t2b["nearest_lambda3"].model.mask_head.interpolation == "nearest"
    assert t2b["bilinear_lambda3"].model.mask_head.interpolation == "bilinear"
    t2d = dict(_compose_rows("table2d", "paper"))
    assert list(t2d["two_windows"].model.window_sizes) == [11, 15]
    assert _target(t2d["one_window"], "model.mask_head._target_").endswith("BipyramidMaskHead")
    t5 = dict(_compose_rows("table5", "paper"))
    assert [t5[r].model.box_head for r in t5] == [True, True, False]  # mode=mask_only: no box head
    assert [t5[r].model.nms_boxes for r in t5] == ["bb", "mask-bb", "mask-bb"]

    t3 = dict(_compose_rows("table3", "paper"))
    assert [t3[r].model.backbone.depth if "backbone" in t3[r].model else t3[r].model.depth for r in t3] == [50, 50, 101, 101]
    assert _target(t3["maskrcnn_r101"], "model._target_").endswith("MaskRCNNBaseline")
    assert all(t3[r].trainer.max_steps == 540000 and list(t3[r].data.train_transforms.min_size) == [640, 800] for r in t3)
    t4 = dict(_compose_rows("table4", "paper"))
    assert t4["retinanet_24ep"].trainer.max_steps == 180000 and list(t4["retinanet_24ep"].data.train_transforms.min_size) == [800]
    assert t4["retinanet_72ep"].trainer.max_steps == 540000
    # RetinaNet's base LR is detectron2's Base-RetinaNet.yaml 0.01; the other rows keep the schedule's 0.02
    assert [t4[r].module.base_lr for r in t4] == [0.01, 0.01, 0.02, 0.02, 0.02, 0.02]
    assert [t4[r].data.global_batch_size for r in t4] == [16] * 6
    assert t4["tensormask_box_only"].model.mask_head is None and t4["tensormask"].model.mask_head is not None
    t4_mini = dict(_compose_rows("table4", "mini"))
    assert t4_mini["retinanet_24ep"].trainer.max_steps == round(t4_mini["retinanet_72ep"].trainer.max_steps / 3)


@pytest.mark.parametrize("table", ["table2a", "table2b"])
def test_mini_rows_build_their_model(table):
    """The upscaling heads need 15 / lambda cells to be whole: build every mini row's model."""
    from tensormask.framework.builders import build_model

    for row_id, train_cfg in _compose_rows(table, "mini"):
        model = build_model(train_cfg)
        assert sum(p.numel() for p in model.parameters()) > 0, row_id


def test_tuning_the_quickstart_does_not_change_the_mini_trainings(tmp_path):
    """scale=mini composes its own recipe (experiment/tables_mini.yaml): edits of the quickstart's files
    (its experiment, schedule and the synthetic data's defaults) leave every mini training config as it
    was, so finished mini runs stay valid (the stale check compares these configs)."""
    import shutil

    from tensormask.tables.plan import differences, training_key

    conf = tmp_path / "conf"
    shutil.copytree(rp.default_conf_dir(), conf)
    (conf / "experiment" / "quickstart.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: synthetic\n  - override /schedule: quickstart\n"
        "trainer:\n  gradient_clip_val: 9.0\nmodel:\n  focal_gamma: 2.5\n  spatial_thresh: 1.0\n  focal_shift: 0.0\n"
        "module:\n  channels_last: false\n")
    (conf / "schedule" / "quickstart.yaml").write_text(
        "# @package _global_\ndata:\n  global_batch_size: 8\ntrainer:\n  max_steps: 900\nmodule:\n  base_lr: 0.01\n"
        "  milestones: [700]\n  warmup_steps: 10\n")
    synthetic = OmegaConf.load(conf / "data" / "synthetic.yaml")
    synthetic.synthetic.num_train = 512
    synthetic.synthetic.image_size = 96
    synthetic.synthetic.max_objects = 3
    synthetic.min_size = 96
    synthetic.max_val_images = 16
    OmegaConf.save(synthetic, conf / "data" / "synthetic.yaml")

    def keys(conf_dir):
        base = list(OmegaConf.load(conf_dir / "hydra" / "sweeper" / "rows.yaml").scales["mini"])
        out = {}
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            for table in ("table1", "table2d", "table5"):
                spec = load_table(table)
                for row in spec.rows:
                    out[f"{table}/{row.id}"] = training_key(compose(config_name="train", overrides=spec.job_overrides(row, "mini", base)))
        return out

    ours, tuned = keys(rp.default_conf_dir()), keys(conf)
    assert {row: differences(ours[row], tuned[row]) for row in ours} == {row: [] for row in ours}
    # the copy's edits took effect where they should: the quickstart itself changed
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose(config_name="train").trainer.max_steps == 900
    assert ours["table2d/two_windows"]["trainer"]["max_steps"] == 500
