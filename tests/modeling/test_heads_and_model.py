"""Forward/backward of every mask-head design x mode, shapes per level, sparse == dense masks,
no-object images, no detections, original-size outputs."""

import pytest
import torch

from tensormask import ops
from tensormask.modeling import ResNetFPN
from tensormask.modeling.heads import BipyramidMaskHead

from tm_model_helpers import MASK_HEADS, empty_target, make_head, make_model, rectangle_target

HEADS = sorted(MASK_HEADS)
SIZES = [(100, 120), (128, 96)]


def _targets():
    return [rectangle_target(100, 120, (30, 20, 80, 60), 1), rectangle_target(128, 96, (10, 40, 50, 100), 2)]


def test_backbone_levels():
    bb = ResNetFPN(depth=18, norm="GN", freeze_at=0, out_channels=32)
    feats = bb(torch.randn(1, 3, 128, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 24), (16, 12), (8, 6), (4, 3), (2, 2), (1, 1)]
    assert all(f.shape[1] == 32 for f in feats)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("mode", ["full", "mask_only"])
def test_forward_backward_every_head_and_mode(head, mode):
    model = make_model(head, mode)
    model.train()
    out = model(torch.randn(2, 3, 128, 128))
    assert [tuple(x.shape) for x in out.logits] == [(2, 6, s, s) for s in (32, 16, 8, 4, 2, 1)]
    assert (out.deltas is None) == (mode == "mask_only")
    losses = model.losses(out, _targets(), SIZES)
    assert set(losses) == ({"loss_cls", "loss_mask"} if mode == "mask_only" else {"loss_cls", "loss_box", "loss_mask"})
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["loss_mask"].item() > 0
    total.backward()
    mask_grads = [p.grad for p in model.mask_head.parameters()]
    assert all(g is not None for g in mask_grads) and any(g.abs().sum() > 0 for g in mask_grads)


def test_box_only_has_no_mask_branch():
    model = make_model("bipyramid", "box_only")
    assert model.mask_head is None
    model.train()
    out = model(torch.randn(2, 3, 128, 128))
    losses = model.losses(out, _targets(), SIZES)
    assert set(losses) == {"loss_cls", "loss_box"}
    sum(losses.values()).backward()
    model.eval()
    model.decoder.score_threshold = 0.0
    dets = model.predict(model(torch.randn(1, 3, 128, 128)), [(128, 128)], [(64, 64)])
    assert dets[0].masks is None and len(dets[0]) == 100


@pytest.mark.parametrize("head", HEADS)
def test_mask_shapes_per_level_and_sparse_equals_dense(head):
    mask_head = make_head(head)
    # grids halve with ceil from (16, 17): what the backbone gives
    feats = [torch.randn(2, 32, h, w) for h, w in ((16, 17), (8, 9), (4, 5), (2, 3), (1, 2), (1, 1))]
    pred = mask_head(feats)
    for level, f in enumerate(feats):
        for a, size in enumerate(mask_head.window_sizes):
            cells = mask_head.cells(level, a)
            assert cells == (size * 2**level if head == "bipyramid" else size)
            dense = mask_head.natural(pred, level, a)
            assert tuple(dense.shape) == (2, cells * cells, *f.shape[-2:])
            b, y, x = torch.tensor([1, 0]), torch.tensor([f.shape[2] - 1, 0]), torch.tensor([0, f.shape[3] - 1])
            sparse = mask_head.natural_at(pred, level, a, b, y, x)
            assert torch.allclose(sparse, dense[b, :, y, x], atol=1e-5)


def test_bipyramid_head_computes_only_requested_levels():
    head = make_head("bipyramid")
    feats = [torch.randn(1, 32, s, s) for s in (16, 8, 4, 2, 1, 1)]
    pred = head(feats, levels=[2])
    assert [[r is not None for r in level] for level in pred.raw] == [[False, False]] * 2 + [[True, True]] + [[False, False]] * 3
    assert torch.equal(pred.raw[2][1], head(feats).raw[2][1])


@pytest.mark.parametrize("head", HEADS)
def test_training_losses_compute_the_masks_of_the_levels_with_positives_only(head, monkeypatch):
    """A training forward leaves the mask branch to the losses, which run it on the levels that hold
    positive windows only (here 2 of the 6): the same losses and gradients, to the bit, as from every
    level's masks."""
    from tensormask.modeling.tensormask import TensorMaskOutput

    torch.manual_seed(0)
    model = make_model(head).train()
    out = model(torch.randn(2, 3, 128, 128))
    assert out.masks is None
    positives = model.criterion.assign(model.windows(out), _targets())
    holding = model.windows(out).levels[positives.window].unique().tolist()
    assert holding == [0, 1]
    asked = []
    real_forward = type(model.mask_head).forward

    def spy_forward(self, features, levels=None):
        asked.append(levels)
        return real_forward(self, features, levels)

    monkeypatch.setattr(type(model.mask_head), "forward", spy_forward)
    params = list(model.mask_head.parameters())
    lazy = model.losses(out, _targets(), SIZES)
    assert asked == [holding]
    lazy_grads = torch.autograd.grad(lazy["loss_mask"], params, retain_graph=True)
    every_level = TensorMaskOutput(out.features, out.logits, out.deltas, model.mask_head(out.features))
    full = model.losses(every_level, _targets(), SIZES)
    assert asked == [holding, None]
    assert all(torch.equal(lazy[k], full[k]) for k in full)
    full_grads = torch.autograd.grad(full["loss_mask"], params)
    assert all(torch.equal(a, b) for a, b in zip(lazy_grads, full_grads))


@pytest.mark.parametrize("mode", ["full", "box_only", "mask_only"])
def test_images_without_objects_train_without_nan(mode):
    model = make_model("bipyramid", mode)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    losses = model.losses(out, [empty_target(64, 64), empty_target(50, 60)], [(64, 64), (50, 60)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # no positive at all even though there is an object: a tiny object far outside every window rule
    tiny = rectangle_target(64, 64, (0, 0, 1, 1), 0)
    tiny["boxes"] = torch.tensor([[-500.0, -500.0, -499.0, -499.0]])
    losses = model.losses(model(torch.randn(1, 3, 64, 64)), [tiny], [(64, 64)])
    assert all(torch.isfinite(v) for v in losses.values())


def test_inference_with_no_detections():
    model = make_model("bipyramid").eval()
    model.decoder.score_threshold = 0.5  # the prior probability is 0.01: nothing passes
    out = model(torch.randn(2, 3, 64, 64))
    assert out.masks is None
    dets = model.predict(out, [(64, 64), (60, 50)], [(128, 128), (120, 100)])
    assert [len(d) for d in dets] == [0, 0]
    assert dets[1].boxes.shape == (0, 4) and dets[1].masks.shape == (0, 120, 100) and dets[1].masks.dtype == torch.bool


@pytest.mark.parametrize("nms_boxes", ["bb", "mask-bb"])
def test_predict_outputs_in_original_coordinates(nms_boxes):
    model = make_model("bipyramid", nms_boxes=nms_boxes, max_detections=7, soft_masks=True).eval()
    model.decoder.score_threshold = 0.0
    with torch.no_grad():  # make masks non-empty so mask-bb boxes exist
        model.mask_head.predictors[0].bias.fill_(3.0)
        model.mask_head.predictors[1].bias.fill_(3.0)
    out = model(torch.randn(1, 3, 64, 64))
    det = model.predict(out, [(64, 48)], [(128, 96)])[0]
    assert 0 < len(det) <= 7
    assert det.masks.shape == (len(det), 128, 96) and det.soft_masks.shape == det.masks.shape
    assert (det.boxes[:, 0::2] <= 96).all() and (det.boxes[:, 1::2] <= 128).all() and (det.boxes >= 0).all()
    assert torch.all(det.scores[:-1] >= det.scores[1:]) and det.labels.max() < 3
    assert det.masks.any(dim=(1, 2)).all()
    if nms_boxes == "mask-bb":
        # the reported boxes are the tight boxes of the reported masks
        for box, mask in zip(det.boxes, det.masks):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_mode_validation():
    from tensormask.modeling import TensorMask
    with pytest.raises(ValueError, match="a box head, a mask head or both"):
        TensorMask(ResNetFPN(depth=18, norm="GN", out_channels=32), None, box_head=False)
    with pytest.raises(ValueError, match="no masks"):
        make_model(mode="box_only", nms_boxes="mask-bb")
    with pytest.raises(ValueError, match="mask-bb"):
        make_model(mode="mask_only", nms_boxes="bb")
    with pytest.raises(ValueError, match="window_sizes"):
        from tensormask.modeling import TensorMask
        TensorMask(ResNetFPN(depth=18, norm="GN", out_channels=32), make_head("bipyramid"), window_sizes=(15,))


def test_bipyramid_reference_layout():
    head = BipyramidMaskHead()
    names = {n for n, _ in head.named_parameters()}
    assert {"tower.0.weight", "tower.6.bias", "predictors.0.weight", "predictors.1.weight", "fuse.0.weight"} <= names
    assert head.predictors[1].weight.shape == (225, 128, 1, 1) and head.fuse[0].weight.shape == (128, 128, 3, 3)


@pytest.mark.parametrize("head", ["bipyramid", "simple_aligned", "upscaling_aligned"])
def test_natural_region_equals_crop_of_full_mask(head):
    mask_head = make_head(head)
    feats = [torch.randn(2, 32, h, w) for h, w in ((12, 10), (6, 5), (3, 3), (2, 2), (1, 1), (1, 1))]
    pred = mask_head(feats)
    for level, (b, y, x) in [(0, (1, 0, 9)), (1, (0, 3, 2)), (3, (1, 1, 0)), (5, (0, 0, 0))]:
        for a in range(2):
            cells = mask_head.cells(level, a)
            full = mask_head.natural_at(pred, level, a, torch.tensor([b]), torch.tensor([y]), torch.tensor([x]))
            full = full.view(cells, cells)
            for region in [(0, cells, 0, cells), (1, cells // 2, cells // 3, cells - 1), (cells - 1, cells, 0, 1)]:
                got = mask_head.natural_region_at(pred, level, a, b, y, x, region)
                v0, v1, u0, u1 = region
                assert torch.allclose(got, full[v0:v1, u0:u1], atol=1e-5), (level, a, region)


def test_predict_never_builds_dense_masks(monkeypatch):
    model = make_model("bipyramid", max_detections=5).eval()
    model.decoder.score_threshold = 0.0
    head = model.mask_head

    def forbidden(*args, **kwargs):
        raise AssertionError("predict must not build every window's mask")

    levels_asked = []
    real_forward = type(head).forward

    def spy_forward(self, features, levels=None):
        levels_asked.append(levels)
        return real_forward(self, features, levels)

    monkeypatch.setattr(type(head), "natural", forbidden)
    monkeypatch.setattr(type(head), "forward", spy_forward)
    out = model(torch.randn(1, 3, 64, 64))
    assert out.masks is None and levels_asked == []  # eval forward: no mask branch yet
    det = model.predict(out, [(64, 64)], [(64, 64)])[0]
    assert len(det) > 0 and det.masks.shape == (len(det), 64, 64)
    # the mask branch ran once, for a subset of levels given explicitly
    assert len(levels_asked) == 1 and levels_asked[0] is not None and set(levels_asked[0]) <= set(range(6))


def test_region_paste_equals_full_paste():
    from tensormask.modeling.inference import paste_masks

    torch.manual_seed(1)
    cells = 40
    full = torch.rand(cells, cells)
    box = torch.tensor([[-50.0, -30.0, 110.0, 130.0]])  # 4 px cells, partly outside a 64 x 64 image
    v0, v1, u0, u1 = 6, 25, 11, 30  # cells covering the image plus a margin
    region_box = torch.tensor([[-50.0 + 4 * u0, -30.0 + 4 * v0, -50.0 + 4 * u1, -30.0 + 4 * v1]])
    a = paste_masks([full], box, 64, 64)
    b = paste_masks([full[v0:v1, u0:u1]], region_box, 64, 64)
    assert torch.allclose(a, b, atol=1e-6) and a.sum() > 0


def test_freezing_and_norms():
    bb = ResNetFPN(depth=18, norm="BN", freeze_at=2, out_channels=32)
    from tensormask.modeling.backbone import FrozenBatchNorm2d

    r = bb.bottom_up
    assert not any(p.requires_grad for p in [*r.conv1.parameters(), *r.layer1.parameters()])
    assert all(p.requires_grad for p in r.layer2.parameters())
    assert isinstance(r.bn1, FrozenBatchNorm2d) and isinstance(r.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(r.layer2[0].bn1, torch.nn.BatchNorm2d)
    gn = ResNetFPN(depth=34, norm="GN", freeze_at=0, out_channels=32)
    assert isinstance(gn.bottom_up.layer3[0].bn2, torch.nn.GroupNorm) and len(gn.bottom_up.layer3) == 6
    with pytest.raises(ValueError, match="norm"):
        ResNetFPN(depth=18, norm="LN")
    # "sum" and "avg" top-down fusion differ only in the top-down path
    x = torch.randn(1, 3, 64, 64)
    avg = ResNetFPN(depth=18, norm="GN", freeze_at=0, out_channels=32, fuse_type="avg")
    summed = ResNetFPN(depth=18, norm="GN", freeze_at=0, out_channels=32, fuse_type="sum")
    summed.load_state_dict(avg.state_dict())
    fa, fs = avg(x), summed(x)
    assert torch.equal(fa[3], fs[3]) and torch.equal(fa[4], fs[4]) and not torch.allclose(fa[0], fs[0])


@pytest.mark.parametrize("head", ["bipyramid", "upscaling_aligned"])
def test_mask_loss_same_with_sparse_or_dense_decoding(head):
    model = make_model(head)
    model.train()
    out = model(torch.randn(2, 3, 128, 128))
    losses, grads = [], []
    for factor in (0, 10**9):  # 0: always sparse (natural_at); huge: always dense (natural + gather)
        model.criterion.dense_decode_factor = factor
        model.criterion.dense_max_elements = factor
        loss = model.losses(out, _targets(), SIZES)["loss_mask"]
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, model.mask_head.predictors[1].weight, retain_graph=True)[0])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not ops.backend.use_extension(torch.zeros(1)), reason="needs the compiled CPU kernels")
def test_mask_loss_decodes_small_levels_densely_with_the_compiled_op(monkeypatch):
    """With the compiled kernels, levels of at most dense_max_elements natural-mask elements are decoded
    densely (the sparse pure-PyTorch evaluation made the quickstart's step 1.2x slower); above it, sparsely."""
    model = make_model("bipyramid")
    model.train()
    out = model(torch.randn(2, 3, 128, 128))
    calls = []
    for name in ("natural", "natural_at"):
        real = getattr(model.mask_head, name)
        monkeypatch.setattr(model.mask_head, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    model.losses(out, _targets(), SIZES)
    assert calls and set(calls) == {"natural"}
    calls.clear()
    model.criterion.dense_max_elements = 2 * 32 * 32 * 15 * 15 - 1  # one element less than P2's 15x15 windows
    model.losses(out, _targets(), SIZES)
    assert "natural_at" in calls


@pytest.mark.parametrize("head", ["upscaling_natural", "upscaling_aligned"])
@pytest.mark.parametrize("lambda_val", [1.5, 3.0, 5.0])
def test_upscaling_heads_nearest_and_bilinear(head, lambda_val):
    for interpolation in ("nearest", "bilinear"):
        mask_head = make_head(head, window_sizes=(15,), lambda_val=lambda_val, interpolation=interpolation)
        assert mask_head.predicted_cells(15) == round(15 / lambda_val)
        assert mask_head.predictors[0].out_channels == round(15 / lambda_val) ** 2
        feats = [torch.randn(1, 32, h, h, requires_grad=True) for h in (8, 4, 2, 1, 1, 1)]
        pred = mask_head(feats)
        dense = mask_head.natural(pred, 1, 0)
        assert dense.shape == (1, 225, 4, 4)
        sparse = mask_head.natural_at(pred, 1, 0, torch.tensor([0, 0]), torch.tensor([3, 1]), torch.tensor([0, 2]))
        assert torch.allclose(sparse, dense[[0, 0], :, [3, 1], [0, 2]], atol=1e-5)
        sparse.sum().backward()
        assert feats[1].grad is not None and feats[1].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="interpolation"):
        make_head(head, interpolation="cubic")


def test_nearest_aligned_upscaling_is_instancefcn():
    """A.2: with nearest interpolation every natural cell copies one aligned cell (no blending)."""
    mask_head = make_head("upscaling_aligned", window_sizes=(15,), lambda_val=3.0, interpolation="nearest")
    feats = [torch.randn(1, 32, h, h) for h in (8, 4, 2, 1, 1, 1)]
    pred = mask_head(feats)
    aligned = pred.raw[0][0]
    natural = mask_head.natural_at(pred, 0, 0, torch.tensor([0]), torch.tensor([4]), torch.tensor([4]))
    values = set(aligned.flatten().tolist()) | {-6.0}
    assert all(v in values for v in natural.flatten().tolist())


@pytest.mark.parametrize("head", HEADS)
def test_mask_only_predict_reports_mask_boxes(head):
    model = make_model(head, "mask_only", max_detections=4).eval()
    assert model.box_head is None and model.nms_boxes == "mask-bb"
    model.decoder.score_threshold = 0.0
    with torch.no_grad():
        for p in model.mask_head.predictors:
            p.bias.fill_(2.0)
        det = model.predict(model(torch.randn(1, 3, 64, 64)), [(64, 64)], [(32, 32)])[0]
    assert 0 < len(det) <= 4 and det.masks.shape == (len(det), 32, 32)
    for box, mask in zip(det.boxes, det.masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("head", ["bipyramid", "simple_natural"])
def test_batched_predict_equals_single_image_predict(head):
    model = make_model(head, max_detections=6).eval()
    model.decoder.score_threshold = 0.0
    with torch.no_grad():
        for p in model.mask_head.predictors:
            p.bias.normal_(0.0, 2.0)
        images = torch.randn(2, 3, 64, 64)
        sizes, origs = [(64, 60), (50, 64)], [(128, 120), (25, 32)]
        both = model.predict(model(images), sizes, origs)
        for i in range(2):
            alone = model.predict(model(images[i:i + 1]), sizes[i:i + 1], origs[i:i + 1])[0]
            assert torch.allclose(both[i].boxes, alone.boxes, atol=1e-4)
            assert torch.equal(both[i].labels, alone.labels)
            assert (both[i].masks != alone.masks).float().mean() < 1e-3


def test_mask_boxes_on_the_window_cell_grid():
    """mask-bb before NMS: the thresholded cells' extent scaled onto the window (worked by hand)."""
    from tensormask.modeling.inference import mask_boxes

    probs = torch.zeros(2, 4, 4)
    probs[0, 1:3, 2] = 0.9  # rows 1-2, column 2 of a 4x4 grid
    probs[1] = 0.4  # below the threshold everywhere: empty
    windows = torch.tensor([[10.0, 20.0, 18.0, 36.0], [8.0, 6.0, 12.0, 10.0]])  # window 0: cells 2 px wide, 4 px high
    boxes = mask_boxes(probs, windows, threshold=0.5)
    assert boxes.tolist() == [[14.0, 24.0, 16.0, 32.0], [8.0, 6.0, 8.0, 6.0]]  # empty: zero size at the corner
