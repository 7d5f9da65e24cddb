"""Weights from elsewhere: detectron2 TensorMask checkpoints, detectron2/Caffe2 ImageNet ResNets
(``R-50.pkl``) and torchvision ResNet state dicts.

detectron2 names (its projects/TensorMask; docs/model.md) map onto this package's modules as follows:

    backbone.bottom_up.stem.conv1[.norm]          -> backbone.bottom_up.conv1 / bn1
    backbone.bottom_up.res{s}.{i}.conv{j}[.norm]  -> backbone.bottom_up.layer{s-1}.{i}.conv{j} / bn{j}
    backbone.bottom_up.res{s}.{i}.shortcut[.norm] -> backbone.bottom_up.layer{s-1}.{i}.downsample.0 / .1
    backbone.fpn_lateral{l} / fpn_output{l}       -> backbone.lateral_convs.{l-2} / output_convs.{l-2}
    backbone.top_block.p6 / p7                    -> backbone.p6 / p7
    head.cls_subnet.{i} / cls_score               -> class_head.subnet.{i} / class_head.score
    head.bbox_subnet.{i} / bbox_pred              -> box_head.subnet.{i} / box_head.pred
    head.mask_subnet.{i}                          -> mask_head.tower.{i}
    head.mask_pred_{S:02d}                        -> mask_head.predictors.{index of S in window_sizes}
    head.mask_fuse.0                              -> mask_head.fuse.0

Every tensor of the file must be used and every model tensor must be given; anything else is an
error that names the offending tensors. One exception: the model zoo's files (saved in 2019) also
carry ``anchor_generator.cell_anchors.<level>``, the (A, 4) windows detectron2 then saved as
buffers (today's detectron2 drops them on load). They hold no weights: each is checked to equal the
windows this model builds at that level (side S x stride, centred at 0), then dropped.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from tensormask.errors import UserError

DETECTRON2_PIXEL_MEAN = (103.53, 116.28, 123.675)
DETECTRON2_PIXEL_STD = (1.0, 1.0, 1.0)
_METADATA = ("pixel_mean", "pixel_std")
_NORM_FIELDS = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}


class CheckpointMismatch(UserError, KeyError):
    """A checkpoint does not fit the model; the message names the file and the tensors concerned
    (a user's mistake: the entry points print it without a traceback)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class CheckpointReadError(UserError, ValueError):
    """A weights file that cannot be read as a checkpoint (not a pickle / torch file, or not a dict of
    arrays); the message names the file."""


def _names(names: list[str], shown: int = 12) -> str:
    """A list of tensor names for a message: the first `shown`, then how many more."""
    names = sorted(names)
    more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


# ---------------------------------------------------------------------------------------------
# reading files
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: tensor} from a detectron2 / Caffe2 pickle (``{"model": ...}`` or ``{"blobs": ...}``)
    or a torch file (a state dict, or ``{"model": state_dict}`` / ``{"state_dict": ...}``)."""
    path = os.fspath(path)
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data: Any = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the file holds, the user named the wrong one
        kind = "detectron2 / Caffe2 pickle" if path.endswith(".pkl") else "torch file"
        raise CheckpointReadError(f"{path}: not a readable {kind} ({type(e).__name__}: {str(e).strip()[:200]})") from e
    for key in ("model", "blobs", "state_dict"):
        if isinstance(data, dict) and key in data and isinstance(data[key], dict):
            data = data[key]
            break
    if not isinstance(data, dict):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    out = {}
    for name, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise CheckpointReadError(f"{path}: entry {name!r} is a {type(value).__name__}, not an array")
        out[name] = value
    return out


def _assign(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` requiring an exact match of names and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"names the model does not have: {_names(unexpected)}")
        if missing:
            parts.append(f"model tensors the file does not provide: {_names(missing)}")
        raise CheckpointMismatch(f"{source}: " + "; ".join(parts))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        raise CheckpointMismatch(f"{source}: shape mismatch for {wrong[:12]}"
                                 f"{f' ... and {len(wrong) - 12} more' if len(wrong) > 12 else ''}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# ResNet trunk names
_D2_RESNET = re.compile(r"^(?:stem\.conv1|res(\d)\.(\d+)\.(conv[123]|shortcut))(?:\.norm)?\.(\w+)$")


def _d2_resnet_name(name: str) -> str | None:
    """detectron2 ResNet name (relative to bottom_up) -> this package's ResNet name, or None."""
    m = _D2_RESNET.match(name)
    if m is None:
        return None
    stage, block, conv, field = m.groups()
    is_norm = ".norm." in name
    if stage is None:  # the stem
        return f"{'bn1' if is_norm else 'conv1'}.{field}"
    prefix = f"layer{int(stage) - 1}.{block}"
    if conv == "shortcut":
        return f"{prefix}.downsample.{1 if is_norm else 0}.{field}"
    j = conv[-1]
    return f"{prefix}.{'bn' + j if is_norm else 'conv' + j}.{field}"


_C2_NORM = {"_bn_s": "norm.weight", "_bn_b": "norm.bias", "_bn_rm": "norm.running_mean", "_bn_riv": "norm.running_var"}
_C2_BRANCH = {"branch1": "shortcut", "branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3"}


def _c2_to_d2_resnet_name(name: str) -> str | None:
    """Caffe2/Detectron1 blob name (MSRA R-50.pkl) -> detectron2 ResNet name, or None."""
    if name == "conv1_w":
        return "stem.conv1.weight"
    if name == "conv1_b":
        return "stem.conv1.bias"
    m = re.match(r"^res_conv1(_bn_s|_bn_b|_bn_rm|_bn_riv)$", name)
    if m:
        return "stem.conv1." + _C2_NORM[m.group(1)]
    m = re.match(r"^res(\d)_(\d+)_(branch1|branch2a|branch2b|branch2c)(_w|_b|_bn_s|_bn_b|_bn_rm|_bn_riv)$", name)
    if m:
        stage, block, branch, suffix = m.groups()
        field = {"_w": "weight", "_b": "bias"}.get(suffix) or _C2_NORM[suffix]
        return f"res{stage}.{block}.{_C2_BRANCH[branch]}.{field}"
    return None


def _fill_frozen_stats(resnet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Files with only the affine BN part (MSRA R-50.pkl) leave FrozenBN statistics at their
    identity values (mean 0, var 1 - eps) so the layer is exactly weight * x + bias."""
    own = resnet.state_dict()
    for name in own:
        if name.endswith((".running_mean", ".running_var")) and name not in state:
            affine = name.rsplit(".", 1)[0] + ".weight"
            if affine in state:
                state[name] = own[name].clone()


def load_backbone_weights(resnet: nn.Module, path: str | os.PathLike) -> None:
    """Load ImageNet weights into a :class:`~tensormask.modeling.backbone.ResNet`.

    ``.pkl`` files are read as detectron2 / Caffe2 (MSRA ``R-50.pkl``: BGR input, pixel mean
    [103.53, 116.28, 123.675], std 1, stride in the 1x1 conv -> use ``stride_in_1x1=True``); other
    files as torchvision ResNet state dicts (RGB input, ImageNet mean/std, ``stride_in_1x1=False``).
    Classifier weights (``fc``) are skipped; any other unknown or missing tensor is an error.
    """
    raw = read_checkpoint(path)
    state: dict[str, torch.Tensor] = {}
    unknown = []
    if os.fspath(path).endswith(".pkl"):
        for name, value in raw.items():
            if name.startswith(("fc", "pred")) or name.endswith("_momentum"):
                continue
            d2 = _c2_to_d2_resnet_name(name) or name.removeprefix("backbone.bottom_up.")
            ours = _d2_resnet_name(d2)
            if ours is None:
                unknown.append(name)
            else:
                state[ours] = value
    else:
        for name, value in raw.items():
            if name.startswith("fc.") or name.endswith("num_batches_tracked"):
                continue
            state[name] = value
    if unknown:
        raise CheckpointMismatch(f"{path}: tensors with no place in a ResNet: {_names(unknown)}")
    if any(isinstance(m, nn.GroupNorm) for m in resnet.modules()) and any("running_mean" in k for k in state):
        raise CheckpointReadError(f"{path} holds BatchNorm weights; build the backbone with norm='FrozenBN' or 'BN' "
                                  "(model.backbone.norm) to load it")
    own = resnet.state_dict()
    for name in list(own):  # plain BN keeps a counter the files do not need to carry
        if name.endswith("num_batches_tracked"):
            state[name] = own[name]
    _fill_frozen_stats(resnet, state)
    _assign(resnet, state, os.fspath(path))


# ---------------------------------------------------------------------------------------------
# full TensorMask checkpoints
def detectron2_to_tensormask_name(name: str, window_sizes: tuple[int, ...]) -> str:
    """One detectron2 TensorMask parameter name -> this package's name (KeyError naming it if unknown)."""
    if name.startswith("backbone.bottom_up."):
        ours = _d2_resnet_name(name.removeprefix("backbone.bottom_up."))
        if ours is not None:
            return "backbone.bottom_up." + ours
    m = re.match(r"^backbone\.fpn_(lateral|output)([2-5])\.(weight|bias)$", name)
    if m:
        kind, level, field = m.groups()
        return f"backbone.{kind}_convs.{int(level) - 2}.{field}"
    m = re.match(r"^backbone\.top_block\.(p6|p7)\.(weight|bias)$", name)
    if m:
        return f"backbone.{m.group(1)}.{m.group(2)}"
    m = re.match(r"^head\.(cls_subnet|bbox_subnet|mask_subnet)\.(\d+)\.(weight|bias)$", name)
    if m:
        module = {"cls_subnet": "class_head.subnet", "bbox_subnet": "box_head.subnet", "mask_subnet": "mask_head.tower"}
        return f"{module[m.group(1)]}.{m.group(2)}.{m.group(3)}"
    m = re.match(r"^head\.(cls_score|bbox_pred)\.(weight|bias)$", name)
    if m:
        return f"{'class_head.score' if m.group(1) == 'cls_score' else 'box_head.pred'}.{m.group(2)}"
    m = re.match(r"^head\.mask_pred_(\d+)\.(weight|bias)$", name)
    if m and int(m.group(1)) in window_sizes:
        return f"mask_head.predictors.{window_sizes.index(int(m.group(1)))}.{m.group(2)}"
    m = re.match(r"^head\.mask_fuse\.0\.(weight|bias)$", name)
    if m:
        return f"mask_head.fuse.0.{m.group(1)}"
    raise CheckpointMismatch(f"detectron2 tensor {name!r} has no counterpart in this TensorMask")


def expected_cell_anchors(window_sizes: tuple[int, ...], stride: int) -> torch.Tensor:
    """The windows of one level as detectron2 saved them: (A, 4) boxes (x0, y0, x1, y1) centred at 0,
    side S * stride for each window size S (e.g. P2: 44 and 60 px)."""
    half = torch.tensor([s * stride / 2 for s in window_sizes], dtype=torch.float64)
    return torch.stack([-half, -half, half, half], dim=1)


def _check_cell_anchors(name: str, value: torch.Tensor, window_sizes: tuple[int, ...],
                        strides: tuple[int, ...]) -> None:
    level = int(name.rsplit(".", 1)[1])
    if level >= len(strides):
        raise CheckpointMismatch(f"detectron2 tensor {name!r}: level {level}, but this TensorMask has "
                                 f"{len(strides)} levels")
    expected = expected_cell_anchors(window_sizes, strides[level])
    got = torch.as_tensor(value, dtype=torch.float64).reshape(-1, 4)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-3):
        raise CheckpointMismatch(f"detectron2 tensor {name!r} = {got.tolist()} differs from this TensorMask's "
                                 f"windows at level {level} (stride {strides[level]}): {expected.tolist()}")


def convert_detectron2_state(d2_state: dict[str, torch.Tensor], window_sizes: tuple[int, ...] = (11, 15),
                             strides: tuple[int, ...] = (4, 8, 16, 32, 64, 128),
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """detectron2 TensorMask {name: tensor} -> (this package's state dict, metadata such as pixel_mean).

    2019 files' ``anchor_generator.cell_anchors.<level>`` are checked against the windows of
    `window_sizes` at `strides` and dropped. Raises :class:`CheckpointMismatch` listing every name it
    cannot place.
    """
    state, meta, unknown = {}, {}, []
    for name, value in d2_state.items():
        if name in _METADATA:
            meta[name] = value
            continue
        if re.match(r"^anchor_generator\.cell_anchors\.\d+$", name):
            _check_cell_anchors(name, value, tuple(window_sizes), tuple(strides))
            continue
        try:
            state[detectron2_to_tensormask_name(name, tuple(window_sizes))] = value
        except CheckpointMismatch:
            unknown.append(name)
    if unknown:
        raise CheckpointMismatch(f"detectron2 tensors with no counterpart in this TensorMask: {_names(unknown)}")
    return state, meta


def build_detectron2_tensormask(path: str | os.PathLike | None = None, num_classes: int = 80, depth: int = 50,
                                window_sizes: tuple[int, ...] = (11, 15), **model_kwargs):
    """The reference R-50-FPN tensor-bipyramid TensorMask (frozen BN, stride in 1x1, "avg" FPN,
    BGR input with pixel mean [103.53, 116.28, 123.675] and std 1), optionally loaded from an
    official detectron2 checkpoint ``path`` (``model_final_*.pkl``)."""
    from .backbone import ResNetFPN
    from .heads import BipyramidMaskHead
    from .tensormask import TensorMask

    backbone = ResNetFPN(depth=depth, norm="FrozenBN", stride_in_1x1=True, freeze_at=2, fuse_type="avg")
    head = BipyramidMaskHead(backbone.out_channels, window_sizes, len(backbone.strides))
    model_kwargs.setdefault("pixel_mean", DETECTRON2_PIXEL_MEAN)
    model_kwargs.setdefault("pixel_std", DETECTRON2_PIXEL_STD)
    model_kwargs.setdefault("input_format", "BGR")
    model = TensorMask(backbone, head, num_classes=num_classes, window_sizes=window_sizes, **model_kwargs)
    if path is not None:
        load_detectron2_checkpoint(model, path)
    return model


def load_detectron2_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """Load a detectron2 TensorMask checkpoint into ``model``; returns the file's metadata
    (pixel_mean / pixel_std when present, which must match the model's)."""
    if isinstance(path_or_state, dict):  # numpy arrays (a pickle's "model" dict) or tensors
        d2_state = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                    for k, v in path_or_state.items()}
    else:
        d2_state = read_checkpoint(path_or_state)
    source = "detectron2 checkpoint" if isinstance(path_or_state, dict) else os.fspath(path_or_state)
    try:
        state, meta = convert_detectron2_state(d2_state, tuple(model.window_sizes), tuple(model.strides))
    except CheckpointMismatch as e:
        raise CheckpointMismatch(f"{source}: {e}") from None
    for key, attr in (("pixel_mean", "pixel_mean"), ("pixel_std", "pixel_std")):
        if key in meta:
            values = tuple(float(v) for v in meta[key].flatten())
            if not np.allclose(values, getattr(model, attr)):
                raise CheckpointMismatch(f"{source}: {key}={values} but the model expects {getattr(model, attr)}")
    own = model.state_dict()
    for name in own:
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = own[name]
    _assign(model, state, source)
    return meta
