"""The LightningModule: one training step = forward + the model's losses; validation = COCO AP.

The module is model-agnostic: it drives anything with the TensorMask API (`out = model(images)`,
`model.losses(out, targets, image_sizes)`, `model.predict(out, image_sizes, orig_sizes)`), which
the torchvision baselines expose too (`tensormask.modeling.baselines`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from tensormask.framework.schedule import WarmupMultiStep, scaled_lr
from tensormask.structures import Batch, Detections

_NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)


class DetectionLitModule(L.LightningModule):
    """Trains and evaluates a detection / instance segmentation model.

    Args:
        model: the network (built by Hydra from `conf/model/`).
        optimizer: a partial optimizer class taking the parameter groups and `lr` (Hydra `_partial_`).
        base_lr: learning rate for `base_batch_size` images per step; the optimizer gets
            `base_lr * global_batch_size / base_batch_size` (the linear scaling rule).
        global_batch_size: images per step over all processes (the data config's).
        base_batch_size: the batch `base_lr` was tuned for (16 in the paper).
        milestones, gamma: step decay of the learning rate (in steps).
        warmup_steps, warmup_factor: linear warm-up from `warmup_factor * lr` over `warmup_steps`.
        weight_decay_norm: weight decay of normalisation layers' parameters (detectron2: 0).
        evaluator: a partial `tensormask.evaluation.COCOEvaluator`, completed in `setup` with the
            validation set's ground truth and class mapping.
        compile: run the model through `torch.compile`.
        channels_last: keep the weights and the input images in the channels-last memory format
            (NHWC), which oneDNN's CPU convolutions run faster (quickstart: ~10% per training step).

    A `Batch` (a dataclass) reaches the device through Lightning's own collection handling, which
    moves the tensors of dataclass fields; tensormask-predict runs `predict_step` through
    `trainer.predict`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        *,
        base_lr: float = 0.02,
        global_batch_size: int = 16,
        base_batch_size: int = 16,
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
        warmup_steps: int = 1000,
        warmup_factor: float = 0.001,
        weight_decay: float = 1e-4,
        weight_decay_norm: float = 0.0,
        evaluator: Callable[..., Any] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        milestones = tuple(int(m) for m in milestones)
        # the nn.Module and the factories are rebuilt from the saved config, never pickled
        self.save_hyperparameters(ignore=["model", "optimizer", "evaluator"], logger=False)
        self.model = model
        self.optimizer_factory = optimizer
        self.evaluator_factory = evaluator
        self.evaluator = None
        self.lr = scaled_lr(base_lr, global_batch_size, base_batch_size)
        self.last_metrics: dict[str, dict[str, float]] = {}
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # not a registered submodule: the weights live (once) under `model.`
        object.__setattr__(self, "_forward", torch.compile(model) if compile else model)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.evaluator_factory is not None and self.evaluator is None and stage != "predict":
            dm = self.trainer.datamodule
            dataset = dm.val_dataset
            self.evaluator = self.evaluator_factory(dataset.coco, dataset.contiguous_to_coco)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the class mapping travels with the weights (tensormask-predict needs the names)
        dataset = getattr(getattr(self.trainer, "datamodule", None), "val_dataset", None)
        if dataset is not None:
            checkpoint["classes"] = {
                "contiguous_to_coco": [int(c) for c in dataset.contiguous_to_coco],
                "class_names": [str(n) for n in dataset.class_names],
            }

    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                (no_decay if isinstance(module, _NORM_TYPES) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": self.hparams.weight_decay_norm})
        optimizer = self.optimizer_factory(groups, lr=self.lr)
        schedule = WarmupMultiStep(
            self.hparams.milestones, self.hparams.gamma, self.hparams.warmup_steps, self.hparams.warmup_factor
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _images(self, batch: Batch) -> torch.Tensor:
        if self.hparams.channels_last:
            return batch.images.contiguous(memory_format=torch.channels_last)
        return batch.images

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self._forward(self._images(batch))
        losses = self.model.losses(out, batch.targets, batch.image_sizes)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            )
        n = len(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=n)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=n)
        return loss

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, batch: Batch) -> list[Detections]:
        out = self._forward(self._images(batch))
        return self.model.predict(out, batch.image_sizes, batch.orig_sizes)

    def on_validation_epoch_start(self) -> None:
        if self.evaluator is not None:
            self.evaluator.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> list[Detections]:
        detections = [d.to("cpu") for d in self.detect(batch)]
        if self.evaluator is not None:
            self.evaluator.process(batch.image_ids, detections)
        return detections

    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None or self.trainer.sanity_checking:
            return
        results = self.evaluator.evaluate()  # gathered over all processes
        self.last_metrics = {task: dict(values) for task, values in (results or {}).items()}
        for task, values in self.last_metrics.items():
            for key, value in values.items():
                # every process holds the same gathered numbers
                self.log(f"val/{task}_{key}", float(value), sync_dist=False)

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: Batch | None, batch_idx: int) -> list[Detections]:
        """The detections of a batch, on the CPU (tensormask-predict; None: a batch whose images
        were all unreadable and skipped)."""
        if batch is None:
            return []
        return [d.to("cpu") for d in self.detect(batch)]
