"""The paths new users take first (docs/data.md "Your own data", docs/model.md "ImageNet weights"):
their own COCO files, the paper's recipes (ImageNet weights, the weights guard), data-path checks
before anything heavy, schedules that scale with trainer.max_steps, predict with a COCO file's ids."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from omegaconf import OmegaConf

from framework_helpers import TINY_MODEL, TINY_RUN, assert_same_records, compose_config
from tensormask.errors import UserError
from tensormask.framework.data_config import resolve_classes
from tensormask.framework.pretrained import check_pretrained
from tensormask.framework.resolvers import available_cpus
from tensormask.framework.validation import validate_config
from tensormask.predict import predict
from tensormask.train import train

REPO = Path(__file__).resolve().parents[2]


# -- a user's own COCO files ---------------------------------------------------------------------
def write_own_coco(root: Path, num_images: int = 4, size: int = 64, first_id: int = 100) -> dict[str, Path]:
    """A tiny COCO data set as other tools write them: a 'background' category (id 0) that no
    annotation uses, image ids that are not 0..N-1, relative and absolute file names."""
    rng = np.random.default_rng(0)
    paths = {}
    for split, offset in (("train", 0), ("val", 50)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(num_images):
            image_id = first_id + offset + 7 * i
            pic = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw = ImageDraw.Draw(pic)
            masks = []
            for k, category in enumerate((1, 2)):
                x0, y0 = 4 + 30 * k, 6 + int(rng.integers(0, 20))
                box = [x0, y0, x0 + 24, y0 + 24]
                mask = Image.new("L", (size, size), 0)
                if category == 1:
                    draw.ellipse(box, fill=(230, 60, 60))
                    ImageDraw.Draw(mask).ellipse(box, fill=1)
                else:
                    draw.rectangle(box, fill=(60, 230, 60))
                    ImageDraw.Draw(mask).rectangle(box, fill=1)
                masks.append((category, np.asarray(mask, dtype=np.uint8)))
            name = f"img_{image_id}.png"
            pic.save(folder / name)
            # every other image is listed by its absolute path
            file_name = str((folder / name).resolve()) if i % 2 else name
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for category, mask in masks:
                rle = mask_util.encode(np.asfortranarray(mask))
                bbox = [float(v) for v in mask_util.toBbox(rle)]
                anns.append({"id": len(anns) + 1 + 1000 * offset, "image_id": image_id, "category_id": category,
                             "segmentation": {"size": [size, size], "counts": rle["counts"].decode()},
                             "bbox": bbox, "area": float(mask.sum()), "iscrowd": 0})
        cats = [{"id": 0, "name": "background"}, {"id": 1, "name": "disc"}, {"id": 2, "name": "block"}]
        ann_file = root / f"{split}.json"
        ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        paths[f"{split}_images"], paths[f"{split}_annotations"] = folder, ann_file
    return paths


def own_data_overrides(paths: dict[str, Path], size: int = 64) -> list[str]:
    """The documented command's data options (docs/data.md "Your own data")."""
    return ["data=coco", *(f"data.{k}={v}" for k, v in paths.items()), f"data.min_size={size}", f"data.max_size={size}"]


def test_own_coco_data_trains_evaluates_and_predicts_with_the_files_ids(tmp_path, caplog, capsys):
    paths = write_own_coco(tmp_path / "mydata")
    run_dir = tmp_path / "run"
    # a score threshold under the untrained prior (0.01), so that the 2-step model detects something
    cfg = compose_config("train", [*own_data_overrides(paths), *TINY_MODEL, *TINY_RUN, "data.global_batch_size=2",
                                   "data.num_workers=0", "model.score_threshold=0.005"], run_dir)
    assert cfg.data.num_classes is None and "synthetic" not in cfg.data
    with caplog.at_level(logging.WARNING, logger="tensormask.framework.data_config"):
        metrics, objects = train(cfg)
    # classes from the file: 'background' (id 0) is used by no annotation, reported by name, left out
    assert objects["cfg"].data.num_classes == 2 and list(objects["cfg"].data.category_ids) == [1, 2]
    assert "'background' (id 0)" in caplog.text and "left out" in caplog.text
    dm = objects["datamodule"]
    assert dm.val_dataset.contiguous_to_coco == [1, 2] and dm.val_dataset.class_names == ["disc", "block"]
    assert dm.train_dataset.image_ids == [100, 107, 114, 121]
    assert dm.test_transforms == {"min_size": 64, "max_size": 64}
    assert set(metrics) == {"bbox", "segm"}
    # the predict command printed at the end names the annotation file too: the file's image ids
    (command,) = [line for line in capsys.readouterr().out.splitlines() if "tensormask.predict" in line]
    assert command.endswith(f"input={paths['val_images']} annotations={paths['val_annotations']}")

    # predict on the val images given their annotation file: its image ids; COCOeval takes the JSON
    out = tmp_path / "predict"
    pcfg = compose_config("predict", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                                      f"input={paths['val_images']}", f"annotations={paths['val_annotations']}"], out)
    results, _ = predict(pcfg)
    assert results and {r["image_id"] for r in results} <= {150, 157, 164, 171}
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == [150, 157, 164, 171]
    # record by record the detections the run's own evaluation wrote for these images
    assert_same_records(json.loads((out / "predictions.json").read_text()),
                        json.loads((run_dir / "eval" / "coco_instances_results.json").read_text()))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(paths["val_annotations"]))
        dt = gt.loadRes(str(out / "predictions.json"))
        for iou_type, task in (("bbox", "bbox"), ("segm", "segm")):
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            # the same numbers as the run's own evaluation of the same checkpoint on the same images
            assert ev.stats[0] == pytest.approx(metrics[task]["AP"], abs=1e-9)
            assert ev.stats[1] == pytest.approx(metrics[task]["AP50"], abs=1e-9)


def test_eval_takes_the_runs_data_keys_on_the_command_line(tmp_path, monkeypatch, capsys):
    # a run trained on one's own files, evaluated on another annotation file (a test split, or the
    # data set moved): `tensormask-eval ckpt_path=<run> data.val_annotations=...`, as in training
    # (docs/framework.md "Evaluate"); a misspelt key is still an error naming it
    import tensormask.evaluate as evaluate_module
    from hydra.core.global_hydra import GlobalHydra

    paths = write_own_coco(tmp_path / "mydata", num_images=2)
    run_dir = tmp_path / "run"
    train(compose_config("train", [*own_data_overrides(paths), f"data.root={tmp_path / 'mydata'}", *TINY_MODEL,
                                   *TINY_RUN, "evaluate=false", "data.global_batch_size=2", "data.num_workers=0"],
                         run_dir))
    test_file = tmp_path / "test.json"
    val = json.loads(paths["val_annotations"].read_text())
    test_file.write_text(json.dumps({**val, "images": val["images"][1:],
                                     "annotations": [a for a in val["annotations"] if a["image_id"] != 150]}))
    monkeypatch.setenv("TENSORMASK_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for key, code in (("data.val_annotations", None), ("data.val_annotation", 2)):
        monkeypatch.setattr(sys, "argv", ["tensormask-eval", f"ckpt_path={run_dir}", f"{key}={test_file}",
                                          "data.num_workers=0", "model.score_threshold=0.005"])
        GlobalHydra.instance().clear()
        if code is None:
            evaluate_module.main()
        else:
            with pytest.raises(SystemExit) as info:
                evaluate_module.main()
            assert info.value.code == code
        GlobalHydra.instance().clear()
    (metrics,) = (tmp_path / "outputs" / "eval").rglob("metrics.json")
    (first_results,) = (tmp_path / "outputs" / "eval").rglob("coco_instances_results.json")
    assert {r["image_id"] for r in json.loads(first_results.read_text())} == {157}  # the test file's one image
    assert any(f"data.val_annotations={test_file}" in o for o in json.loads(metrics.read_text())["overrides"])
    assert "unknown config key 'data.val_annotation'; did you mean 'data.val_annotations'" in capsys.readouterr().err

    # the data set moved: data.root=<its new folder> moves the run's paths under it
    import shutil

    shutil.copytree(tmp_path / "mydata", tmp_path / "moved")
    shutil.rmtree(tmp_path / "mydata")
    moved_val = tmp_path / "moved" / "val.json"
    val["images"] = [{**i, "file_name": Path(i["file_name"]).name} for i in val["images"]]
    moved_val.write_text(json.dumps(val))
    monkeypatch.setattr(sys, "argv", ["tensormask-eval", f"ckpt_path={run_dir}", f"data.root={tmp_path / 'moved'}",
                                      "data.num_workers=0", "model.score_threshold=0.005"])
    GlobalHydra.instance().clear()
    evaluate_module.main()
    GlobalHydra.instance().clear()
    (results,) = set((tmp_path / "outputs" / "eval").rglob("coco_instances_results.json")) - {first_results}
    assert {r["image_id"] for r in json.loads(results.read_text())} == {150, 157}


def test_classes_from_the_annotation_file(tmp_path):
    paths = write_own_coco(tmp_path, num_images=1)
    cfg = compose_config("train", own_data_overrides(paths))
    assert resolve_classes(cfg.data, paths["train_annotations"]) == (2, [1, 2])
    # data.num_classes counting every category of the file keeps the unused one (with a warning)
    cfg.data.num_classes = 3
    assert resolve_classes(cfg.data, paths["train_annotations"]) == (3, [0, 1, 2])
    cfg.data.num_classes = 5
    with pytest.raises(UserError, match=r"data.num_classes=5 but .*train.json has 2 categories in use.*'background'"):
        resolve_classes(cfg.data, paths["train_annotations"])


def test_choosing_coco_carries_none_of_the_synthetic_settings():
    """data=coco under the default experiment (the quickstart's recipe): COCO's classes and sizes,
    no synthetic generator; the recipe (schedule, optimizer, loss tweaks) still applies."""
    cfg = compose_config("train", ["data=coco"])
    assert "synthetic" not in cfg.data and cfg.data.num_classes is None
    assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333)
    assert list(cfg.data.train_transforms.min_size) == [800] and cfg.data.test_transforms.max_size == 1333
    assert cfg.trainer.max_steps == 2600 and cfg.model.focal_gamma == 1.5 and cfg.data.global_batch_size == 4
    text = (REPO / "conf" / "experiment" / "quickstart.yaml").read_text()
    assert "\ndata:" not in text, "the quickstart recipe must not set data options"
    # the one size pair sets both transforms
    cfg = compose_config("train", ["data=coco", "data.min_size=512", "data.max_size=640"])
    assert list(cfg.data.train_transforms.min_size) == [512] and cfg.data.train_transforms.max_size == 640
    assert (cfg.data.test_transforms.min_size, cfg.data.test_transforms.max_size) == (512, 640)


def test_the_main_job_trains_as_before():
    """`tensormask-train` with no arguments: the values the quickstart was measured with
    (docs/framework.md), read from the composed config."""
    cfg = compose_config("train")
    syn = cfg.data.synthetic
    assert cfg.data.num_classes == 3 and syn.num_classes == 3
    assert (syn.num_train, syn.num_val, syn.image_size, syn.min_objects, syn.max_objects) == (2048, 128, 128, 2, 5)
    assert (syn.min_object_size, syn.max_object_size, syn.size_jitter, syn.mask_format) == (32, None, 0.25, "mixed")
    assert list(cfg.data.train_transforms.min_size) == [128] and cfg.data.train_transforms.max_size == 128
    assert (cfg.data.test_transforms.min_size, cfg.data.test_transforms.max_size) == (128, 128)
    assert (cfg.data.global_batch_size, cfg.data.eval_batch_size, cfg.data.num_workers) == (4, 2, 0)
    assert cfg.trainer.max_steps == 2600 and cfg.trainer.gradient_clip_val == 2.0
    assert (cfg.module.base_lr, cfg.module.base_batch_size, cfg.module.warmup_steps) == (0.003, 4, 50)
    assert list(cfg.module.milestones) == [2200, 2450] and cfg.module.optimizer._target_ == "torch.optim.AdamW"
    assert (cfg.model.spatial_thresh, cfg.model.focal_gamma, cfg.model.focal_shift) == (2.0, 1.5, 1.0)
    assert cfg.model.backbone.depth == 18 and cfg.model.backbone.weights is None and cfg.module.channels_last


@pytest.mark.parametrize("schedule,max_steps,milestones,warmup", [
    ("quickstart", 2600, [2200, 2450], 50),
    ("quickstart", 1300, [1100, 1225], 25),
    ("quick", 1000, [800], 100),
    ("1x", 90000, [60000, 80000], 1000),
    ("1x", 180000, [120000, 160000], 1000),  # 2x: the warm-up stays detectron2's 1000
    ("1x", 9000, [6000, 8000], 100),
    ("6x", 540000, [480000, 520000], 1000),
])
def test_schedules_scale_with_max_steps(schedule, max_steps, milestones, warmup):
    cfg = compose_config("train", ["~experiment", f"schedule={schedule}", f"trainer.max_steps={max_steps}"])
    validate_config(cfg)
    assert list(cfg.module.milestones) == milestones and cfg.module.warmup_steps == warmup


def test_loader_workers_default_to_the_machine():
    cfg = compose_config("train", ["data=coco"])
    assert cfg.data.num_workers == min(4, available_cpus())


# -- paths checked before anything heavy ----------------------------------------------------------
def test_missing_data_path_ends_the_run_before_anything_heavy(tmp_path, monkeypatch):
    import tensormask.train as train_module

    def heavy(*args, **kwargs):
        raise AssertionError("the model was built before the data paths were checked")

    monkeypatch.setattr(train_module, "build_model", heavy)
    cfg = compose_config("train", ["data=coco", "data.root=/nonexistent/mydata"], tmp_path)
    with pytest.raises(UserError, match=r"^image folder not found: /nonexistent/mydata/train2017 "
                                        r"\(data.train_images, set from data.root=/nonexistent/mydata\)$"):
        train(cfg)
    paths = write_own_coco(tmp_path / "d", num_images=1)
    cfg = compose_config("train", [*own_data_overrides(paths), f"data.val_annotations={tmp_path / 'nope.json'}"],
                         tmp_path)
    with pytest.raises(UserError, match=r"annotation file not found: .*nope.json \(data.val_annotations\)"):
        train(cfg)


def test_missing_data_path_exits_non_zero(tmp_path):
    env = {"PYTHONPATH": str(REPO / "src"), "TENSORMASK_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "tensormask.train", "data=coco", "data.root=/nonexistent/mydata",
                           "data.num_classes=5", "debug=fast_dev_run", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "/nonexistent/mydata/train2017" in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()  # no synthetic data set was written


# -- ImageNet weights -----------------------------------------------------------------------------
def test_frozen_recipe_without_weights_refuses_to_start(tmp_path):
    cfg = compose_config("train", ["experiment=r50_1x", "trainer=cpu", "data.root=/nonexistent/coco"], tmp_path)
    with pytest.raises(UserError, match=r"model.backbone.norm=FrozenBN and model.backbone.freeze_at=2 need ImageNet "
                                        r"weights.*imagenet_weights=<folder with R-50.pkl>.*allow_random_init=true"):
        train(cfg)
    for model in ("maskrcnn", "retinanet"):
        cfg = compose_config("train", [f"model={model}"], tmp_path)
        with pytest.raises(UserError, match=r"model.norm=FrozenBN and model.trainable_layers=3 need ImageNet weights"):
            check_pretrained(cfg)
    # the explicit opt-in: the run goes on (to the data check here)
    cfg = compose_config("train", ["experiment=r50_1x", "trainer=cpu", "data.root=/nonexistent/coco", "allow_random_init=true"],
                         tmp_path)
    with pytest.raises(UserError, match="image folder not found"):
        train(cfg)
    # from-scratch designs (GroupNorm, nothing frozen) need no weights
    check_pretrained(compose_config("train", [], tmp_path))
    check_pretrained(compose_config("train", ["model=maskrcnn", "model.norm=GN", "model.trainable_layers=5"], tmp_path))


def _weights_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("R-50.pkl", "R-101.pkl", "resnet50-0676ba61.pth", "resnet101-63fe2227.pth"):
        (folder / name).write_bytes(b"")  # only their presence is checked here
    return folder


def test_one_option_gives_every_row_of_a_mixed_table_its_weights(tmp_path):
    """table4 mixes TensorMask rows (MSRA R-50.pkl) and torchvision baselines (resnet50-*.pth):
    `imagenet_weights=<folder>` composes for every row and gives each its file."""
    from hydra import compose, initialize_config_dir

    from tensormask import reproduce as rp
    from tensormask.tables import load_table

    folder = _weights_folder(tmp_path / "imagenet")
    base = list(OmegaConf.load(rp.default_conf_dir() / "hydra" / "sweeper" / "rows.yaml").scales.paper)
    spec = load_table("table4")
    found = {}
    with initialize_config_dir(config_dir=str(rp.default_conf_dir()), version_base="1.3"):
        for row in spec.rows:
            train_cfg = compose(config_name="train",
                                overrides=[*spec.job_overrides(row, "paper", base), f"imagenet_weights={folder}"])
            check_pretrained(train_cfg)
            model = train_cfg.model
            found[row.id] = Path(model.weights_backbone if "weights_backbone" in model else model.backbone.weights).name
    assert found == {"retinanet_24ep": "resnet50-0676ba61.pth", "retinanet_72ep": "resnet50-0676ba61.pth",
                     "fasterrcnn": "resnet50-0676ba61.pth", "maskrcnn": "resnet50-0676ba61.pth",
                     "tensormask_box_only": "R-50.pkl", "tensormask": "R-50.pkl"}
    r101 = compose_config("train", ["experiment=r101_6x", f"imagenet_weights={folder}"])
    assert Path(r101.model.backbone.weights).name == "R-101.pkl"
    # a folder without the file a row needs: one line naming the file and the option
    (folder / "R-101.pkl").unlink()
    with pytest.raises(UserError, match=r"^imagenet_weights=.*imagenet: no R-101.pkl there"):
        check_pretrained(compose_config("train", ["experiment=r101_6x", f"imagenet_weights={folder}"]))
    with pytest.raises(UserError, match=r"^imagenet_weights=/no/such/dir: no such folder"):
        check_pretrained(compose_config("train", ["experiment=r50_1x", "imagenet_weights=/no/such/dir"]))


def test_baseline_loads_torchvision_weights_from_the_folder(tmp_path):
    import torchvision

    from tensormask.framework.builders import build_model

    folder = tmp_path / "imagenet"
    folder.mkdir()
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), folder / "resnet18-f37072fd.pth")
    cfg = compose_config("train", ["model=maskrcnn", "model.depth=18", f"imagenet_weights={folder}"])
    check_pretrained(cfg)
    model = build_model(cfg)
    body = model.detector.backbone.body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
