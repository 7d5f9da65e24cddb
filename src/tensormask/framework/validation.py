"""Config validation: a wrong value is reported with its key and what is allowed, before any work."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tensormask.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


_MISSING = object()


def _get(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    return node


def _choice(*allowed: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of " + ", ".join(map(str, allowed))

    return check


def _int(lo: int | None = None, hi: int | None = None, none_ok: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is None and none_ok:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be an integer" + (" or null" if none_ok else "") + _range_text(lo, hi)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return "must be an integer" + _range_text(lo, hi)
        return None

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "must be a number" + _range_text(lo, hi, lo_open)
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            return "must be a number" + _range_text(lo, hi, lo_open)
        return None

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _int_list(lo: int = 0) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, Sequence) or isinstance(v, str) or not v:
            return f"must be an integer or a non-empty list of integers >= {lo}"
        if any(isinstance(x, bool) or not isinstance(x, int) or x < lo for x in v):
            return f"must be an integer or a non-empty list of integers >= {lo}"
        return None

    return check


def _range_text(lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


PRECISIONS = ("32-true", "32", 32, "bf16-mixed", "16-mixed", "bf16-true", "64-true", "64", 64)
MODES = ("full", "box_only", "mask_only")
NMS_BOXES = ("bb", "mask-bb", None)
NORMS = ("FrozenBN", "GN", "BN")
DEPTHS = (18, 34, 50, 101)

# key -> check; keys absent from a config (e.g. TensorMask keys under a baseline model) are skipped
RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": _int(0, none_ok=True),
    "train": _bool,
    "evaluate": _bool,
    "mode": _choice(*MODES),
    "model.mode": _choice(*MODES),
    "model.nms_boxes": _choice(*NMS_BOXES),
    "model.num_classes": _int(1),
    "model.backbone.depth": _choice(*DEPTHS),
    "model.backbone.norm": _choice(*NORMS),
    "model.backbone.out_channels": _int(1),
    "model.backbone.freeze_at": _int(0, 5),
    "model.mask_head.lambda_val": _float(1.0),
    "model.mask_head.interpolation": _choice("bilinear", "nearest"),
    "model.depth": _choice(18, 34, 50, 101),
    "model.score_threshold": _float(0.0, 1.0),
    "model.nms_threshold": _float(0.0, 1.0),
    "model.max_detections": _int(1),
    "data.num_classes": _int(1),
    "data.global_batch_size": _int(1),
    "data.eval_batch_size": _int(1),
    "data.num_workers": _int(0),
    "data.max_val_images": _int(1, none_ok=True),
    "data.eval_split": _choice("val", "train"),
    "data.train_transforms.min_size": _int_list(1),
    "data.train_transforms.max_size": _int(1),
    "data.train_transforms.flip_prob": _float(0.0, 1.0),
    "data.train_transforms.min_size_mode": _choice("choice", "range"),
    "data.test_transforms.min_size": _int_list(1),
    "data.test_transforms.max_size": _int(1),
    "data.synthetic.num_train": _int(1),
    "data.synthetic.num_val": _int(1),
    "data.synthetic.num_classes": _int(1, 8),
    "data.synthetic.image_size": _int_list(32),
    "module.base_lr": _float(0.0, lo_open=True),
    "module.base_batch_size": _int(1),
    "module.warmup_steps": _int(0),
    "module.warmup_factor": _float(0.0, 1.0),
    "module.gamma": _float(0.0, 1.0),
    "module.weight_decay": _float(0.0),
    "module.compile": _bool,
    "module.channels_last": _bool,
    "module.milestones": lambda v: None if isinstance(v, Sequence) and all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in v) else "must be a list of step numbers >= 0",
    "module.evaluator.backend": _choice("pycocotools", "faster_coco_eval"),
    "trainer.max_steps": _int(1),
    "trainer.precision": _choice(*PRECISIONS),
    "trainer.accelerator": _choice("cpu", "gpu", "cuda", "mps", "auto"),
    "trainer.num_nodes": _int(1),
    "trainer.gradient_clip_val": lambda v: None if v is None else _float(0.0, lo_open=True)(v),
    "trainer.gradient_clip_algorithm": _choice("norm", "value", None),
    "trainer.accumulate_grad_batches": _int(1),
    "trainer.val_check_interval": _int(1, none_ok=True),
    "callbacks.model_checkpoint.every_n_train_steps": _int(1, none_ok=True),
}


def validate_config(cfg: DictConfig) -> None:
    """Check every known key present in `cfg`; raise ConfigError listing all the problems."""
    problems = []
    for key, check in RULES.items():
        value = _get(cfg, key)
        if value is _MISSING:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        message = check(value)
        if message:
            problems.append(f"{key}={value!r}: {message}")
    batch = _get(cfg, "data.global_batch_size")
    devices = _get(cfg, "trainer.devices")
    nodes = _get(cfg, "trainer.num_nodes")
    if isinstance(batch, int) and isinstance(devices, int) and devices > 0:
        world = devices * (nodes if isinstance(nodes, int) and nodes > 0 else 1)
        if batch % world:
            problems.append(
                f"data.global_batch_size={batch}: must be divisible by the number of processes "
                f"(trainer.devices x trainer.num_nodes = {world})"
            )
    model_classes, data_classes = _get(cfg, "model.num_classes"), _get(cfg, "data.num_classes")
    if isinstance(model_classes, int) and isinstance(data_classes, int) and model_classes != data_classes:
        problems.append(f"model.num_classes={model_classes}: must equal data.num_classes={data_classes}")
    target = str(_get(cfg, "model._target_") or "")
    mode = _get(cfg, "mode")
    if "baselines" in target and mode not in (_MISSING, "full"):
        problems.append(f"mode={mode!r}: the modes apply to TensorMask only; torchvision baselines take mode=full")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
