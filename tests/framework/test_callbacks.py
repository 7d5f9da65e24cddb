"""The optional callbacks of conf/callbacks (EMA, LR monitor, early stopping, rich progress bar),
each selected the way a user does (`callbacks=[default,<name>]`) in a tiny training run."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from framework_helpers import TINY_DATA, TINY_MODEL, TINY_RUN, compose_config, tiny_train_config
from tensormask.framework.callbacks import StepEarlyStopping, StepRichProgressBar
from tensormask.framework.lit_module import DetectionLitModule
from tensormask.framework.validation import ConfigError
from tensormask.train import train


def _csv_rows(run_dir) -> list[dict[str, str]]:
    (metrics_csv,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(metrics_csv) as f:
        return list(csv.DictReader(f))


def test_ema_averages_the_weights_and_is_what_evaluation_and_checkpoints_use(tmp_path, monkeypatch):
    raw: list[dict[str, torch.Tensor]] = []  # the trained weights after each optimisation step
    evaluated: list[dict[str, torch.Tensor]] = []  # the weights each validation ran with

    def weights(module):
        return {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    monkeypatch.setattr(DetectionLitModule, "on_train_batch_end",
                        lambda self, *a: raw.append(weights(self)), raising=False)
    original_start = DetectionLitModule.on_validation_epoch_start

    def on_validation_epoch_start(self):
        evaluated.append(weights(self))
        original_start(self)

    monkeypatch.setattr(DetectionLitModule, "on_validation_epoch_start", on_validation_epoch_start)
    run_dir = tmp_path / "run"
    decay = 0.5  # far from 1, so that the average is far from the last weights after 3 steps
    cfg = tiny_train_config(run_dir, "callbacks=[default,ema]", f"callbacks.ema.decay={decay}",
                            "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=3")
    train(cfg)
    assert len(raw) == 3 and len(evaluated) == 1
    # ema_1 = w_1, ema_t = decay * ema_(t-1) + (1 - decay) * w_t  (torch.optim.swa_utils.get_ema_avg_fn)
    ema = dict(raw[0])
    for w in raw[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w[k] if w[k].is_floating_point() else w[k] for k in w}
    floating = [k for k, v in ema.items() if v.is_floating_point()]
    moved = max(float((ema[k] - raw[-1][k]).abs().max()) for k in floating)
    assert moved > 1e-4, "the average must differ from the last weights for this test to mean anything"
    for k in floating:
        torch.testing.assert_close(evaluated[0][k], ema[k], rtol=1e-5, atol=1e-6, msg=k)
    # the checkpoint: averaged weights as the state_dict (eval / predict load these), raw ones to resume
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for k in floating:
        torch.testing.assert_close(state["state_dict"][f"model.{k}"], ema[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(state["current_model_state"][f"model.{k}"], raw[-1][k], rtol=0, atol=0, msg=k)


def test_lr_monitor_logs_every_parameter_group(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_train_config(run_dir, "callbacks=[default,lr_monitor]", "trainer.max_steps=3", "module.warmup_steps=3"))
    rows = _csv_rows(run_dir)
    monitored = [r for r in rows if r.get("lr-AdamW/pg1")]
    module_lr = [float(r["lr"]) for r in rows if r.get("lr")]
    assert len(monitored) == 3 and len(module_lr) == 3
    # the same schedule as the module's own `lr` (the decayed and the norm parameter groups share it)
    assert [float(r["lr-AdamW/pg1"]) for r in monitored] == pytest.approx(module_lr, rel=1e-6)
    assert [float(r["lr-AdamW/pg2"]) for r in monitored] == pytest.approx(module_lr, rel=1e-6)
    assert module_lr[0] < module_lr[1] < module_lr[2]  # the warm-up is visible
    assert float(monitored[0]["lr-AdamW/pg1-momentum"]) == pytest.approx(0.9)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path):
    run_dir = tmp_path / "run"
    # min_delta=1: no AP can improve by 1, so the second validation (patience 1) stops the run
    cfg = tiny_train_config(run_dir, "callbacks=[default,early_stopping]", "trainer.val_check_interval=1",
                            "trainer.max_steps=6", "callbacks.early_stopping.patience=1",
                            "callbacks.early_stopping.min_delta=1.0")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    (stopper,) = [c for c in objects["trainer"].callbacks if isinstance(c, StepEarlyStopping)]
    assert stopper.stopped_epoch == 0 and stopper.wait_count == 1
    assert "segm" in metrics  # the final evaluation still ran


def test_early_stopping_without_validations_is_a_config_error(tmp_path):
    cfg = tiny_train_config(tmp_path, "callbacks=[default,early_stopping]")
    assert cfg.trainer.val_check_interval is None
    with pytest.raises(InstantiationException) as info:
        instantiate(cfg.callbacks.early_stopping)
    assert isinstance(info.value.__cause__, ConfigError)
    assert "trainer.val_check_interval" in str(info.value.__cause__)


def test_rich_progress_bar_counts_steps(tmp_path, capsys):
    run = [o for o in TINY_RUN if not o.startswith(("callbacks.progress_bar", "trainer.enable_progress_bar"))]
    cfg = compose_config("train", [*TINY_MODEL, *TINY_DATA, *run, "callbacks=[default,rich_progress_bar]",
                                   "trainer.max_steps=3"], tmp_path / "run")
    _, objects = train(cfg)
    assert isinstance(objects["trainer"].progress_bar_callback, StepRichProgressBar)
    out = capsys.readouterr().out
    assert "train (steps)" in out and "3/3" in out and "train/loss" in out and "v_num" not in out


def test_progress_bar_off_with_the_default_callbacks(tmp_path, capsys):
    """`trainer.enable_progress_bar=false` alone (callbacks/progress_bar still selected) trains without a bar."""
    run = [o for o in TINY_RUN if not o.startswith("callbacks.progress_bar")]
    cfg = compose_config("train", [*TINY_MODEL, *TINY_DATA, *run], tmp_path / "run")
    assert cfg.callbacks.progress_bar is not None and cfg.trainer.enable_progress_bar is False
    _, objects = train(cfg)
    assert objects["trainer"].progress_bar_callback is None
    assert "train (steps)" not in capsys.readouterr().out


def test_prediction_pictures_of_files_with_the_same_name_do_not_overwrite_each_other(tmp_path):
    # a COCO file's images in sub-folders ("cam1/0001.jpg", "cam2/0001.jpg") or one folder holding
    # "x.jpg" and "x.png": one picture each, under a name that says which file it shows
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from tensormask.data.images import ImageFiles
    from tensormask.framework.callbacks import PredictionWriter
    from tensormask.structures import Detections

    names = ["cam1/0001.jpg", "cam2/0001.jpg", "x.jpg", "x.png", "y.png"]
    for i, name in enumerate(names):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 10 + i, 3), 30 * i, np.uint8)).save(tmp_path / "in" / name)
    dataset = ImageFiles([tmp_path / "in" / n for n in names])
    writer = PredictionWriter(tmp_path / "out", dataset, [1], ["thing"])
    writer.on_predict_start(None, None)
    dets = [Detections.empty(8, 10 + i) for i in range(len(names))]
    writer.write_on_batch_end(None, None, dets, None, SimpleNamespace(image_ids=list(range(len(names)))), 0, 0)
    pictures = sorted(str(p.relative_to(tmp_path / "out" / "pictures")) for p in (tmp_path / "out").rglob("*.png"))
    assert pictures == ["cam1/0001.png", "cam2/0001.png", "x.jpg.png", "x.png.png", "y.png"]
    with Image.open(tmp_path / "out" / "pictures" / "cam2" / "0001.png") as picture:
        assert picture.size == (11, 8)  # the second file's picture, not overwritten by the first
