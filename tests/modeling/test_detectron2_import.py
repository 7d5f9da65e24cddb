"""The detectron2 converter on a checkpoint written here with every detectron2 name and shape,
checked against a hand-wired functional forward of the same weights; backbone weight files."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from tensormask import ops
from tensormask.modeling import ResNet
from tensormask.modeling.detectron2_import import (
    CheckpointMismatch,
    build_detectron2_tensormask,
    load_backbone_weights,
    load_detectron2_checkpoint,
)

K = 3  # classes
BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}
WIDTH = {2: 64, 3: 128, 4: 256, 5: 512}


def d2_shapes(num_classes=K):
    """Every tensor of a detectron2 R-50-FPN bipyramid TensorMask checkpoint, from its architecture."""
    shapes = {}

    def conv_norm(prefix, cout, cin, k):
        shapes[prefix + ".weight"] = (cout, cin, k, k)
        for f in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{f}"] = (cout,)

    conv_norm("backbone.bottom_up.stem.conv1", 64, 3, 7)
    cin = 64
    for s, n in BLOCKS.items():
        w = WIDTH[s]
        for i in range(n):
            p = f"backbone.bottom_up.res{s}.{i}"
            if i == 0:
                conv_norm(p + ".shortcut", 4 * w, cin, 1)
            conv_norm(p + ".conv1", w, cin, 1)
            conv_norm(p + ".conv2", w, w, 3)
            conv_norm(p + ".conv3", 4 * w, w, 1)
            cin = 4 * w
    for lvl, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        shapes[f"backbone.fpn_lateral{lvl}.weight"], shapes[f"backbone.fpn_lateral{lvl}.bias"] = (256, c, 1, 1), (256,)
        shapes[f"backbone.fpn_output{lvl}.weight"], shapes[f"backbone.fpn_output{lvl}.bias"] = (256, 256, 3, 3), (256,)
    for p, c in (("p6", 2048), ("p7", 256)):
        shapes[f"backbone.top_block.{p}.weight"], shapes[f"backbone.top_block.{p}.bias"] = (256, c, 3, 3), (256,)

    def tower(name, cout):
        for j, i in enumerate((0, 2, 4, 6)):
            shapes[f"head.{name}.{i}.weight"], shapes[f"head.{name}.{i}.bias"] = (cout, 256 if j == 0 else cout, 3, 3), (cout,)

    tower("cls_subnet", 256)
    tower("bbox_subnet", 128)
    tower("mask_subnet", 128)
    shapes["head.cls_score.weight"], shapes["head.cls_score.bias"] = (2 * num_classes, 256, 3, 3), (2 * num_classes,)
    shapes["head.bbox_pred.weight"], shapes["head.bbox_pred.bias"] = (8, 128, 3, 3), (8,)
    for s in (11, 15):
        shapes[f"head.mask_pred_{s}.weight"], shapes[f"head.mask_pred_{s}.bias"] = (s * s, 128, 1, 1), (s * s,)
    shapes["head.mask_fuse.0.weight"], shapes["head.mask_fuse.0.bias"] = (128, 128, 3, 3), (128,)
    return shapes


def random_d2_state(seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in d2_shapes().items():
        if name.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith(".norm.weight"):
            value = rng.uniform(0.5, 1.0, shape)
        elif len(shape) == 4:  # keep activations O(1) through 50 layers
            value = rng.normal(0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        else:
            value = rng.normal(0, 0.1, shape)
        state[name] = value.astype(np.float32)
    return state


def reference_forward(w, x):
    """detectron2's TensorMask forward written out with functional ops on the checkpoint's names."""
    t = {k: torch.from_numpy(v) for k, v in w.items()}

    def cn(x, p, stride=1, pad=0, relu=True):
        y = F.conv2d(x, t[p + ".weight"], None, stride, pad)
        scale = t[p + ".norm.weight"] / torch.sqrt(t[p + ".norm.running_var"] + 1e-5)
        y = y * scale[None, :, None, None] + (t[p + ".norm.bias"] - t[p + ".norm.running_mean"] * scale)[None, :, None, None]
        return F.relu(y) if relu else y

    def conv(x, p, stride=1, pad=1):
        return F.conv2d(x, t[p + ".weight"], t[p + ".bias"], stride, pad)

    x = cn(x, "backbone.bottom_up.stem.conv1", 2, 3)
    x = F.max_pool2d(x, 3, 2, 1)
    cs = []
    for s, n in BLOCKS.items():
        for i in range(n):
            p = f"backbone.bottom_up.res{s}.{i}"
            stride = 2 if (i == 0 and s > 2) else 1
            short = cn(x, p + ".shortcut", stride, 0, relu=False) if i == 0 else x
            y = cn(x, p + ".conv1", stride, 0)  # stride in the 1x1 conv (MSRA)
            y = cn(y, p + ".conv2", 1, 1)
            y = cn(y, p + ".conv3", 1, 0, relu=False)
            x = F.relu(y + short)
        cs.append(x)
    prev = conv(cs[3], "backbone.fpn_lateral5", pad=0)
    ps = [conv(prev, "backbone.fpn_output5")]
    for lvl in (4, 3, 2):
        prev = (conv(cs[lvl - 2], f"backbone.fpn_lateral{lvl}", pad=0) + F.interpolate(prev, scale_factor=2.0, mode="nearest")) / 2
        ps.insert(0, conv(prev, f"backbone.fpn_output{lvl}"))
    p6 = conv(cs[3], "backbone.top_block.p6", stride=2)
    ps += [p6, conv(F.relu(p6), "backbone.top_block.p7", stride=2)]

    def tower(x, name):
        for i in (0, 2, 4, 6):
            x = F.relu(conv(x, f"head.{name}.{i}"))
        return x

    logits = [conv(tower(p, "cls_subnet"), "head.cls_score") for p in ps]
    deltas = [conv(tower(p, "bbox_subnet"), "head.bbox_pred") for p in ps]
    mfeats = [tower(p, "mask_subnet") for p in ps]
    h, w = mfeats[0].shape[-2:]
    masks = []
    for lvl, mf in enumerate(mfeats):
        up = mf if lvl == 0 else F.interpolate(mf, scale_factor=2.0**lvl, mode="bilinear", align_corners=False)
        fused = F.relu(conv(up[:, :, :h, :w] + mfeats[0], "head.mask_fuse.0"))
        masks.append([ops.swap_align2nat(conv(fused, f"head.mask_pred_{s}", pad=0), 2**lvl) for s in (11, 15)])
    return logits, deltas, masks


@pytest.fixture(scope="module")
def d2_file(tmp_path_factory):
    state = random_d2_state()
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    return path, state


def test_converted_model_matches_functional_reference(d2_file):
    path, state = d2_file
    model = build_detectron2_tensormask(path, num_classes=K).eval()
    assert model.input_format == "BGR" and model.pixel_mean == (103.53, 116.28, 123.675)
    # every tensor of the file landed in the model, bit for bit
    assert len(model.state_dict()) == len(state)
    assert torch.equal(model.mask_head.predictors[1].weight, torch.from_numpy(state["head.mask_pred_15.weight"]))
    assert torch.equal(model.backbone.bottom_up.layer3[2].bn2.running_var,
                       torch.from_numpy(state["backbone.bottom_up.res4.2.conv2.norm.running_var"]))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref_logits, ref_deltas, ref_masks = reference_forward(state, x)
        model.train()
        out = model(x)
        masks = model.mask_head(out.features)  # every level's dense mask prediction
    for a, b in zip(out.logits, ref_logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(out.deltas, ref_deltas):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    for lvl in range(6):
        for a in range(2):
            ours = model.mask_head.natural(masks, lvl, a)
            assert ours.shape == ref_masks[lvl][a].shape
            assert torch.allclose(ours, ref_masks[lvl][a], rtol=1e-4, atol=1e-4)


def test_wrong_or_missing_name_is_named(d2_file):
    _, state = d2_file
    model = build_detectron2_tensormask(None, num_classes=K)
    missing = dict(state)
    del missing["backbone.bottom_up.res4.5.conv2.norm.running_mean"]
    with pytest.raises(CheckpointMismatch, match=r"layer3\.5\.bn2\.running_mean"):
        load_detectron2_checkpoint(model, missing)
    wrong = dict(state)
    wrong["head.mask_pred_13.weight"] = wrong.pop("head.mask_pred_15.weight")
    with pytest.raises(CheckpointMismatch, match="head.mask_pred_13.weight"):
        load_detectron2_checkpoint(model, wrong)
    extra = dict(state, **{"head.extra_layer.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointMismatch, match="head.extra_layer.weight"):
        load_detectron2_checkpoint(model, extra)
    bad_shape = dict(state, **{"head.cls_score.bias": np.zeros(7, np.float32)})
    with pytest.raises(CheckpointMismatch, match="class_head.score.bias"):
        load_detectron2_checkpoint(model, bad_shape)


@pytest.mark.parametrize("depth,factory", [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)])
def test_torchvision_resnet_weights(tmp_path, depth, factory):
    tv = factory(weights=None).eval()
    for m in tv.modules():  # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet.pth"
    torch.save(tv.state_dict(), path)
    ours = ResNet(depth, norm="FrozenBN", stride_in_1x1=False).eval()
    load_backbone_weights(ours, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = ours(x)[-1]
        t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(t))))
    torch.testing.assert_close(c5, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    sd = tv.state_dict()
    sd["layer2.0.conv9.weight"] = sd.pop("layer2.0.conv1.weight")
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatch, match=r"layer2\.0\.conv9\.weight"):
        load_backbone_weights(ResNet(depth, norm="FrozenBN"), path)


def test_msra_r50_pkl(tmp_path):
    """Caffe2 names (conv1_w, res_conv1_bn_s, res2_0_branch2a_w, ...), affine-only BN, fc skipped."""
    rng = np.random.default_rng(1)
    blobs = {"conv1_w": rng.normal(0, 0.1, (64, 3, 7, 7)), "res_conv1_bn_s": rng.uniform(0.5, 1, 64),
             "res_conv1_bn_b": rng.normal(0, 0.1, 64), "fc1000_w": np.zeros((1000, 2048)), "fc1000_b": np.zeros(1000)}
    cin = 64
    for s, n in BLOCKS.items():
        w = WIDTH[s]
        for i in range(n):
            branches = {"branch2a": (w, cin, 1), "branch2b": (w, w, 3), "branch2c": (4 * w, w, 1)}
            if i == 0:
                branches["branch1"] = (4 * w, cin, 1)
            for b, (co, ci, k) in branches.items():
                blobs[f"res{s}_{i}_{b}_w"] = rng.normal(0, 1 / np.sqrt(ci * k * k), (co, ci, k, k))
                blobs[f"res{s}_{i}_{b}_bn_s"] = rng.uniform(0.5, 1, co)
                blobs[f"res{s}_{i}_{b}_bn_b"] = rng.normal(0, 0.1, co)
            cin = 4 * w
    blobs = {k: v.astype(np.float32) for k, v in blobs.items()}
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    ours = ResNet(50, norm="FrozenBN", stride_in_1x1=True)
    load_backbone_weights(ours, path)
    assert torch.equal(ours.layer4[0].conv1.weight, torch.from_numpy(blobs["res5_0_branch2a_w"]))
    assert torch.equal(ours.layer1[0].downsample[1].weight, torch.from_numpy(blobs["res2_0_branch1_bn_s"]))
    assert ours.layer4[0].conv1.stride == (2, 2) and ours.layer4[0].conv2.stride == (1, 1)
    # affine-only frozen BN is exactly scale * x + bias
    x = torch.randn(1, 64, 4, 4)
    expected = x * torch.from_numpy(blobs["res_conv1_bn_s"])[None, :, None, None] + torch.from_numpy(blobs["res_conv1_bn_b"])[None, :, None, None]
    assert torch.allclose(ours.bn1(x), expected, atol=1e-6)
    del blobs["res3_1_branch2b_bn_b"]
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    with pytest.raises(CheckpointMismatch, match=r"layer2\.1\.bn2\.bias"):
        load_backbone_weights(ResNet(50, norm="FrozenBN", stride_in_1x1=True), path)


def test_2019_model_zoo_layout(d2_file):
    """The model zoo's files (model_final_8f325c.pkl, model_final_e8df31.pkl, saved in 2019) carry
    `anchor_generator.cell_anchors.<level>` and no pixel_mean/pixel_std: the anchors are checked
    against the model's windows and dropped; truly unknown names are still refused."""
    from tensormask.modeling.detectron2_import import expected_cell_anchors

    _, state = d2_file
    anchors = {}
    for level in range(6):
        side = np.array([11, 15], np.float32) * 4 * 2**level
        anchors[f"anchor_generator.cell_anchors.{level}"] = np.stack([-side / 2, -side / 2, side / 2, side / 2], 1)
    assert anchors["anchor_generator.cell_anchors.0"].tolist() == [[-22, -22, 22, 22], [-30, -30, 30, 30]]
    assert torch.equal(expected_cell_anchors((11, 15), 128).float(), torch.from_numpy(anchors["anchor_generator.cell_anchors.5"]))
    old = {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}
    old.update(anchors)
    model = build_detectron2_tensormask(None, num_classes=K)
    load_detectron2_checkpoint(model, old)
    assert torch.equal(model.class_head.score.bias, torch.from_numpy(state["head.cls_score.bias"]))
    # anchors that are not this model's windows (here: a model with other window sizes) are named
    wrong = dict(old, **{"anchor_generator.cell_anchors.2": anchors["anchor_generator.cell_anchors.2"] * 2})
    with pytest.raises(CheckpointMismatch, match=r"anchor_generator.cell_anchors.2.*differs from this TensorMask's "
                                                 r"windows at level 2 \(stride 16\)"):
        load_detectron2_checkpoint(model, wrong)
    extra = dict(old, **{"anchor_generator.something_else": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointMismatch, match="anchor_generator.something_else"):
        load_detectron2_checkpoint(model, extra)


def test_a_wrong_weights_file_is_a_user_error_naming_it(tmp_path):
    """A file that is no checkpoint, or whose tensors do not fit, ends in a UserError (the entry points
    print its message without a traceback) that names the file; long name lists are cut."""
    from tensormask.errors import UserError
    from tensormask.modeling.detectron2_import import CheckpointReadError, read_checkpoint

    garbage, listed, pth = tmp_path / "garbage.pkl", tmp_path / "list.pkl", tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    pth.write_bytes(b"not a torch file")
    listed.write_bytes(pickle.dumps([1, 2]))
    for path, why in ((garbage, "UnpicklingError"), (pth, "torch file"), (listed, "got list")):
        with pytest.raises(CheckpointReadError, match=why) as info:
            read_checkpoint(path)
        assert isinstance(info.value, UserError) and str(path) in str(info.value)
    foreign = tmp_path / "foreign.pkl"
    foreign.write_bytes(pickle.dumps({"model": {f"extra.{i}": np.zeros(1, np.float32) for i in range(30)}}))
    with pytest.raises(CheckpointMismatch) as info:
        load_detectron2_checkpoint(build_detectron2_tensormask(num_classes=K), foreign)
    assert isinstance(info.value, UserError)
    assert str(foreign) in str(info.value) and "... and 18 more" in str(info.value)
    mean = tmp_path / "mean.pkl"
    mean.write_bytes(pickle.dumps({"model": {"pixel_mean": np.array([1.0, 2.0, 3.0])}}))
    with pytest.raises(CheckpointMismatch, match="pixel_mean"):
        load_detectron2_checkpoint(build_detectron2_tensormask(num_classes=K), mean)
