"""ImageNet initialisation: one folder (`imagenet_weights`) for every model, and the guard that
keeps a frozen-BN / frozen-stage recipe from training a random network (docs/model.md "ImageNet weights").

The folder holds detectron2's MSRA files for the TensorMask backbones (`R-50.pkl`, `R-101.pkl`,
BGR caffe-style, as every detectron2 TensorMask config starts from) and torchvision's ResNet files
for the torchvision baselines (`resnet50-<hash>.pth`, `resnet101-<hash>.pth` as torchvision
downloads them, or plain `resnet50.pth`). The model configs pick their file by depth through the
`tm.imagenet_file` resolver, so `imagenet_weights=/dir` serves TensorMask and baseline rows alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tensormask.errors import UserError

KINDS = ("msra", "torchvision")


def imagenet_file(folder: Any, kind: str, depth: Any) -> str | None:
    """The ImageNet weights file of a ResNet-`depth` in `folder` (None: no folder given).

    kind "msra": `<folder>/R-<depth>.pkl`; kind "torchvision": the one `resnet<depth>-*.pth` (or
    `resnet<depth>.pth`) in the folder. The path is returned even when it does not exist (a glob
    pattern when no single torchvision file matches): `check_pretrained` reports it, naming the key.
    """
    if folder is None or str(folder) == "":
        return None
    if kind not in KINDS:
        raise ValueError(f"tm.imagenet_file: kind must be one of {KINDS}, got {kind!r}")
    root = Path(str(folder)).expanduser()
    depth = int(depth)
    if kind == "msra":
        return str(root / f"R-{depth}.pkl")
    matches = sorted({*root.glob(f"resnet{depth}-*.pth"), *root.glob(f"resnet{depth}.pth")}) if root.is_dir() else []
    return str(matches[0]) if len(matches) == 1 else str(root / f"resnet{depth}-*.pth")


def _weights_entry(model: DictConfig) -> tuple[str, Any, list[str], str] | None:
    """(key of the weights, its raw value, why the recipe needs weights, file expected) of a model config."""
    backbone = model.get("backbone")
    if isinstance(backbone, DictConfig) and "weights" in backbone:
        why = []
        if backbone.get("norm") == "FrozenBN":
            why.append("model.backbone.norm=FrozenBN")
        if int(backbone.get("freeze_at") or 0) > 0:
            why.append(f"model.backbone.freeze_at={backbone.freeze_at}")
        raw = OmegaConf.to_container(backbone, resolve=False)["weights"]
        return "model.backbone.weights", raw, why, f"R-{backbone.get('depth')}.pkl"
    if "weights_backbone" in model:
        why = []
        if model.get("norm") == "FrozenBN":
            why.append("model.norm=FrozenBN")
        if int(model.get("trainable_layers", 5)) < 5:
            why.append(f"model.trainable_layers={model.trainable_layers}")
        raw = OmegaConf.to_container(model, resolve=False)["weights_backbone"]
        return "model.weights_backbone", raw, why, f"resnet{model.get('depth')}-*.pth"
    return None


def _is_file_path(value: str) -> bool:
    # torchvision baselines also take a weights enum name ("DEFAULT", "IMAGENET1K_V2"): not a path
    return "/" in value or value.endswith((".pkl", ".pth", ".pt"))


def check_pretrained(cfg: DictConfig) -> None:
    """Before anything heavy: the ImageNet weights a training run needs are there.

    A recipe with frozen BN or frozen stages (the paper's: FrozenBN, stem + res2 frozen) trains a
    random network into frozen random statistics without them, so it refuses to start unless
    `allow_random_init=true`; a weights file that is named but missing is reported with its key.
    Raises :class:`~tensormask.errors.UserError` with one line naming what is missing and the option.
    """
    folder = cfg.get("imagenet_weights")
    if folder is not None and not Path(str(folder)).expanduser().is_dir():
        raise UserError(f"imagenet_weights={folder}: no such folder (it holds R-50.pkl / R-101.pkl and "
                        f"resnet50-*.pth / resnet101-*.pth; docs/model.md 'ImageNet weights')")
    model = cfg.get("model")
    entry = _weights_entry(model) if isinstance(model, DictConfig) else None
    if entry is None:
        return
    key, raw, why, expected = entry
    from_folder = isinstance(raw, str) and "tm.imagenet_file" in raw
    value = OmegaConf.select(cfg, key)
    if value is None:
        if why and not cfg.get("allow_random_init", False):
            raise UserError(
                f"{' and '.join(why)} need{'s' if len(why) == 1 else ''} ImageNet weights, but none are given: "
                f"set imagenet_weights=<folder with "
                f"{expected}> (or {key}=<file>), or allow_random_init=true to train from random weights")
        return
    if _is_file_path(str(value)) and not Path(str(value)).expanduser().is_file():
        if from_folder:
            raise UserError(f"imagenet_weights={folder}: no {Path(str(value)).name} there ({key} of this model "
                            f"reads it; docs/model.md 'ImageNet weights' lists the files)")
        raise UserError(f"{key}={value}: file not found")
