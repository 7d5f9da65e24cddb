"""tensormask-eval and tensormask-predict on the checkpoint of a tiny training run whose model detects
(the session's `detecting_run`, conftest.py): equal metrics and records are equal real detections."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from framework_helpers import DETECTING_MIN_AP, DETECTING_STEPS, TINY_DATA, assert_same_records, compose_config
from tensormask.evaluate import evaluate
from tensormask.framework.checkpoint_io import strict_json
from tensormask.predict import predict


def test_eval_rebuilds_the_run_and_reproduces_its_metrics(detecting_run, tmp_path):
    run_dir, train_metrics, _ = detecting_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    cfg = compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "eval")
    metrics, objects = evaluate(cfg)
    # the model and the data come from the run's config.yaml, not from eval.yaml's defaults
    assert objects["cfg"].model.backbone.out_channels == 16
    assert objects["cfg"].data.synthetic.image_size == 64
    assert metrics.keys() == train_metrics.keys() == {"bbox", "segm"}
    for task in metrics:
        for k, v in train_metrics[task].items():
            assert metrics[task][k] == pytest.approx(v, abs=1e-9, nan_ok=True), (task, k)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == strict_json(metrics)  # strict JSON: a NaN (no objects of a size) is null
    assert saved["step"] == DETECTING_STEPS
    for task, least in DETECTING_MIN_AP.items():
        assert metrics[task]["AP"] > least  # the run's weights, not a fresh model's
    # the same detections, record by record, as the run's own final evaluation
    assert_same_records(json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text()),
                        json.loads((run_dir / "eval" / "coco_instances_results.json").read_text()))


def test_predict_on_the_run_s_images_gives_its_detections(detecting_run, tmp_path):
    """tensormask-predict on the image folder of the run's evaluated split, with its annotation file
    (the same image ids), writes the records the run's evaluation wrote: same pixels in (an RGB/BGR
    mix-up, another resize or normalisation changes them), same weights, same decoding."""
    run_dir, _, objects = detecting_run
    dataset = objects["datamodule"].val_dataset
    cfg = compose_config("predict", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"input={dataset.image_dir}",
                                     f"annotations={dataset.annotation_file}"], tmp_path / "out")
    results, _ = predict(cfg)
    assert_same_records(json.loads((tmp_path / "out" / "predictions.json").read_text()),
                        json.loads((run_dir / "eval" / "coco_instances_results.json").read_text()))


def test_eval_missing_checkpoint(tmp_path):
    cfg = compose_config("eval", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        evaluate(cfg)


def test_predict_writes_pictures_and_coco_results(detecting_run, tmp_path):
    run_dir, _, objects = detecting_run
    dataset = objects["datamodule"].val_dataset
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        array = dataset.load_image(0 if name == "a" else 1).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(images / f"{name}.png")
    cfg = compose_config("predict", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"input={images}",
                                     "draw_score_threshold=0.0"], tmp_path / "out")
    results, _ = predict(cfg)
    assert sorted(p.name for p in (tmp_path / "out" / "pictures").iterdir()) == ["a.png", "b.png"]
    with Image.open(tmp_path / "out" / "pictures" / "a.png") as picture:
        assert picture.size == Image.open(images / "a.png").size
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert written == json.loads(json.dumps(results)) and {r["image_id"] for r in written} == {0, 1}
    for r in written:
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r)
        assert r["image_id"] in (0, 1) and r["category_id"] in dataset.contiguous_to_coco
    index = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [i["file_name"].split("/")[-1] for i in index["images"]] == ["a.png", "b.png"]
    assert [c["name"] for c in index["categories"]] == dataset.class_names


def test_predict_skips_and_names_unreadable_files_and_reads_every_suffix(detecting_run, tmp_path, capsys, caplog):
    run_dir, _, objects = detecting_run
    array = objects["datamodule"].val_dataset.load_image(0).permute(1, 2, 0).numpy()
    images = tmp_path / "images"
    images.mkdir()
    for suffix in (".bmp", ".tif", ".png", ".jpg"):
        Image.fromarray(array).save(images / f"good_{suffix[1:]}{suffix}")
    (images / "notes.png").write_text("a text file named .png")
    (images / "empty.jpg").write_bytes(b"")
    cfg = compose_config("predict", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"input={images}",
                                     "draw_score_threshold=0.0", "batch_size=2"], tmp_path / "out")
    results, objects = predict(cfg)
    pictures = sorted(p.name for p in (tmp_path / "out" / "pictures").iterdir())
    assert pictures == ["good_bmp.png", "good_jpg.png", "good_png.png", "good_tif.png"]
    for name in pictures:
        with Image.open(tmp_path / "out" / "pictures" / name) as picture:
            assert picture.size == (array.shape[1], array.shape[0])
    index = json.loads((tmp_path / "out" / "images.json").read_text())
    skipped = {s["file_name"].split("/")[-1]: s["error"] for s in index["skipped"]}
    assert skipped.keys() == {"notes.png", "empty.jpg"}
    assert "notes.png" in skipped["notes.png"] and "empty.jpg" in skipped["empty.jpg"]
    names = [i["file_name"].split("/")[-1] for i in index["images"]]
    assert {names[r["image_id"]] for r in results} <= {"good_bmp.bmp", "good_tif.tif", "good_png.png", "good_jpg.jpg"}
    out = capsys.readouterr().out
    assert "4 image(s)" in out and "skipped 2 unreadable" in out and "notes.png" in out and "empty.jpg" in out
    assert any("notes.png" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # the run went through Lightning's predict loop and the module's predict_step
    assert objects["trainer"].predicting is False and objects["trainer"].state.fn == "predict"


def test_predict_all_unreadable_is_a_named_error(detecting_run, tmp_path):
    from tensormask.errors import UserError

    run_dir, _, _ = detecting_run
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_text("text")
    cfg = compose_config("predict", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"input={images}"],
                         tmp_path / "out")
    with pytest.raises(UserError, match=r"none of the 1 image file\(s\) could be read .*a\.png"):
        predict(cfg)


def test_lightning_moves_a_batch_record_to_the_device():
    """No hand-written transfer_batch_to_device: Lightning's collection handling moves `Batch` dataclasses."""
    import torch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from tensormask.framework.lit_module import DetectionLitModule
    from tensormask.structures import Batch

    assert "transfer_batch_to_device" not in DetectionLitModule.__dict__
    batch = Batch(images=torch.zeros(1, 3, 8, 8), image_sizes=[(8, 8)], orig_sizes=[(16, 16)], image_ids=[7],
                  targets=[{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, Batch) and moved.images.device.type == "meta"
    assert moved.targets[0]["boxes"].device.type == "meta" and moved.targets[0]["labels"].device.type == "meta"
    assert moved.image_sizes == [(8, 8)] and moved.orig_sizes == [(16, 16)] and moved.image_ids == [7]
    assert batch.images.device.type == "cpu"


def test_predict_sends_pictures_with_overlays_to_wandb(detecting_run, tmp_path, monkeypatch):
    """`tensormask-predict logger=wandb`: the pictures go to an offline W&B run as images with the
    detections as mask and box overlays, captioned with their file names."""
    import numpy as np

    from wandb_records import wait_for

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    run_dir, _, objects = detecting_run
    images = tmp_path / "images"
    images.mkdir()
    for name, index in (("a", 0), ("b", 1)):
        Image.fromarray(objects["datamodule"].val_dataset.load_image(index).permute(1, 2, 0).numpy()).save(
            images / f"{name}.png")
    cfg = compose_config("predict", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"input={images}",
                                     "draw_score_threshold=0.0", "logger=wandb", "logger.wandb.mode=offline"],
                         tmp_path / "out")
    results, _ = predict(cfg)
    assert {r["image_id"] for r in results} == {0, 1}
    (folder,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    run = wait_for(folder, ("predict/predictions/captions", "predict/predictions/all_boxes"))
    assert run.last("predict/predictions/captions") == ["a.png", "b.png"]
    for image_id, (file, masks, boxes) in enumerate(zip(run.last("predict/predictions/filenames"),
                                                        run.last("predict/predictions/all_masks"),
                                                        run.last("predict/predictions/all_boxes"))):
        with Image.open(images / f"{'ab'[image_id]}.png") as original:
            w, h = original.size
            np.testing.assert_array_equal(np.asarray(Image.open(run.file(file)).convert("RGB"))[:h, :w],
                                          np.asarray(original.convert("RGB")))
        mine = [r for r in results if r["image_id"] == image_id]
        box_data = run.json_file(boxes["predictions"]["path"])["box_data"]
        assert sorted(b["scores"]["score"] for b in box_data) == pytest.approx(sorted(r["score"] for r in mine))
        assert np.asarray(Image.open(run.file(masks["predictions"]["path"]))).any()


def test_eval_of_weights_that_do_not_fit_the_model_names_the_file(detecting_run, tmp_path):
    """A model.* override that changes the run's network, or a detectron2 file evaluated with another
    model: a short error naming the checkpoint and the fix, not load_state_dict's traceback."""
    import pickle

    import numpy as np

    from tensormask.errors import UserError
    from tensormask.framework.entry import user_error_message

    import shutil

    from omegaconf import OmegaConf

    # the run's checkpoint with its config.yaml naming another width (as a model.* override on the
    # command line of tensormask-eval does)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    shutil.copy(detecting_run[0] / "checkpoints" / "last.ckpt", ckpt)
    run_cfg = OmegaConf.load(detecting_run[0] / "checkpoints" / "config.yaml")
    run_cfg.model.backbone.out_channels = 32
    OmegaConf.save(run_cfg, ckpt.parent / "config.yaml")
    cfg = compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "a")
    with pytest.raises(UserError, match="size mismatch") as info:
        evaluate(cfg)
    message = user_error_message(info.value)
    assert str(ckpt) in message and "model.*" in message and len(message.splitlines()) <= 12
    d2 = tmp_path / "model_final.pkl"
    d2.write_bytes(pickle.dumps({"model": {"head.cls_score.weight": np.zeros((1,), np.float32)}}))
    cfg = compose_config("eval", [f"ckpt_path={d2}", *TINY_DATA], tmp_path / "b")
    with pytest.raises(UserError, match="experiment=r50_1x") as info:
        evaluate(cfg)
    assert str(d2) in user_error_message(info.value)
