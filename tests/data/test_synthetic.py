"""The synthetic COCO generator: real COCO format, exact masks, deterministic, idempotent, atomic."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from tensormask.data import CocoInstances, make_synthetic_coco
from tensormask.data import synthetic

# plain pycocotools (annToMask) trips a harmless numpy 2 DeprecationWarning
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = dict(num_train=6, num_val=3, image_size=96, num_classes=5, min_object_size=8, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", seed=3, **SMALL)
    b = make_synthetic_coco(tmp_path / "b", seed=3, **SMALL)
    c = make_synthetic_coco(tmp_path / "c", seed=4, **SMALL)
    fa, fb, fc = _files(Path(a["root"])), _files(Path(b["root"])), _files(Path(c["root"]))
    assert fa == fb
    assert fa["annotations/instances_train.json"] != fc["annotations/instances_train.json"]
    assert sorted(fa) == sorted(fc)


def test_loads_with_plain_pycocotools_and_masks_are_exact(tmp_path):
    info = make_synthetic_coco(tmp_path / "s", seed=0, **SMALL)
    coco = COCO(info["val_annotations"])
    assert [c["id"] for c in coco.dataset["categories"]] == [1, 3, 5, 7, 9]  # non-contiguous on purpose
    assert [c["name"] for c in coco.dataset["categories"]] == ["circle", "square", "triangle", "star", "ring"]
    kinds = set()
    for ann_file, image_dir in [(info["train_annotations"], info["train_images"]), (info["val_annotations"], info["val_images"])]:
        coco = COCO(ann_file)
        assert len(coco.imgs) == (6 if "train" in ann_file else 3) and len(coco.anns) > 0
        for img in coco.imgs.values():
            pixels = np.asarray(Image.open(Path(image_dir) / img["file_name"]).convert("RGB"))
            assert pixels.shape == (img["height"], img["width"], 3)
            assert 72 <= img["height"] <= 96 and 72 <= img["width"] <= 96  # size jitter 0.25
            owner = np.full(pixels.shape[:2], -1)
            for ann in coco.imgToAnns[img["id"]]:
                kinds.add(type(ann["segmentation"]).__name__)
                m = coco.annToMask(ann).astype(bool)
                assert m.sum() == ann["area"] > 0
                ys, xs = np.nonzero(m)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert (owner[m] == -1).all(), "visible masks of one image must not overlap"
                owner[m] = ann["id"]
                # exact masks: every pixel of the mask has the object's (lightly noisy) colour, none of the background's
                if m.sum() >= 30:
                    assert pixels[m].astype(float).std(axis=0).max() < 15
    assert kinds == {"list", "dict"}  # polygons and RLE both exercised


def test_reads_through_the_coco_dataset(tmp_path):
    info = make_synthetic_coco(tmp_path / "s", seed=0, **SMALL)
    ds = CocoInstances(info["train_images"], info["train_annotations"], train=True)
    assert ds.contiguous_to_coco == info["category_ids"] and ds.class_names == info["class_names"]
    item = ds[0]
    assert item["masks"].shape[0] == item["labels"].shape[0] > 0
    assert int(item["labels"].max()) < 5


def test_objects_span_several_pyramid_levels(tmp_path):
    info = make_synthetic_coco(tmp_path / "s", seed=1, num_train=24, num_val=1, image_size=256, progress=False)
    coco = COCO(info["train_annotations"])
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco.anns.values()])
    # windows of 44-60 px at P2 up to 8x that at P5: need objects both below 32 px and above 128 px
    assert (sides < 32).any() and (sides > 128).any()
    assert len({a["category_id"] for a in coco.anns.values()}) == 5
    # occlusion happens: some image has objects whose boxes overlap
    overlaps = 0
    for image_id, anns in coco.imgToAnns.items():
        for i in range(len(anns)):
            for j in range(i + 1, len(anns)):
                a, b = anns[i]["bbox"], anns[j]["bbox"]
                if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]:
                    overlaps += 1
    assert overlaps > 0


def test_idempotent_and_default_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORMASK_CACHE", str(tmp_path / "cache"))
    first = make_synthetic_coco(**SMALL)
    root = Path(first["root"])
    assert root.parent == tmp_path / "cache" / "synthetic"
    stamp = (root / "params.json").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(synthetic, "_generate", lambda *a: calls.append(a))
    again = make_synthetic_coco(**SMALL)
    assert again == first and calls == [] and (root / "params.json").stat().st_mtime_ns == stamp
    # other parameters: another folder
    monkeypatch.undo()
    monkeypatch.setenv("TENSORMASK_CACHE", str(tmp_path / "cache"))
    other = make_synthetic_coco(**{**SMALL, "num_val": 2})
    assert other["root"] != first["root"]


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_draw = synthetic._draw_image
    count = {"n": 0}

    def failing_draw(rng, params):
        count["n"] += 1
        if count["n"] == 4:
            raise KeyboardInterrupt
        return real_draw(rng, params)

    monkeypatch.setattr(synthetic, "_draw_image", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_coco(tmp_path / "s", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder
    # a stale partial folder (no params.json) is replaced by a complete one
    monkeypatch.undo()
    partial = tmp_path / "s"
    (partial / "annotations").mkdir(parents=True)
    (partial / "annotations" / "instances_train.json").write_text("{")
    info = make_synthetic_coco(partial, **SMALL)
    assert json.loads((partial / "params.json").read_text())["num_train"] == 6
    COCO(info["train_annotations"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic_coco(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_bad_parameters():
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco("/nonexistent", num_classes=9, progress=False)
    with pytest.raises(ValueError, match="min_objects"):
        make_synthetic_coco("/nonexistent", min_objects=3, max_objects=2, progress=False)
