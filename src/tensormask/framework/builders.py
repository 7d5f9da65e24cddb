"""Build the objects of a run from its config (Hydra `_target_` graphs) and rebuild them from a run folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from tensormask.errors import MissingFileError
from tensormask.framework.checkpoint_io import AtomicCheckpointIO, checkpoint_file, read_checkpoint

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """The objects of a group whose entries each have a `_target_` (callbacks, loggers); null -> []."""
    objects = []
    if not cfg:
        return objects
    for key, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            objects.append(instantiate(node))
    return objects


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The model of ``cfg.model``; a TensorMask backbone's ImageNet weights (``model.backbone.weights``:
    a detectron2 / MSRA ``.pkl`` or a torchvision ``.pth``) are loaded into its ResNet trunk here."""
    import copy

    weights = OmegaConf.select(cfg, "model.backbone.weights", default=None)
    root = copy.deepcopy(cfg)  # the keys below are taken out of a copy; errors keep their "model." paths
    with open_dict(root):
        if OmegaConf.select(root, "model.backbone.weights", default=None) is not None or \
                "weights" in (root.model.get("backbone") or {}):
            del root.model.backbone["weights"]
        # runs saved with model.mode (before the mode files set the model's own keys) still build
        mode = root.model.pop("mode", None) if "mode" in root.model else None
        if mode == "box_only":
            root.model.mask_head = None
        elif mode == "mask_only":
            root.model.box_head = False
    model = instantiate(root.model)
    if weights is not None:
        from tensormask.modeling.detectron2_import import load_backbone_weights

        load_backbone_weights(model.backbone.bottom_up, weights)
    return model


def build_datamodule(cfg: DictConfig, model: torch.nn.Module) -> L.LightningDataModule:
    """The data module, padding and normalising inputs the way `model` expects (its
    `size_divisibility`, `pixel_mean`, `pixel_std`, `input_format`)."""
    kwargs: dict[str, Any] = {"size_divisibility": int(getattr(model, "size_divisibility", 32))}
    if hasattr(model, "pixel_mean"):
        kwargs.update(pixel_mean=list(model.pixel_mean), pixel_std=list(model.pixel_std),
                      bgr=str(getattr(model, "input_format", "RGB")).upper() == "BGR")
    return instantiate(cfg.data, **kwargs)


def build_module(cfg: DictConfig, model: torch.nn.Module, output_dir: str | None = None) -> L.LightningModule:
    """The LightningModule around `model`; the evaluator writes its COCO results JSON to `output_dir`."""
    module_cfg = OmegaConf.to_container(cfg.module, resolve=True)
    if output_dir is not None and isinstance(module_cfg.get("evaluator"), dict):
        module_cfg["evaluator"]["output_dir"] = str(output_dir)
    # plain lists and dicts (no OmegaConf containers) reach the module: its hyper-parameters go into
    # checkpoints, which must load with torch.load(weights_only=True)
    return instantiate(module_cfg, model=model, global_batch_size=int(cfg.data.global_batch_size), _convert_="all")


def build_trainer(cfg: DictConfig, *, callbacks: list[Any] | None = None, loggers: list[Any] | bool = False,
                  **overrides: Any) -> L.Trainer:
    """The Trainer of ``cfg.trainer``. With ``trainer.enable_progress_bar=false`` the progress-bar callbacks
    (callbacks/progress_bar) are left out, rather than Lightning refusing the pair."""
    callbacks = list(callbacks or [])
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()],
                       **overrides)


def save_run_config(cfg: DictConfig, directory: str | Path) -> Path:
    """The resolved config beside the checkpoints: eval and predict rebuild the model from it."""
    from tensormask.framework.checkpoint_io import atomic_write_bytes

    path = Path(directory) / CONFIG_FILE
    atomic_write_bytes(path, OmegaConf.to_yaml(cfg, resolve=True).encode())
    return path


def find_run_config(checkpoint: str | Path) -> Path | None:
    """config.yaml beside a checkpoint (or in its parent folder)."""
    checkpoint = Path(checkpoint)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return None


def load_model_weights(model: torch.nn.Module, checkpoint: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint's `model.*` weights (or a detectron2 .pkl through the converter)."""
    from tensormask.modeling.detectron2_import import CheckpointMismatch, load_detectron2_checkpoint

    checkpoint = str(checkpoint)
    if checkpoint.endswith(".pkl"):
        try:
            report = load_detectron2_checkpoint(model, checkpoint)
        except CheckpointMismatch as e:
            # the usual cause: the command's model is not the file's (docs/model.md, "detectron2 checkpoints")
            raise CheckpointMismatch(f"{e}\n(a detectron2 file is loaded into the model of this command's config: "
                                     "give the experiment it was trained with, e.g. experiment=r50_1x)") from None
        return {"source": "detectron2", "report": report}
    state = read_checkpoint(checkpoint)  # a damaged file: DamagedCheckpointError naming it
    weights = state.get("state_dict", state)
    weights = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")} or weights
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # names or shapes differ: a model.* override changed the run's network
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        more = f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else ""
        raise CheckpointMismatch(
            f"{checkpoint}: its weights do not fit the model of the config.yaml beside it and the command's "
            "model.* keys (drop a model.* key that changes the network):\n  "
            + "\n  ".join(lines[:8]) + more) from None
    return {"source": "lightning", "global_step": state.get("global_step"), "epoch": state.get("epoch")}


def class_mapping(num_classes: int, stored: dict[str, Any] | None) -> dict[str, list]:
    """A run's classes as a checkpoint stores them (`contiguous_to_coco`, `class_names`); labels 0..K-1
    as COCO ids 1..K named by their ids where the checkpoint has none."""
    stored = stored or {}
    contiguous_to_coco = list(stored.get("contiguous_to_coco", range(1, num_classes + 1)))
    return {"contiguous_to_coco": contiguous_to_coco,
            "class_names": list(stored.get("class_names", [str(c) for c in contiguous_to_coco]))}


def trained_model(ckpt_path: str | Path) -> tuple[Path, DictConfig, torch.nn.Module, dict[str, list]]:
    """The model of a training run's checkpoint (a .ckpt file, or a run folder: `checkpoint_file`),
    rebuilt from the config.yaml beside it and loaded with its weights: (checkpoint file, run config,
    model, `class_mapping`)."""
    ckpt = checkpoint_file(ckpt_path)
    run_config = find_run_config(ckpt)
    if run_config is None:
        raise MissingFileError(f"no config.yaml beside {ckpt}: cannot rebuild the model of this checkpoint")
    run_cfg = OmegaConf.load(run_config)
    model = build_model(run_cfg)
    load_model_weights(model, ckpt)
    stored = read_checkpoint(ckpt, mmap=True).get("classes")  # the mapping only: mmap reads no weights
    return ckpt, run_cfg, model, class_mapping(int(run_cfg.data.num_classes), stored)
