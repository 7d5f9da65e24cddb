"""Callbacks: step-counting progress bars (tqdm, rich), early stopping on the step-counted
validations, validation pictures and the final evaluation report for the dashboards.

Each has a config under `conf/callbacks/` (see docs/framework.md, "Callbacks"); the EMA of the
weights and the learning-rate monitor are Lightning's own (`EMAWeightAveraging`,
`LearningRateMonitor`) and need no code here.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from tensormask.framework.validation import ConfigError


class StepProgressBar(TQDMProgressBar):
    """TQDM bar counting optimisation steps towards `max_steps` (training is endless in epochs)."""

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

    def _should_update(self, current: int, total: int | float | None) -> bool:
        return self.is_enabled and (current % self.refresh_rate == 0 or current == total)


class StepRichProgressBar(RichProgressBar):
    """Rich progress bar (`callbacks=[default,rich_progress_bar]`) counting optimisation steps
    towards `max_steps`, like `StepProgressBar` (training is one endless epoch)."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, **kwargs)

    def _get_train_description(self, current_epoch: int) -> str:
        return "train (steps)"

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
    """Logs the first `num_images` validation images with their predicted masks and boxes to the
    loggers that take images (W&B, tensorboard), once per evaluation."""

    def __init__(self, num_images: int = 4, score_threshold: float = 0.5) -> None:
        self.num_images = num_images
        self.score_threshold = score_threshold
        self._pictures: list[tuple[int, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._pictures = []

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if len(self._pictures) >= self.num_images or not outputs or trainer.sanity_checking:
            return
        from tensormask.evaluation import draw_detections

        dm = trainer.datamodule
        class_names = getattr(dm.val_dataset, "class_names", None)
        for i, det in enumerate(outputs):
            if len(self._pictures) >= self.num_images:
                break
            h, w = batch.image_sizes[i]
            image = denormalize(batch.images[i, :, :h, :w].cpu(), dm.pixel_mean, dm.pixel_std, dm.bgr)
            h0, w0 = batch.orig_sizes[i]
            if (h, w) != (h0, w0):  # the detections are in original pixels
                image = torch.nn.functional.interpolate(image[None].float(), size=(h0, w0), mode="bilinear",
                                                        align_corners=False)[0].round().to(torch.uint8)
            picture = draw_detections(image, det, class_names, score_threshold=self.score_threshold)
            self._pictures.append((int(batch.image_ids[i]), picture))

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._pictures or trainer.sanity_checking:
            return
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="val/predictions",
                    images=[p.permute(1, 2, 0).numpy() for _, p in self._pictures],
                    caption=[f"image {i}" for i, _ in self._pictures],
                    step=step,
                )
            elif isinstance(logger, TensorBoardLogger):
                for image_id, p in self._pictures:
                    logger.experiment.add_image(f"val/predictions/{image_id}", p, global_step=step)
