"""W&B: an offline run (no key) written into the run folder with the config, losses, metrics,
pictures with mask and box overlays, the AP tables and the A.5 curves; checked in the run's own files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from framework_helpers import tiny_train_config
from tensormask.evaluation import ScoreCalibration
from tensormask.evaluation.coco_eval import METRIC_NAMES
from tensormask.framework.callbacks import ValidationImages
from tensormask.framework.loggers import wandb_mode
from tensormask.train import train
from wandb_records import OfflineRun, wait_for


def test_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="logger.wandb.mode='sometimes': must be one of auto, online"):
        wandb_mode("sometimes")


def test_offline_run_has_the_expected_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # auto -> offline because there is no key
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # tables' staging, not ~/.local
    run_dir = tmp_path / "run"
    # every candidate kept (score threshold 0, at most 10 per image): the 2-step model detects something
    cfg = tiny_train_config(run_dir, "logger=wandb", "group=table2", "tags=[table2,bipyramid]",
                            "callbacks.validation_images.num_images=2", "callbacks.validation_images.score_threshold=0.0",
                            "model.score_threshold=0.0", "model.max_detections=10", pictures=True)
    metrics, objects = train(cfg)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    info = summary["wandb"]
    assert info["mode"] == "offline" and info["project"] == "tensormask"
    assert info["group"] == "table2" and info["tags"] == ["table2", "bipyramid"]
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{info['run_id']}")
    # wandb 0.31 keeps an offline run in one protobuf log (run-<id>.wandb, uploaded by `wandb sync`);
    # its records hold the config and metric names as length-prefixed strings
    log = offline / f"run-{info['run_id']}.wandb"

    def has(key: str) -> bool:
        data = key.encode()
        return bytes([len(data)]) + data in records

    # wandb-core appends to the log from its own process and may still be flushing after
    # wandb.finish() returns on a loaded machine: wait (bounded) for the last records to land
    expected = ("train/loss", "val/predictions/all_masks", "val/coco_ap/path", "val/per_category_ap/path",
                "val/pr_curve_segm_table/path", "val/pr_curves_segm/path")
    run = wait_for(offline, expected)
    records = log.read_bytes()

    for key in ("train/loss", "train/loss_cls", "train/loss_box", "train/loss_mask", "lr", "val/segm_AP",
                "val/bbox_AP", "val/bbox_AP50", "val/segm_AP75", "val/predictions",  # metrics and pictures
                "model", "data", "trainer",  # the resolved config's top-level keys
                "table2", "bipyramid"):  # group and tags
        assert has(key), key
    assert b"tensormask.modeling.TensorMask" in records  # a config value (JSON inside the record)
    assert not has("val/nonexistent_key")
    assert len(list((offline / "files" / "media" / "images" / "val").glob("predictions_*.png"))) == 2
    # the run id is kept in the run folder, so a resumed run continues the same W&B run
    assert (run_dir / "wandb_run_id").read_text().strip() == info["run_id"]

    _check_overlays(run, objects)
    _check_evaluation_report(run, metrics, objects, run_dir)


def _check_overlays(run: OfflineRun, objects) -> None:
    """val/predictions: the undrawn images with the predictions and the ground truth as W&B mask and
    box overlays, class ids = label + 1, the predictions' boxes carrying their scores."""
    (callback,) = [c for c in objects["trainer"].callbacks if isinstance(c, ValidationImages)]
    dataset = objects["datamodule"].val_dataset
    logged = run.last("val/predictions/all_masks"), run.last("val/predictions/all_boxes")
    assert run.last("val/predictions/_type") == "images/separated" and run.last("val/predictions/count") == 2
    for picture, masks, boxes in zip(callback._pictures, *logged):
        det = picture["detections"]
        assert len(det) > 0
        # predictions: one class map, nonzero exactly on the union of the predicted masks; images
        # of one key are padded (bottom, right) to the largest one's size
        pred = np.asarray(Image.open(run.file(masks["predictions"]["path"])))
        h, w = det.masks.shape[-2:]
        assert pred.shape == (run.last("val/predictions/height"), run.last("val/predictions/width"))
        assert (pred[h:] == 0).all() and (pred[:, w:] == 0).all()
        pred = pred[:h, :w]
        np.testing.assert_array_equal(pred > 0, det.masks.any(0).numpy())
        assert set(np.unique(pred)) <= {0} | {int(k) + 1 for k in det.labels}
        box_data = run.json_file(boxes["predictions"]["path"])["box_data"]
        assert len(box_data) == len(det)
        for entry, box, score, label in zip(box_data, det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            p = entry["position"]
            assert [p["minX"], p["minY"], p["maxX"], p["maxY"]] == pytest.approx(box)
            assert entry["class_id"] == label + 1 and entry["scores"]["score"] == pytest.approx(score)
            assert entry["box_caption"].startswith(dataset.class_names[label])
        # ground truth: each object's own pixels carry its class, the background 0
        gt_boxes, gt_masks, gt_labels = dataset.load_target(dataset.image_ids.index(picture["image_id"]))
        gt = np.asarray(Image.open(run.file(masks["ground_truth"]["path"])))[:h, :w]
        covered = gt_masks.numpy().astype(int).sum(0)
        assert (gt[covered == 0] == 0).all()
        for m, label in zip(gt_masks.numpy().astype(bool), gt_labels.tolist()):
            assert (gt[m & (covered == 1)] == label + 1).all()
        gt_box_data = run.json_file(boxes["ground_truth"]["path"])["box_data"]
        np.testing.assert_allclose([[b["position"][k] for k in ("minX", "minY", "maxX", "maxY")] for b in gt_box_data],
                                   gt_boxes.numpy(), rtol=1e-6)
    # the toggles: W&B's class names per overlay layer
    labels = run.config["_wandb"]["mask/class_labels"]
    assert labels["val/predictions_wandb_delimeter_predictions"]["value"] == {
        "0": "background", **{str(k + 1): n for k, n in enumerate(dataset.class_names)}}


def _check_evaluation_report(run: OfflineRun, metrics, objects, run_dir) -> None:
    """The final evaluation as W&B tables and charts: the AP table, per-category AP, and the A.5
    precision-recall and calibration curves, recomputed here from the run's COCO results JSON."""
    table = run.json_file(run.last("val/coco_ap/path"))
    assert table["columns"] == ["iou_type", *METRIC_NAMES]
    for row in table["data"]:
        for name, value in zip(METRIC_NAMES, row[1:]):
            expected = metrics[row[0]][name]
            assert value is None if math.isnan(expected) else value == pytest.approx(100 * expected, abs=1e-3)
    assert [row[0] for row in table["data"]] == ["bbox", "segm"]

    dataset = objects["datamodule"].val_dataset
    per_cat = run.json_file(run.last("val/per_category_ap/path"))
    assert per_cat["columns"] == ["category", "bbox AP", "segm AP"]
    assert [row[0] for row in per_cat["data"]] == list(dataset.class_names)
    for j, iou in enumerate(("bbox", "segm")):  # COCO's AP is the mean over the categories
        values = [row[1 + j] for row in per_cat["data"] if row[1 + j] is not None]
        assert np.mean(values) == pytest.approx(100 * metrics[iou]["AP"], abs=1e-2)

    visualize = {k.split("/", 2)[2]: v for k, v in run.config.items() if k.startswith("_wandb/visualize/")}
    for iou in ("bbox", "segm"):
        fields = visualize[f"val/pr_curve_{iou}"]["panel_config"]["fieldSettings"]
        assert fields == {"x": "recall", "y": "precision", "stroke": "category"}
        assert visualize[f"val/calibration_{iou}"]["panel_config"]["fieldSettings"]["x"] == "score"
        assert visualize[f"val/per_category_ap_{iou}"]["panel_config"]["fieldSettings"]["value"] == f"{iou} AP"
        curves = run.json_file(run.last(f"val/pr_curve_{iou}_table/path"))
        assert curves["columns"] == ["category", "recall", "precision", "score"]
        calibration = ScoreCalibration.fit(dataset.coco, run_dir / "eval" / "coco_instances_results.json",
                                           dataset.contiguous_to_coco, iou_type=iou)
        for k, curve in enumerate(calibration.curves):
            rows = [r[1:] for r in curves["data"] if r[0] == dataset.class_names[k]]
            if curve is None:
                assert not rows
                continue
            assert len(rows) == min(curve.scores.size, 200)
            points = np.stack([curve.recall, curve.precision, curve.scores], 1)
            assert rows[0] == pytest.approx(points[0].tolist()) and rows[-1] == pytest.approx(points[-1].tolist())
            for r in rows:
                assert np.isclose(points, r).all(1).any()
        assert run.file(run.last(f"val/pr_curves_{iou}/path")).is_file()
        assert (run_dir / "eval" / f"pr_curves_{iou}.png").is_file()


def test_prediction_pictures_go_to_wandb_with_overlays(tmp_path, monkeypatch):
    """`PredictionImages` (tensormask-predict's W&B pictures) under trainer.predict, offline."""
    from tensormask.framework.builders import build_datamodule, build_model, build_module, build_trainer
    from tensormask.framework.callbacks import PredictionImages
    from tensormask.framework.loggers import finish_wandb, wandb_logger

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    cfg = tiny_train_config(tmp_path / "run", "model.score_threshold=0.0", "model.max_detections=5")
    model = build_model(cfg)
    dm = build_datamodule(cfg, model)
    dm.prepare_data()
    dm.setup("validate")
    module = build_module(cfg, model)
    module.evaluator_factory = None
    dataset = dm.val_dataset

    def reader(image_id):
        return dataset.load_image(dataset.image_ids.index(image_id))

    stored = PredictionImages(num_images=3, score_threshold=0.0, image_reader=reader, names=lambda i: f"file{i}.png",
                              class_names=dataset.class_names)
    fallback = PredictionImages(num_images=1, score_threshold=0.0, key="predict/from_input")  # no reader
    logger = wandb_logger(save_dir=str(tmp_path / "run"), mode="offline", job_type="predict")
    trainer = build_trainer(cfg, callbacks=[stored, fallback], loggers=[logger])
    trainer.predict(module, dataloaders=dm.val_dataloader(), return_predictions=False)
    finish_wandb([logger])

    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    run = wait_for(folder, ("predict/predictions/all_masks", "predict/from_input/filenames"))
    assert run.last("predict/predictions/count") == 3
    assert run.last("predict/predictions/captions") == [f"file{p['image_id']}.png" for p in stored._pictures]
    for picture, file, masks, boxes in zip(stored._pictures, run.last("predict/predictions/filenames"),
                                           run.last("predict/predictions/all_masks"),
                                           run.last("predict/predictions/all_boxes")):
        # the undrawn stored image (padded to the largest of the key), the detections as overlays
        det = picture["detections"]
        h, w = det.masks.shape[-2:]
        np.testing.assert_array_equal(np.asarray(Image.open(run.file(file)).convert("RGB"))[:h, :w],
                                      reader(picture["image_id"]).permute(1, 2, 0).numpy())
        assert len(det) > 0 and set(masks) == {"predictions"}
        pred = np.asarray(Image.open(run.file(masks["predictions"]["path"])))[:h, :w]
        np.testing.assert_array_equal(pred > 0, det.masks.any(0).numpy())
        assert len(run.json_file(boxes["predictions"]["path"])["box_data"]) == len(det)
    # without a reader: the model input, back at the original size
    (picture,) = fallback._pictures
    with Image.open(run.file(run.last("predict/from_input/filenames")[0])) as im:  # a single image: no padding
        assert (im.height, im.width) == tuple(picture["detections"].masks.shape[-2:])


def test_online_without_an_api_key_is_a_short_error(tmp_path, monkeypatch):
    """logger.wandb.mode=online on a machine without a W&B key: wandb.init's UsageError is a user's
    mistake, printed as one message naming the key and the fix (it was a traceback)."""
    import wandb

    from tensormask.framework.entry import user_error_message

    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    with pytest.raises(Exception) as info:
        wandb.init(mode="online", dir=str(tmp_path), project="tensormask")
    message = user_error_message(info.value)
    assert message is not None and "logger.wandb.mode=online" in message and "wandb login" in message
    assert user_error_message(RuntimeError("a bug")) is None
