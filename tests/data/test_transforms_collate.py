"""Transforms keep image, masks and boxes consistent; the collate normalises, pads and keeps sizes."""

import pytest
import torch
from torchvision import tv_tensors

from tensormask.data import Collator, ResizeShortestEdge, build_transforms
from tensormask.data.transforms import output_size

RED = torch.tensor([255, 0, 0], dtype=torch.uint8)


def _drawn_item(h=60, w=90):
    """A grey image with a red disc, off-centre to the left, and its mask and box."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = ((yy - 25) ** 2 + (xx - 20) ** 2) <= 12**2
    image = torch.full((3, h, w), 128, dtype=torch.uint8)
    image[:, disc] = RED[:, None]
    ys, xs = torch.nonzero(disc, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    return {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(disc[None].to(torch.uint8)),
        "labels": torch.tensor([3]),
        "image_id": 7,
        "orig_size": (h, w),
    }


def _mask_box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _check_consistent(out, tol):
    image, mask, box = out["image"], out["masks"][0], out["boxes"][0]
    assert image.shape[-2:] == mask.shape[-2:] == out["boxes"].canvas_size
    # the box follows the mask
    torch.testing.assert_close(_mask_box(mask), box.float(), atol=tol, rtol=0)
    # the mask covers the red pixels: inside it is red, well outside it is grey
    inside = image[:, mask.bool()].float()
    assert (inside[0].mean() > 200) and (inside[1].mean() < 60)
    grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0].bool()
    outside = image[:, ~grown].float()
    assert torch.allclose(outside, torch.full_like(outside, 128), atol=2)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_train_resize_and_flip_move_masks_and_boxes(flip):
    item = _drawn_item()
    out = build_transforms(True, min_size=120, max_size=1000, flip_prob=flip)(item)
    assert tuple(out["image"].shape) == (3, 120, 180)
    _check_consistent(out, tol=2.0)
    cx = float(out["boxes"][0, 0] + out["boxes"][0, 2]) / 2
    # the disc is centred at x = 20.5 of 90 -> 41 of 180, or 180 - 41 = 139 after the flip
    assert abs(cx - (139 if flip else 41)) <= 2
    assert out["labels"].tolist() == [3] and out["image_id"] == 7 and out["orig_size"] == (60, 90)


def test_downscale_with_long_side_cap():
    item = _drawn_item()
    out = build_transforms(False, min_size=800, max_size=120)(item)
    assert tuple(out["image"].shape) == (3, 80, 120)  # long side capped at 120
    _check_consistent(out, tol=1.5)


def test_random_short_side_in_range():
    t = ResizeShortestEdge((40, 50), max_size=1000)
    torch.manual_seed(0)
    shorts = {int(t(_drawn_item())["image"].shape[-2]) for _ in range(40)}
    assert shorts <= set(range(40, 51)) and len(shorts) >= 5
    # evaluation uses the top of the range, deterministically
    ev = build_transforms(False, min_size=(40, 50), max_size=1000)
    assert {int(ev(_drawn_item())["image"].shape[-2]) for _ in range(5)} == {50}


def test_output_size_rounds_and_caps():
    assert output_size(480, 640, 800, 1333) == (800, 1067)  # 1066.67 rounds up
    assert output_size(100, 1000, 800, 1333) == (133, 1333)
    with pytest.raises(ValueError):
        ResizeShortestEdge((50, 40), max_size=100)


def test_sanitize_drops_vanished_instances():
    item = _drawn_item()
    tiny = torch.zeros(1, 60, 90, dtype=torch.uint8)
    tiny[0, 0, 0] = 1
    item["masks"] = tv_tensors.Mask(torch.cat([item["masks"], tiny]))
    item["boxes"] = tv_tensors.BoundingBoxes(
        torch.cat([item["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]])]), format="XYXY", canvas_size=(60, 90)
    )
    item["labels"] = torch.tensor([3, 1])
    out = build_transforms(True, min_size=20, max_size=1000, flip_prob=0.0)(item)  # the 1 px box becomes 1/3 px
    assert out["labels"].tolist() == [3] and out["masks"].shape[0] == 1 and out["boxes"].shape[0] == 1


def test_collate_normalises_pads_and_keeps_sizes():
    a, b = _drawn_item(60, 90), _drawn_item(50, 33)
    b["image_id"] = 8
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)
    batch = Collator(size_divisibility=32, pixel_mean=mean, pixel_std=std, bgr=False)([a, b])
    assert tuple(batch.images.shape) == (2, 3, 64, 96) and batch.images.dtype == torch.float32
    assert batch.image_sizes == [(60, 90), (50, 33)] and batch.orig_sizes == [(60, 90), (50, 33)]
    assert batch.image_ids == [7, 8] and len(batch) == 2
    # a red pixel (255, 0, 0) and a grey one (128, 128, 128), RGB order
    torch.testing.assert_close(batch.images[0, :, 25, 20], torch.tensor([(255 - 10) / 2, (0 - 20) / 4, (0 - 30) / 5]))
    torch.testing.assert_close(batch.images[0, :, 0, 89], torch.tensor([(128 - 10) / 2, (128 - 20) / 4, (128 - 30) / 5]))
    # padding is zero, after normalisation
    assert batch.images[0, :, 60:].abs().sum() == 0 and batch.images[1, :, :, 33:].abs().sum() == 0
    t = batch.targets[1]
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
    assert tuple(t["masks"].shape) == (1, 50, 33)
    # BGR: channels reversed before the (BGR-ordered) statistics are applied
    bgr = Collator(size_divisibility=1, pixel_mean=(103.53, 116.28, 123.675), pixel_std=(1, 1, 1), bgr=True)([a])
    assert tuple(bgr.images.shape) == (1, 3, 60, 90)
    torch.testing.assert_close(bgr.images[0, :, 25, 20], torch.tensor([0 - 103.53, 0 - 116.28, 255 - 123.675]))


def test_collate_rejects_inconsistent_targets():
    item = _drawn_item()
    item["labels"] = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="image 7: 1 boxes, 1 masks, 2 labels"):
        Collator()([item])


def test_short_side_choices_and_an_empty_list():
    resize = ResizeShortestEdge([48, 64], max_size=1000)
    assert resize.range is None
    with pytest.raises(ValueError, match="empty list of short side sizes"):
        ResizeShortestEdge([], max_size=1000)


def test_collate_converts_boxes_to_float32_and_refuses_nothing():
    item = _drawn_item()
    item["boxes"] = item["boxes"].double()
    assert Collator()([item]).targets[0]["boxes"].dtype == torch.float32
    with pytest.raises(ValueError, match="^cannot collate an empty list of items$"):
        Collator()([])
