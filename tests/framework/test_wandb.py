"""W&B: an offline run (no key) written into the run folder with the config, losses, metrics, pictures."""

from __future__ import annotations

import json
import time

import pytest

from framework_helpers import tiny_train_config
from tensormask.framework.loggers import wandb_mode
from tensormask.train import train


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
    run_dir = tmp_path / "run"
    cfg = tiny_train_config(run_dir, "logger=wandb", "group=table2", "tags=[table2,bipyramid]",
                            "callbacks.validation_images.num_images=2", "callbacks.validation_images.score_threshold=0.0",
                            pictures=True)
    metrics, _ = train(cfg)
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
    deadline = time.monotonic() + 60
    records = log.read_bytes()
    while not (has("train/loss") and has("val/predictions")) and time.monotonic() < deadline:
        time.sleep(0.5)
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
