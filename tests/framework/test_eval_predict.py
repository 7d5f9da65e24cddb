"""tensormask-eval and tensormask-predict on the checkpoint of a tiny training run."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from framework_helpers import compose_config, tiny_train_config
from tensormask.evaluate import evaluate
from tensormask.predict import predict
from tensormask.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    metrics, objects = train(tiny_train_config(run_dir, "trainer.max_steps=3"))
    return run_dir, metrics, objects


def test_eval_rebuilds_the_run_and_reproduces_its_metrics(trained_run, tmp_path):
    run_dir, train_metrics, _ = trained_run
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
    assert saved["metrics"] == json.loads(json.dumps(metrics))
    assert saved["step"] == 3
    assert (tmp_path / "eval" / "coco_instances_results.json").is_file()


def test_eval_missing_checkpoint(tmp_path):
    cfg = compose_config("eval", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        evaluate(cfg)


def test_predict_writes_pictures_and_coco_results(trained_run, tmp_path):
    run_dir, _, objects = trained_run
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
    assert written == json.loads(json.dumps(results))
    for r in written:
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r)
        assert r["image_id"] in (0, 1) and r["category_id"] in dataset.contiguous_to_coco
    index = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [i["file_name"].split("/")[-1] for i in index["images"]] == ["a.png", "b.png"]
    assert [c["name"] for c in index["categories"]] == dataset.class_names
