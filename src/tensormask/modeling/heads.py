"""The TensorMask heads: class and box towers (RetinaNet-style) and one class per mask-head design.

Every head is shared across the FPN levels. Mask heads are class-agnostic and split their work in
two steps so that no step ever materialises every window's mask unless asked to:

1. ``forward(features, levels=None) -> MaskPrediction``: the head's own cheap representation per
   (level, window size): natural masks for the natural heads, the aligned tensor for the aligned
   heads (for the bipyramid: at P2 resolution, before swap_align2nat).
2. ``natural_at(pred, level, window, batch_index, ys, xs) -> (D, V*U)``: the natural masks of the
   D chosen windows only (training positives, inference detections), via the sparse ops;
   ``natural_region_at(pred, level, window, b, y, x, (v0, v1, u0, u1))``: one window's mask on a
   block of cells only (inference: the cells inside the image);
   ``natural(pred, level, window) -> (N, V*U, H_k, W_k)``: the dense 4D tensor (tests, analysis, and
   training when the positives are so many that the dense compiled op is cheaper).

The mask of window a at level k always covers the window box (window_sizes[a] * stride_k pixels);
``cells(level, window)`` gives its side V = U in mask cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tensormask import ops


def conv_tower(in_channels: int, channels: int, num_convs: int) -> nn.Sequential:
    """num_convs x (3x3 conv + ReLU); parameters at indices 0, 2, 4, ... (detectron2's layout)."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, 1, 1), nn.ReLU()]
    return nn.Sequential(*layers)


def init_normal(module: nn.Module, std: float = 0.01) -> None:
    """Head initialisation of the reference: conv weights N(0, std), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)


class ClassHead(nn.Module):
    """Class tower + 3x3 predictor: per level (N, A*K, H_k, W_k) logits, channel a*K + k.

    Args:
        in_channels: FPN channels. num_classes: K. num_windows: A (window sizes per position).
        channels, num_convs: tower width and depth (paper: 256, 4). prior_prob: initial foreground
        probability (bias = -log((1 - p) / p)).
    """

    def __init__(self, in_channels: int = 256, num_classes: int = 80, num_windows: int = 2, channels: int = 256,
                 num_convs: int = 4, prior_prob: float = 0.01):
        super().__init__()
        self.num_classes, self.num_windows = num_classes, num_windows
        self.subnet = conv_tower(in_channels, channels, num_convs)
        self.score = nn.Conv2d(channels if num_convs else in_channels, num_windows * num_classes, 3, 1, 1)
        init_normal(self)
        nn.init.constant_(self.score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [self.score(self.subnet(x)) for x in features]


class BoxHead(nn.Module):
    """Box tower + 3x3 predictor: per level (N, A*4, H_k, W_k) deltas (dx, dy, dw, dh), channel a*4 + j."""

    def __init__(self, in_channels: int = 256, num_windows: int = 2, channels: int = 128, num_convs: int = 4):
        super().__init__()
        self.subnet = conv_tower(in_channels, channels, num_convs)
        self.pred = nn.Conv2d(channels if num_convs else in_channels, num_windows * 4, 3, 1, 1)
        init_normal(self)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [self.pred(self.subnet(x)) for x in features]


@dataclass
class MaskPrediction:
    """A mask head's raw output. raw[level][window]: (N, C, H, W) in the head's representation
    (see the head's docstring), or None for a level that was not computed."""

    raw: list[list[Tensor | None]]
    # derived tensors reused across calls at inference (e.g. pad-bordered aligned tensors)
    cache: dict = field(default_factory=dict, repr=False)


class MaskHead(nn.Module):
    """Common part of every mask-head design: the mask tower (shared across levels) and one 1x1
    predictor per window size.

    Args:
        in_channels: FPN channels. window_sizes: window sides in cells at the level's unit
        (paper: 11 and 15). num_levels: FPN levels (P2-P7 = 6). channels, num_convs: tower width
        and depth (paper: 128, 4). pad_val: value of the taps outside the aligned tensor.
    """

    def __init__(self, in_channels: int = 256, window_sizes: tuple[int, ...] = (11, 15), num_levels: int = 6,
                 channels: int = 128, num_convs: int = 4, pad_val: float = -6.0):
        super().__init__()
        self.window_sizes = tuple(int(s) for s in window_sizes)
        self.num_levels = num_levels
        self.pad_val = pad_val
        self.tower = conv_tower(in_channels, channels, num_convs)
        self.tower_channels = channels if num_convs else in_channels
        self.predictors = nn.ModuleList(
            [nn.Conv2d(self.tower_channels, self.predicted_cells(s) ** 2, 1) for s in self.window_sizes]
        )
        init_normal(self)

    # --- geometry --------------------------------------------------------------------------
    def predicted_cells(self, window_size: int) -> int:
        """Side of the predicted (pre-upscaling) cell grid for a window of ``window_size`` cells."""
        return window_size

    def cells(self, level: int, window: int) -> int:
        """Side V = U of the natural mask of window ``window`` at ``level``."""
        return self.window_sizes[window]

    # --- forward ---------------------------------------------------------------------------
    def forward(self, features: list[Tensor], levels: list[int] | None = None) -> MaskPrediction:
        """features: P2.. (N, C, H_k, W_k). levels: compute only these (all by default)."""
        wanted = range(len(features)) if levels is None else levels
        raw: list[list[Tensor | None]] = [[None] * len(self.window_sizes) for _ in features]
        for level in wanted:
            tower = self.tower(features[level])
            for a, predictor in enumerate(self.predictors):
                raw[level][a] = predictor(tower)
        return MaskPrediction(raw)

    def natural(self, pred: MaskPrediction, level: int, window: int) -> Tensor:
        raise NotImplementedError

    def natural_at(self, pred: MaskPrediction, level: int, window: int, batch_index: Tensor, ys: Tensor,
                   xs: Tensor) -> Tensor:
        raise NotImplementedError

    def natural_region_at(self, pred: MaskPrediction, level: int, window: int, batch_index: int, y: int, x: int,
                          region: tuple[int, int, int, int]) -> Tensor:
        """The natural mask of ONE window restricted to cells [v0, v1) x [u0, u1): (v1 - v0, u1 - u0).

        Inference asks only for the cells that land in the image (large windows reach far outside).
        """
        cells = self.cells(level, window)
        dev = pred.raw[level][window].device
        t = lambda i: torch.tensor([i], device=dev)  # noqa: E731
        full = self.natural_at(pred, level, window, t(batch_index), t(y), t(x)).view(cells, cells)
        v0, v1, u0, u1 = region
        return full[v0:v1, u0:u1]

    def extra_repr(self) -> str:
        return f"window_sizes={self.window_sizes}, num_levels={self.num_levels}"


class SimpleNaturalMaskHead(MaskHead):
    """Table 1 "natural": the 1x1 conv's V*U outputs are read directly as the natural mask.

    raw[level][a]: (N, S*S, H_k, W_k) natural logits, S = window_sizes[a] cells of unit stride_k.
    """

    def natural(self, pred, level, window):
        return pred.raw[level][window]

    def natural_at(self, pred, level, window, batch_index, ys, xs):
        return pred.raw[level][window][batch_index, :, ys, xs]


class SimpleAlignedMaskHead(MaskHead):
    """Table 1 "aligned": the same outputs read as the aligned representation, then align2nat
    (alpha = 1, an exact shift).

    raw[level][a]: (N, S*S, H_k, W_k) aligned logits.
    """

    def natural(self, pred, level, window):
        return ops.swap_align2nat(pred.raw[level][window], 1, pad_val=self.pad_val)

    def natural_at(self, pred, level, window, batch_index, ys, xs):
        return ops.swap_align2nat_at(pred.raw[level][window], 1, batch_index, ys, xs, pad_val=self.pad_val)


class _UpscalingMaskHead(MaskHead):
    """Predict s = round(S / lambda) cells per side and upsample the VU axes to S (Table 2a/2b).

    The effective factor is S / s (exactly lambda for the paper's 15x15 windows and lambda 1.5, 3, 5).
    """

    def __init__(self, in_channels: int = 256, window_sizes: tuple[int, ...] = (15,), num_levels: int = 6,
                 channels: int = 128, num_convs: int = 4, lambda_val: float = 3.0, interpolation: str = "bilinear",
                 pad_val: float = -6.0):
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        if lambda_val < 1:
            raise ValueError(f"lambda_val must be >= 1, got {lambda_val}")
        self.lambda_val = float(lambda_val)
        self.interpolation = interpolation
        super().__init__(in_channels, window_sizes, num_levels, channels, num_convs, pad_val)

    def predicted_cells(self, window_size: int) -> int:
        return max(1, round(window_size / self.lambda_val))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lambda_val={self.lambda_val}, interpolation={self.interpolation!r}"


class UpscalingNaturalMaskHead(_UpscalingMaskHead):
    """Upscaling in the natural representation: s x s natural cells interpolated to S x S.

    raw[level][a]: (N, s*s, H_k, W_k) natural logits at the coarse cell grid.
    """

    def _upsample(self, coarse: Tensor, window: int) -> Tensor:
        """(D, s*s) -> (D, S*S)."""
        size, s = self.window_sizes[window], self.predicted_cells(self.window_sizes[window])
        grid = coarse.reshape(-1, 1, s, s)
        kwargs = {"align_corners": False} if self.interpolation == "bilinear" else {}
        return F.interpolate(grid, size=(size, size), mode=self.interpolation, **kwargs).reshape(-1, size * size)

    def natural(self, pred, level, window):
        x = pred.raw[level][window]
        n, c, h, w = x.shape
        up = self._upsample(x.permute(0, 2, 3, 1).reshape(-1, c), window)  # (N*H*W, S*S)
        return up.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def natural_at(self, pred, level, window, batch_index, ys, xs):
        return self._upsample(pred.raw[level][window][batch_index, :, ys, xs], window)


class UpscalingAlignedMaskHead(_UpscalingMaskHead):
    """Upscaling in the aligned representation (up_align2nat, eq. (5)); with nearest interpolation
    this is InstanceFCN (appendix A.2).

    raw[level][a]: (N, s*s, H_k, W_k) aligned logits whose cells are S/s natural cells wide.
    """

    def _lambda(self, window: int) -> float:
        """The effective upscaling factor S / s of window ``window``."""
        size = self.window_sizes[window]
        return size / self.predicted_cells(size)

    def natural(self, pred, level, window):
        size = self.window_sizes[window]
        return ops.up_align2nat(pred.raw[level][window], self._lambda(window), (size, size), self.pad_val,
                                self.interpolation)

    def natural_at(self, pred, level, window, batch_index, ys, xs):
        size = self.window_sizes[window]
        return ops.up_align2nat_at(pred.raw[level][window], self._lambda(window), (size, size), batch_index, ys, xs,
                                   self.pad_val, self.interpolation)


class BipyramidMaskHead(MaskHead):
    """The tensor bipyramid (Table 2c): level k holds (2^k S) x (2^k S) masks of P2-sized cells.

    Every level's tower output is upsampled bilinearly by 2^k to P2 resolution, cropped, added to
    the P2 tower output and passed through one shared 3x3 fuse conv (+ ReLU); the per-window 1x1
    predictor then gives the aligned tensor at P2 resolution, and swap_align2nat(lambda = 2^k)
    turns it into natural masks on the level-k grid.

    raw[level][a]: (N, S*S, H_2, W_2) aligned logits at P2 resolution.
    """

    def __init__(self, in_channels: int = 256, window_sizes: tuple[int, ...] = (11, 15), num_levels: int = 6,
                 channels: int = 128, num_convs: int = 4, pad_val: float = -6.0):
        super().__init__(in_channels, window_sizes, num_levels, channels, num_convs, pad_val)
        self.fuse = nn.Sequential(nn.Conv2d(self.tower_channels, self.tower_channels, 3, 1, 1), nn.ReLU())
        init_normal(self.fuse)

    def cells(self, level: int, window: int) -> int:
        return self.window_sizes[window] * 2**level

    def forward(self, features: list[Tensor], levels: list[int] | None = None) -> MaskPrediction:
        wanted = range(len(features)) if levels is None else sorted(set(levels))
        raw: list[list[Tensor | None]] = [[None] * len(self.window_sizes) for _ in features]
        if len(wanted) == 0:
            return MaskPrediction(raw)
        finest = self.tower(features[0])  # (N, C, H2, W2)
        h2, w2 = finest.shape[-2:]
        for level in wanted:
            if level == 0:
                up = finest
            else:
                up = F.interpolate(self.tower(features[level]), scale_factor=2.0**level, mode="bilinear",
                                   align_corners=False)
                if torch.compiler.is_exporting():
                    # the same crop as a copy: a view's strides would tie the exported graph to one input size
                    up = up.index_select(2, torch.arange(h2, device=up.device))
                    up = up.index_select(3, torch.arange(w2, device=up.device))
                else:
                    up = up[:, :, :h2, :w2]
            fused = self.fuse(up + finest)
            for a, predictor in enumerate(self.predictors):
                raw[level][a] = predictor(fused)
        return MaskPrediction(raw)

    def natural(self, pred, level, window):
        return ops.swap_align2nat(pred.raw[level][window], 2**level, pad_val=self.pad_val)

    def natural_region_at(self, pred, level, window, batch_index, y, x, region):
        """swap_align2nat(lambda = 2^level) at one window, only on cells [v0, v1) x [u0, u1)."""
        cache = pred.cache.setdefault(("swap_region", level, window), {})
        return ops.swap_align2nat_region(pred.raw[level][window], 2**level, batch_index, y, x, region,
                                         pad_val=self.pad_val, cache=cache)

    def natural_at(self, pred, level, window, batch_index, ys, xs):
        return ops.swap_align2nat_at(pred.raw[level][window], 2**level, batch_index, ys, xs, pad_val=self.pad_val)

