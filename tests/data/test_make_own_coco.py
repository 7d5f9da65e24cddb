"""scripts/make_own_coco.py (the data set of docs/data.md "Measured: a small data set of our own")
writes a COCO file as other tools do, which the COCO reader and the class rule take as documented."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from tensormask.data import CocoInstances

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_own_coco.py"


def test_make_own_coco(tmp_path):
    spec = importlib.util.spec_from_file_location("make_own_coco", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.make_split(np.random.default_rng(0), tmp_path, "train", 4, 1000)
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["categories"]] == ["background", "crescent", "bar", "blob"]
    assert 0 not in {a["category_id"] for a in data["annotations"]} and data["annotations"]
    assert [im["id"] for im in data["images"]] == [1000, 1003, 1006, 1009]
    assert Path(data["images"][2]["file_name"]).is_absolute() and not Path(data["images"][0]["file_name"]).is_absolute()
    assert all(256 <= im["height"] <= 512 and 256 <= im["width"] <= 512 for im in data["images"])
    dataset = CocoInstances(tmp_path / "train", path, train=True, category_ids=[1, 2, 3])
    item = dataset[0]
    assert dataset.class_names == ["crescent", "bar", "blob"]
    assert item["masks"].shape[0] == len(item["labels"]) > 0 and int(item["masks"].sum()) > 0
