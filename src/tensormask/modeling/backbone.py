"""ResNet (18/34/50/101) + FPN with levels P2-P7, the TensorMask backbone (the paper's ResNet-FPN; docs/model.md).

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample``) so torchvision state dicts load directly; detectron2 names are mapped in
``detectron2_import.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("FrozenBN", "GN", "BN")

# depth -> (block kind, blocks per stage)
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, never trained).

    ``running_var`` starts at ``1 - eps`` so that a checkpoint holding only the affine scale and
    bias (as MSRA's R-50.pkl does) gives exactly ``y = weight * x + bias``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision BN state dicts carry num_batches_tracked; frozen BN has no use for it
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        # inference-mode batch norm: one fused pass, and the buffers never get gradients
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(norm: str, channels: int, num_groups: int = 32) -> nn.Module:
    """One normalisation layer: "FrozenBN" (pretrained weights), "GN" (from scratch) or "BN"."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(num_groups, channels), channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def projection_shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Module | None:
    """The residual branch's 1x1 projection (+ norm) where the shape changes, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), make_norm(norm, out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str, stride_in_1x1: bool = False):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, channels)
        self.downsample = projection_shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet-50/101). ``stride_in_1x1``: MSRA/detectron2 put the stride in
    the first 1x1 conv; torchvision puts it in the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str, stride_in_1x1: bool = False):
        super().__init__()
        out_channels = channels * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, stride_1x1, bias=False)
        self.bn1 = make_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride_3x3, 1, bias=False)
        self.bn2 = make_norm(norm, channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, 1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        self.downsample = projection_shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet trunk returning C2-C5 (strides 4, 8, 16, 32).

    Args:
        depth: 18, 34, 50 or 101.
        norm: "FrozenBN", "GN" or "BN".
        stride_in_1x1: stride in the first 1x1 conv of bottleneck blocks (MSRA weights).
        freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also freezes stages res2..res{k}.
    """

    def __init__(self, depth: int = 50, norm: str = "FrozenBN", stride_in_1x1: bool = False, freeze_at: int = 0):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(RESNET_SPECS)}")
        kind, blocks = RESNET_SPECS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.norm, self.stride_in_1x1 = depth, norm, stride_in_1x1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, 64)
        in_channels = 64
        self.out_channels: list[int] = []
        for stage, (num_blocks, channels) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = []
            for i in range(num_blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                layers.append(block(in_channels, channels, stride, norm, stride_in_1x1))
                in_channels = channels * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            self.out_channels.append(in_channels)
        self._init_weights()
        self.freeze(freeze_at)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients for the stem (freeze_at >= 1) and stages res2..res{freeze_at}."""
        self.freeze_at = freeze_at
        frozen: list[nn.Module] = []
        if freeze_at >= 1:
            frozen += [self.conv1, self.bn1]
        for stage in range(1, min(freeze_at, 5)):
            frozen.append(getattr(self, f"layer{stage}"))
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        # frozen stages keep their BN statistics too: swap plain BN for frozen BN there
        for name in (["bn1"] if freeze_at >= 1 else []) + [f"layer{s}" for s in range(1, min(freeze_at, 5))]:
            setattr(self, name, convert_frozen_batchnorm(getattr(self, name)))

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (N, 3, H, W) -> [C2 (N, c2, H/4, W/4), C3 (H/8), C4 (H/16), C5 (H/32)]."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outs = []
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
            outs.append(x)
        return outs


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every nn.BatchNorm2d replaced by a FrozenBatchNorm2d holding its values."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = convert_frozen_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's XavierFill, the FPN initialisation of the reference."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResNetFPN(nn.Module):
    """ResNet + FPN producing P2-P7 (strides 4..128), all with ``out_channels`` channels.

    Top-down: P_l = output_l(fuse(lateral_l(C_l), up2(P_{l+1} pre-output))), ``fuse_type`` "avg"
    (the reference: (lateral + upsampled) / 2) or "sum". P6 = 3x3/2 conv on C5, P7 = 3x3/2 conv on
    relu(P6) (RetinaNet's top block).

    Args:
        depth, norm, stride_in_1x1, freeze_at: see :class:`ResNet`.
        out_channels: FPN width (256 in the paper).
        fuse_type: "avg" or "sum".

    ImageNet weights are loaded into the trunk (``bottom_up``) where the model is assembled
    (:func:`tensormask.framework.builders.build_model`, from ``model.backbone.weights``), with
    :func:`~tensormask.modeling.detectron2_import.load_backbone_weights`.
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = False,
        freeze_at: int = 2,
        out_channels: int = 256,
        fuse_type: str = "avg",
    ):
        super().__init__()
        if fuse_type not in ("avg", "sum"):
            raise ValueError(f"fuse_type must be 'avg' or 'sum', got {fuse_type!r}")
        self.bottom_up = ResNet(depth, norm, stride_in_1x1, freeze_at=0)
        self.fuse_type = fuse_type
        self.out_channels = out_channels
        self.strides = (4, 8, 16, 32, 64, 128)
        in_channels = self.bottom_up.out_channels
        self.lateral_convs = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in in_channels])
        self.output_convs = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, 1, 1) for _ in in_channels])
        self.p6 = nn.Conv2d(in_channels[-1], out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in [*self.lateral_convs, *self.output_convs, self.p6, self.p7]:
            c2_xavier_fill(conv)
        self.freeze_at = freeze_at
        self.bottom_up.freeze(freeze_at)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (N, 3, H, W), H and W multiples of 32 -> [P2 (N, C, H/4, W/4), ..., P7 (N, C, ~H/128, ~W/128)]."""
        c2, c3, c4, c5 = self.bottom_up(x)
        laterals = [conv(c) for conv, c in zip(self.lateral_convs, (c2, c3, c4, c5))]
        top_down = laterals[-1]
        outs = [self.output_convs[-1](top_down)]
        for level in range(2, -1, -1):
            up = F.interpolate(top_down, size=laterals[level].shape[-2:], mode="nearest")
            top_down = laterals[level] + up
            if self.fuse_type == "avg":
                top_down = top_down / 2
            outs.insert(0, self.output_convs[level](top_down))
        p6 = self.p6(c5)
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]
