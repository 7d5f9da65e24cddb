"""Callbacks: step-counting progress bars (tqdm, rich), early stopping on the step-counted
validations, validation pictures and the final evaluation report for the dashboards, and the
writer of tensormask-predict's outputs.

Each has a config under `conf/callbacks/` (see docs/framework.md, "Callbacks"); the EMA of the
weights and the learning-rate monitor are Lightning's own (`EMAWeightAveraging`,
`LearningRateMonitor`) and need no code here. `PredictionWriter` is built by tensormask-predict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, EarlyStopping, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from tensormask.framework.validation import ConfigError
from tensormask.structures import Detections

log = logging.getLogger(__name__)


class StepProgressBar(TQDMProgressBar):
    """TQDM bar counting optimisation steps towards `max_steps` (training is endless in epochs).

    A resumed run continues in the middle of its one epoch, where Lightning calls no
    `on_train_epoch_start`: the bar is set up in `on_train_start` then too, so it keeps its total."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step > 0:
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        if trainer.max_steps and trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = 0
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description(f"train (steps)")
            self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if self._should_update(n, bar.total) or n == trainer.max_steps:
            bar.n = n
            bar.refresh()
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The logged values, without the logger's version number (`v_num`: not the user's business)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _should_update(self, current: int, total: int | float | None) -> bool:
        return self.is_enabled and (current % self.refresh_rate == 0 or current == total)


class StepRichProgressBar(RichProgressBar):
    """Rich progress bar (`callbacks=[default,rich_progress_bar]`) counting optimisation steps
    towards `max_steps`, like `StepProgressBar` (training is one endless epoch)."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, **kwargs)

    def _get_train_description(self, current_epoch: int) -> str:
        return "train (steps)"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The logged values, without the logger's version number (`v_num`)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step > 0:  # resumed mid-epoch: no on_train_epoch_start follows
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None and trainer.max_steps > 0:
            self.progress.update(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step)
            self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.max_steps > 0:
            self._update(self.train_progress_bar_id, trainer.global_step)


class StepEarlyStopping(EarlyStopping):
    """Lightning's `EarlyStopping` on the validations made during training.

    Training is one endless epoch counted in steps, so there is no validation to stop on unless
    `trainer.val_check_interval` asks for one every N steps; `val_check_interval` (the config
    passes `${trainer.val_check_interval}`) is checked here, before any work starts. `patience`
    counts validations, so the run stops after `patience * val_check_interval` steps without an
    improvement of at least `min_delta` in `monitor` (default `val/segm_AP`; `val/bbox_AP` for
    box-only models).
    """

    def __init__(self, *, val_check_interval: int | float | None, monitor: str = "val/segm_AP", mode: str = "max",
                 **kwargs: Any) -> None:
        if val_check_interval is None:
            raise ConfigError(
                "callbacks.early_stopping needs validations during training, but trainer.val_check_interval=null "
                "(evaluate only at the end): set trainer.val_check_interval=<steps>, e.g. 500"
            )
        if not monitor.startswith("val/"):
            raise ConfigError(f"callbacks.early_stopping.monitor={monitor!r}: must be a validation metric such as "
                              "val/segm_AP or val/bbox_AP")
        super().__init__(monitor=monitor, mode=mode, **kwargs)


def denormalize(image: torch.Tensor, pixel_mean, pixel_std, bgr: bool) -> torch.Tensor:
    """A normalised (3, H, W) model input back to uint8 RGB."""
    mean = torch.as_tensor(pixel_mean, dtype=image.dtype).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=image.dtype).view(3, 1, 1)
    x = image * std + mean
    if bgr:
        x = x.flip(0)
    return x.clamp(0, 255).round().to(torch.uint8)


class ValidationImages(L.Callback):
    """The first `num_images` validation images with their predictions, once per evaluation.

    W&B gets each as a `wandb.Image` of the undrawn image with the predicted masks and boxes and
    the ground truth as overlays (toggles per layer and class, boxes filtered by score in the UI;
    `tensormask.framework.loggers.detection_image`), under `val/predictions`; tensorboard gets
    the pictures drawn by `draw_detections` under `val/predictions/<image id>`. Detections below
    `score_threshold` are left out of both.
    """

    def __init__(self, num_images: int = 4, score_threshold: float = 0.5, ground_truth: bool = True) -> None:
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.ground_truth = ground_truth
        self._pictures: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._pictures = []

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if len(self._pictures) >= self.num_images or not outputs or trainer.sanity_checking:
            return
        dm = trainer.datamodule
        dataset = getattr(dm, "val_dataset", None)
        ids = list(getattr(dataset, "image_ids", []))
        for i, det in enumerate(outputs):
            if len(self._pictures) >= self.num_images:
                break
            image_id = int(batch.image_ids[i])
            picture: dict[str, Any] = {"image_id": image_id, "detections": det, "caption": f"image {image_id}"}
            if image_id in ids and hasattr(dataset, "load_image"):  # the stored image, in the detections' pixels
                index = ids.index(image_id)
                picture["image"] = dataset.load_image(index)
                if self.ground_truth:
                    boxes, masks, labels = dataset.load_target(index)
                    picture["ground_truth"] = Detections(boxes=boxes, scores=torch.ones(len(labels)), labels=labels,
                                                         masks=masks.bool())
            else:  # the model input, back to uint8 and to the original size
                picture["image"] = _original_image(batch, i, dm)
            self._pictures.append(picture)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._pictures or trainer.sanity_checking:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        from tensormask.evaluation import draw_detections
        from tensormask.framework.loggers import log_detection_images, wandb_loggers

        class_names = getattr(getattr(trainer.datamodule, "val_dataset", None), "class_names", None)
        step = trainer.global_step
        for logger in wandb_loggers(trainer.loggers):
            log_detection_images(logger, "val/predictions", self._pictures, class_names,
                                 score_threshold=self.score_threshold, step=step)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for p in self._pictures:
                    drawn = draw_detections(p["image"], p["detections"], class_names,
                                            score_threshold=self.score_threshold)
                    logger.experiment.add_image(f"val/predictions/{p['image_id']}", drawn, global_step=step)


def _original_image(batch, i: int, dm, model=None) -> torch.Tensor:
    """Image i of a batch back to uint8 RGB at its original size (normalisation from the data
    module, or else from the model: `pixel_mean`, `pixel_std`, `input_format`)."""
    source = dm if dm is not None and hasattr(dm, "pixel_mean") else model
    bgr = getattr(source, "bgr", str(getattr(source, "input_format", "RGB")).upper() == "BGR")
    h, w = batch.image_sizes[i]
    image = denormalize(batch.images[i, :, :h, :w].cpu(), list(source.pixel_mean), list(source.pixel_std), bgr)
    h0, w0 = batch.orig_sizes[i]
    if (h, w) != (h0, w0):  # the detections are in original pixels
        image = torch.nn.functional.interpolate(image[None].float(), size=(h0, w0), mode="bilinear",
                                                align_corners=False)[0].round().to(torch.uint8)
    return image


class PredictionImages(L.Callback):
    """tensormask-predict's pictures to W&B: the first `num_images` images that `trainer.predict`
    runs on, as `wandb.Image`s with the detections scoring at least `score_threshold` as mask and
    box overlays (as `ValidationImages`, without ground truth), under `key`, logged when
    prediction ends. Does nothing without a W&B logger.

    Args:
        image_reader: image id -> the stored image, uint8 (3, H, W) in the detections' pixels
            (tensormask-predict passes its image files' reader); default: the model input,
            un-normalised and resized back to the original size.
    """

    def __init__(self, num_images: int = 16, score_threshold: float = 0.5, key: str = "predict/predictions",
                 image_reader: Callable[[int], torch.Tensor] | None = None, names: Callable[[int], str] | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.key = key
        self.image_reader = image_reader
        self.names = names
        self.class_names = list(class_names) if class_names is not None else None
        self._pictures: list[dict[str, Any]] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self._pictures = []

    @rank_zero_only
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        from tensormask.framework.loggers import wandb_loggers

        if batch is None or not outputs or len(self._pictures) >= self.num_images or not wandb_loggers(trainer.loggers):
            return
        for i, det in enumerate(outputs):
            if len(self._pictures) >= self.num_images:
                break
            image_id = int(batch.image_ids[i])
            image = self.image_reader(image_id) if self.image_reader is not None else None
            if image is None:
                image = _original_image(batch, i, trainer.datamodule if trainer.datamodule is not None else None,
                                        model=pl_module.model)
            caption = self.names(image_id) if self.names is not None else f"image {image_id}"
            self._pictures.append({"image_id": image_id, "image": image, "detections": det.to("cpu"),
                                   "caption": caption})

    @rank_zero_only
    def on_predict_end(self, trainer, pl_module) -> None:
        from tensormask.framework.loggers import log_detection_images, wandb_loggers

        for logger in wandb_loggers(trainer.loggers):
            log_detection_images(logger, self.key, self._pictures, self.class_names,
                                 score_threshold=self.score_threshold)


class EvaluationReport(L.Callback):
    """The final evaluation to W&B as tables and plots: the COCO AP table, the per-category AP and,
    for each IoU type, the precision-recall and score-calibration curves of appendix A.5
    (`tensormask.framework.loggers.evaluation_report`; docs/framework.md, "Dashboards").

    "Final" is an evaluation by `trainer.validate` (the end of `tensormask-train`, and
    `tensormask-eval`); with `every_validation` also those during training. Fitting the
    calibration re-runs COCO's matching once per IoU type on rank 0 (seconds on the synthetic
    set, about a minute on COCO val2017). Does nothing without a W&B logger.

    Args:
        calibration: fit and log the A.5 PR / calibration curves.
        max_curve_points: points per category and curve in the logged tables.
        figures: also draw the per-category PR panels (`plot_pr_curves`) as `pr_curves_<iou>.png`
            beside the evaluator's COCO results JSON and log them as pictures.
    """

    def __init__(self, calibration: bool = True, max_curve_points: int = 200, every_validation: bool = False,
                 figures: bool = True) -> None:
        self.calibration = calibration
        self.max_curve_points = max_curve_points
        self.every_validation = every_validation
        self.figures = figures
        self.logged: list[str] = []  # the keys of the last report

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        from tensormask.evaluation.calibration import ScoreCalibration
        from tensormask.evaluation.coco_eval import per_category_ap
        from tensormask.framework.loggers import evaluation_report, wandb_loggers

        loggers = wandb_loggers(trainer.loggers)
        evaluator = getattr(pl_module, "evaluator", None)
        metrics = getattr(pl_module, "last_metrics", None)
        if trainer.sanity_checking or not loggers or evaluator is None or not metrics:
            return
        if trainer.state.fn != TrainerFn.VALIDATING and not self.every_validation:
            return
        names = dict(zip(evaluator.contiguous_to_coco, evaluator.class_names))
        per_category = {
            iou: {names.get(c, str(c)): ap for c, ap in per_category_ap(evaluator.cocoevals[iou]).items()}
            for iou in metrics if iou in evaluator.cocoevals
        }
        calibrations = {}
        if self.calibration and evaluator.last_results:
            for iou in metrics:
                calibrations[iou] = ScoreCalibration.from_evaluator(evaluator, iou_type=iou)
        figure_dir = getattr(evaluator, "output_dir", None) if self.figures else None
        report = evaluation_report(metrics, per_category, calibrations, prefix="val",
                                   max_curve_points=self.max_curve_points, figure_dir=figure_dir)
        for logger in loggers:
            logger.log_metrics(report, step=trainer.global_step)
        self.logged = sorted(report)


def picture_names(files: list[Path]) -> list[str]:
    """The picture file of each image, relative to `pictures/` (docs/framework.md "Predict"):
    `<name>.png` with the image's sub-folders under the folder common to all files kept
    (`cam1/0001.jpg` -> `cam1/0001.png`), and the image's suffix kept where two files would
    otherwise share a picture (`x.jpg`, `x.png` -> `x.jpg.png`, `x.png.png`)."""
    files = [Path(os.path.abspath(f)) for f in files]
    if not files:
        return []
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    relative = [f.relative_to(root) for f in files]
    short = [r.with_suffix(".png").as_posix() for r in relative]
    counts: dict[str, int] = {}
    for name in short:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{r.as_posix()}.png" for name, r in zip(short, relative)]


class PredictionWriter(BasePredictionWriter):
    """Writes what `trainer.predict` yields for tensormask-predict (docs/framework.md):
    `<output_dir>/pictures/<image name>.png` (named by `picture_names`; the image with the detections scoring at least
    `draw_score_threshold`), and at the end `<output_dir>/predictions.json` (COCO results, all
    scores; image_id = `dataset.image_ids`, by default the file's index in `dataset.files`) and `<output_dir>/images.json` (those
    ids' file names, the categories, and the files that could not be read, with the reason).

    `dataset` is the `tensormask.data.images.ImageFiles` being predicted: the pictures are drawn on
    its stored images, and the images it could not read are the ones no batch carried.
    """

    def __init__(self, output_dir: str | Path, dataset, contiguous_to_coco: list[int], class_names: list[str],
                 draw_score_threshold: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.pictures = self.output_dir / "pictures"
        self.dataset = dataset
        self.contiguous_to_coco = list(contiguous_to_coco)
        self.class_names = list(class_names)
        self.draw_score_threshold = float(draw_score_threshold)
        self.results: list[dict[str, Any]] = []
        self.written: set[int] = set()
        self.skipped: list[dict[str, str]] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.results, self.written, self.skipped = [], set(), []
        self.pictures.mkdir(parents=True, exist_ok=True)
        self.picture_names = picture_names(self.dataset.files)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if batch is None:  # every image of the batch was unreadable
            return
        from tensormask.evaluation import detections_to_coco_results, draw_detections

        for image_id, det in zip(batch.image_ids, prediction):
            index = self.dataset.index_of(image_id)
            file = self.dataset.files[index]
            self.results += detections_to_coco_results(image_id, det, self.contiguous_to_coco)
            draw_detections(self.dataset.read(index), det, self.class_names,
                            score_threshold=self.draw_score_threshold, path=self.pictures / self.picture_names[index])
            self.written.add(index)
            log.info("%s: %d detections >= %.2f", file.name, int((det.scores >= self.draw_score_threshold).sum()),
                     self.draw_score_threshold)

    def on_predict_end(self, trainer, pl_module) -> None:
        from tensormask.framework.checkpoint_io import atomic_write_json

        files = self.dataset.files
        self.skipped = [{"file_name": str(files[i]), "error": self.dataset.read_error(i) or "not read"}
                        for i in range(len(files)) if i not in self.written]
        atomic_write_json(self.output_dir / "predictions.json", self.results)
        atomic_write_json(self.output_dir / "images.json", {
            "images": [{"id": i, "file_name": str(f)} for i, f in zip(self.dataset.image_ids, files)],
            "categories": [{"id": c, "name": n} for c, n in zip(self.contiguous_to_coco, self.class_names)],
            "skipped": self.skipped,
        })
