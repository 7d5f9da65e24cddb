"""Callbacks: a step-counting progress bar and validation pictures for the dashboards."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only


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
