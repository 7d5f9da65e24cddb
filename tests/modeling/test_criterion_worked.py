"""The training criterion on a worked example: two images, three objects of three classes, two
levels (strides 8 and 16) and two window sizes (3 and 5 cells).

Which windows are positive (and for which object) is derived by hand below from the assignment
rule (containment, scale, centrality, uniqueness; the paper's "Label assignment", docs/model.md);
each loss term is then recomputed here from those positives with the formulas written out in this
file (FL* with detectron2's shift 0, L1 on the weighted deltas, foreground-weighted BCE averaged over
a window's cells), reading the head outputs in the documented channel layout (class a*K + k,
box a*4 + j, natural mask v*U + u). A wrong class, box or mask target, an object of another image,
a swapped or missing term, or a wrong normaliser changes at least one of the three numbers.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensormask.framework.lit_module import DetectionLitModule
from tensormask.modeling import SimpleNaturalMaskHead, TensorMask, TensorMaskOutput, assign_windows
from tensormask.modeling.heads import MaskPrediction

STRIDES = (8, 16)
WINDOW_SIZES = (3, 5)  # cells of one unit (the level's stride): 24/40 px at P_a, 48/80 px at P_b
K = 3
GRIDS = ((8, 8), (4, 4))  # 64 x 64 padded batch
IMAGE_SIZES = [(64, 64), (56, 64)]
# (image, box xyxy, label)
OBJECTS = [
    (0, (12.0, 12.0, 28.0, 28.0), 2),  # A: 16 px, centre (20, 20)
    (0, (20.0, 36.0, 60.0, 60.0), 0),  # B: 40 x 24 px, centre (40, 48)
    (1, (34.0, 10.0, 50.0, 26.0), 1),  # C: 16 px, centre (42, 18)
]
# The positives, by hand. min_size = 3 * 8 - 8 = 16; the scale rule keeps windows whose side minus
# unit (16, 32 at level 0; 32, 64 at level 1) is <= max(2 * longer GT side, 16).
#  A (limit 32): level 0, both sizes, at the 4 grid points around (2.5, 2.5) units (distance 0.71);
#    each window contains the box. Level 1, size 0 (48 px): centre (1.25, 1.25) units is within 1 of
#    (1, 1), (2, 1), (1, 2) (0.35, 0.79, 0.79), not (2, 2) (1.06); all three contain the box.
#  B (limit 80): level 0 centre (5, 6) units, distance <= 1 to (5, 6), (4, 6), (6, 6), (5, 5), (5, 7);
#    only the 40 px windows centred at x = 40 can contain its 40 px width: (y, x) = (5, 5), (6, 5),
#    (7, 5). Level 1 centre (2.5, 3): (y, x) = (3, 2), (3, 3) at 0.5; only the 80 px windows contain it.
#  C (limit 32): level 0 centre (5.25, 2.25) units: (y, x) = (2, 5), (2, 6), (3, 5) within 1; the
#    24 px window contains the box only at (2, 5), the 40 px window at all three. Level 1 centre
#    (2.625, 1.125): (1, 3), (1, 2), (2, 3) within 1; the 48 px window contains it at all three.
# No window satisfies the rule for two objects. (image, level, y, x, window size index, object)
POSITIVES = sorted(
    [(0, 0, y, x, a, 0) for y in (2, 3) for x in (2, 3) for a in (0, 1)]
    + [(0, 1, y, x, 0, 0) for y, x in ((1, 1), (1, 2), (2, 1))]
    + [(0, 0, y, 5, 1, 1) for y in (5, 6, 7)]
    + [(0, 1, 3, x, 1, 1) for x in (2, 3)]
    + [(1, 0, 2, 5, 0, 2)] + [(1, 0, y, x, 1, 2) for y, x in ((2, 5), (2, 6), (3, 5))]
    + [(1, 1, y, x, 0, 2) for y, x in ((1, 3), (1, 2), (2, 3))]
)
NUM_POS = 23
ALPHA, GAMMA, SHIFT = 0.3, 3.0, 0.0
POS_WEIGHT, MASK_WEIGHT = 1.5, 2.0


class _Levels(nn.Module):
    """A stand-in backbone: two levels of 8 channels (the criterion never calls it)."""

    out_channels, strides = 8, STRIDES


def _model(**kwargs):
    head = SimpleNaturalMaskHead(in_channels=8, window_sizes=WINDOW_SIZES, num_levels=2, channels=8, num_convs=1)
    return TensorMask(_Levels(), head, num_classes=K, window_sizes=WINDOW_SIZES, class_channels=8, box_channels=8,
                      num_convs=1, **kwargs)


def _targets():
    targets = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        mine = [(box, label) for img, box, label in OBJECTS if img == i]
        masks = torch.zeros(len(mine), h, w, dtype=torch.uint8)
        for m, (box, _) in zip(masks, mine):
            x0, y0, x1, y1 = (int(v) for v in box)
            m[y0:y1, x0:x1] = 1
        targets.append({"boxes": torch.tensor([b for b, _ in mine]), "labels": torch.tensor([lab for _, lab in mine]),
                        "masks": masks})
    return targets


def _output(zero: bool = False):
    g = torch.Generator().manual_seed(11)
    rand = (lambda *s: torch.zeros(*s)) if zero else (lambda *s: torch.randn(*s, generator=g))
    a = len(WINDOW_SIZES)
    logits = [rand(2, a * K, h, w) for h, w in GRIDS]
    deltas = [rand(2, a * 4, h, w) for h, w in GRIDS]
    raw = [[rand(2, s * s, h, w) for s in WINDOW_SIZES] for h, w in GRIDS]
    return TensorMaskOutput([torch.zeros(2, 8, h, w) for h, w in GRIDS], logits, deltas, MaskPrediction(raw))


def _window(level, y, x, a):
    stride, side = STRIDES[level], WINDOW_SIZES[a] * STRIDES[level]
    cx, cy = x * stride, y * stride
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _object(i, gt):
    return [o for o in OBJECTS if o[0] == i][gt]


def _expected(out, positives=POSITIVES):
    """The three losses recomputed from the positives with the formulas of the paper / detectron2."""
    cls_target = [torch.zeros_like(x) for x in out.logits]
    box_sum, mask_sum = 0.0, 0.0
    for i, level, y, x, a, obj in positives:
        _, (bx0, by0, bx1, by1), label = OBJECTS[obj]
        cls_target[level][i, a * K + label, y, x] = 1.0
        wx0, wy0, wx1, wy1 = _window(level, y, x, a)
        ws = wx1 - wx0
        # deltas weighted (1.5, 1.5, 0.75, 0.75), relative to the window
        target = torch.tensor([1.5 * ((bx0 + bx1) / 2 - (wx0 + wx1) / 2) / ws, 1.5 * ((by0 + by1) / 2 - (wy0 + wy1) / 2) / ws,
                               0.75 * math.log((bx1 - bx0) / ws), 0.75 * math.log((by1 - by0) / ws)])
        box_sum += (out.deltas[level][i, 4 * a:4 * a + 4, y, x] - target).abs().sum().item()
        # mask target: a cell is foreground when more than half of it lies in the object (a box)
        s, unit = WINDOW_SIZES[a], STRIDES[level]
        cover = lambda lo, b0, b1: max(0.0, min(lo + unit, b1) - max(lo, b0)) / unit  # noqa: E731
        t = torch.tensor([[float(cover(wy0 + v * unit, by0, by1) * cover(wx0 + u * unit, bx0, bx1) > 0.5)
                           for u in range(s)] for v in range(s)]).flatten()
        z = out.masks.raw[level][a][i, :, y, x]
        bce = POS_WEIGHT * t * F.softplus(-z) + (1 - t) * F.softplus(z)
        mask_sum += MASK_WEIGHT * bce.mean().item()
    cls_sum = 0.0
    for z, t in zip(out.logits, cls_target):
        x_t = torch.where(t > 0, z, -z)
        cls_sum += (-F.logsigmoid(GAMMA * x_t + SHIFT) / GAMMA * torch.where(t > 0, ALPHA, 1 - ALPHA)).sum().item()
    n = len(positives)
    return {"loss_cls": cls_sum / n, "loss_box": box_sum / n, "loss_mask": mask_sum / n}


def test_the_positives_are_the_hand_derived_ones():
    model = _model()
    windows = model.windows(_output())
    found = []
    for i, target in enumerate(_targets()):
        assignment = assign_windows(target["boxes"], windows.boxes, windows.units, scale_thresh=2.0,
                                    min_size=model.min_size, spatial_thresh=1.0)
        first = [o for o, obj in enumerate(OBJECTS) if obj[0] == i][0]
        for m in torch.nonzero(assignment.positive).squeeze(1).tolist():
            found.append((i, int(windows.levels[m]), int(windows.ys[m]), int(windows.xs[m]), int(windows.anchors[m]),
                          first + int(assignment.matched_gt[m])))
    assert model.min_size == 16
    assert sorted(found) == POSITIVES and len(POSITIVES) == NUM_POS


def test_criterion_equals_the_worked_example():
    out = _output()
    got = _model().losses(out, _targets(), IMAGE_SIZES)
    expected = _expected(out)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].item() == pytest.approx(expected[key], rel=1e-5), key


def test_an_image_without_objects_changes_no_other_image_s_targets():
    """Image 0 without its objects: only C's 7 positives remain (one of them alone in its
    (level, window size) group), normalised by 7; an empty image put first shifts nothing."""
    out, targets = _output(), _targets()
    only_c = [{k: v[:0] for k, v in targets[0].items()}, targets[1]]
    got = _model().losses(out, only_c, IMAGE_SIZES)
    expected = _expected(out, [p for p in POSITIVES if p[0] == 1])
    for key in expected:
        assert got[key].item() == pytest.approx(expected[key], rel=1e-5), key
    # three images, the first one empty: the same positives (of images 1 and 2), the same box and mask losses
    pad = lambda x: torch.cat([torch.zeros_like(x[:1]), x])  # noqa: E731
    out3 = TensorMaskOutput([pad(f) for f in out.features], [pad(x) for x in out.logits], [pad(x) for x in out.deltas],
                            MaskPrediction([[pad(r) for r in level] for level in out.masks.raw]))
    got3 = _model().losses(out3, [{k: v[:0] for k, v in targets[0].items()}, *targets], [IMAGE_SIZES[0], *IMAGE_SIZES])
    base = _model().losses(out, targets, IMAGE_SIZES)
    for key in ("loss_box", "loss_mask"):
        assert got3[key].item() == pytest.approx(base[key].item(), rel=1e-6), key


def test_criterion_runs_the_mask_head_when_the_output_has_no_masks():
    """An eval-mode output (masks None): the criterion runs the mask head on the features (all-zero
    features and a fresh head's zero biases give zero mask logits: the numbers of the zero case)."""
    zero = _output(zero=True)
    got = _model().losses(TensorMaskOutput(zero.features, zero.logits, zero.deltas, None), _targets(), IMAGE_SIZES)
    assert got["loss_mask"].item() == pytest.approx(_expected(zero)["loss_mask"], rel=1e-6)


def test_criterion_with_zero_outputs_in_numbers():
    """All outputs 0: FL* = ln 2 / 3 per element (x 0.3 on the 23 positive ones, x 0.7 on the other
    2 * 160 * 3 - 23 = 937); box loss = sum of |target deltas|; mask loss = 2 ln 2 x (share of background
    cells + 1.5 x share of foreground cells) per window."""
    got = _model().losses(_output(zero=True), _targets(), IMAGE_SIZES)
    assert got["loss_cls"].item() == pytest.approx(math.log(2) / 3 * (0.3 * 23 + 0.7 * 937) / 23, rel=1e-6)
    # |target deltas| summed per object and window size (dx, dy: 1.5 x centre offset / side; dw, dh:
    # 0.75 ln(object side / window side)): A 24 px 4 x (0.25 + 0.25 + 2 x 0.30410) = 4.43280,
    # A 40 px 4 x (0.15 + 0.15 + 2 x 0.68722) = 6.69776, A 48 px (0.25, 0.5, 0.5) + 3 x 1.64792 = 6.19376,
    # B 40 px (0.3, 0, 0.3) + 3 x 0.38312 = 1.74936, B 80 px 2 x (0.15 + 0.51986 + 0.90298) = 3.14568,
    # C 24 px 0.25 + 0.60820 = 0.85820, C 40 px (0.15, 0.3, 0.3) + 3 x 1.37444 = 4.87332,
    # C 48 px (0.25, 0.375, 0.625) + 3 x 1.64792 = 6.19376; total 34.14464
    assert got["loss_box"].item() == pytest.approx(34.14464 / 23, rel=1e-5)
    # foreground cells (a cell is more than half inside the object): A 4 of 9 and 4 of 25 at level 0,
    # 1 of 9 at level 1; B 15 of 25 at level 0, 2 of 25 at level 1; C 4 of 9, 4 of 25, 1 of 9
    weights = 4 * (1 + 0.5 * 4 / 9) + 4 * (1 + 0.5 * 4 / 25) + 3 * (1 + 0.5 / 9) + 3 * (1 + 0.5 * 15 / 25) \
        + 2 * (1 + 0.5 * 2 / 25) + (1 + 0.5 * 4 / 9) + 3 * (1 + 0.5 * 4 / 25) + 3 * (1 + 0.5 / 9)
    assert got["loss_mask"].item() == pytest.approx(2 * math.log(2) * weights / 23, rel=1e-6)


def test_criterion_reads_its_settings():
    """Each loss setting of the model changes the loss it belongs to (no constant in its place)."""
    out, targets = _output(), _targets()
    base = _model().losses(out, targets, IMAGE_SIZES)
    changes = {"focal_alpha": (0.25, "loss_cls"), "focal_gamma": (2.0, "loss_cls"), "focal_shift": (1.0, "loss_cls"),
               "box_weights": ((1.0, 1.0, 1.0, 1.0), "loss_box"), "mask_pos_weight": (1.0, "loss_mask"),
               "mask_loss_weight": (1.0, "loss_mask"), "spatial_thresh": (0.5, "loss_box"),
               "scale_thresh": (1.0, "loss_box"), "min_size": (70.0, "loss_box")}
    for key, (value, loss) in changes.items():
        got = _model(**{key: value}).losses(out, targets, IMAGE_SIZES)
        assert got[loss].item() != pytest.approx(base[loss].item(), rel=1e-4), key


class _FixedLosses(nn.Module):
    def forward(self, images):
        return images

    def losses(self, out, targets, image_sizes):
        return {"loss_cls": torch.tensor(1.5), "loss_box": torch.tensor(0.25), "loss_mask": torch.tensor(4.0)}


class _Batch:
    images = torch.zeros(1, 3, 2, 2)
    targets: list = []
    image_sizes = [(2, 2)]

    def __len__(self):
        return 1


def test_training_step_optimises_every_loss_term():
    module = DetectionLitModule(_FixedLosses(), optimizer=torch.optim.SGD)
    module.log = lambda *args, **kwargs: None
    module.optimizers = lambda: SimpleNamespace(param_groups=[{"lr": 0.1}])
    assert module.training_step(_Batch(), 0).item() == pytest.approx(1.5 + 0.25 + 4.0)
