"""A tiny TensorMask overfits one synthetic image: the loss falls by a large factor, then the
object is detected with the right class, a tight box and a good mask."""

import pytest
import torch
from tm_model_helpers import make_model
from torchvision.ops import box_iou


def synthetic_disc(size=64, centre=(30.0, 34.0), radius=13.0):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    image = torch.zeros(1, 3, size, size)
    image[0, 0][disc] = 1.0
    image[0, 1] += 0.2 * torch.rand(size, size)
    ys, xs = torch.nonzero(disc, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    target = {"boxes": box, "labels": torch.tensor([2]), "masks": disc[None].to(torch.uint8)}
    return (image - 0.3) / 0.5, target, disc


@pytest.mark.slow
def test_overfit_one_image():
    torch.manual_seed(0)
    image, target, disc = synthetic_disc()
    size = [(64, 64)]
    model = make_model("bipyramid", num_classes=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    model.train()
    first = None
    for _ in range(100):
        losses = model.losses(model(image), [target], size)
        loss = sum(losses.values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        last = sum(model.losses(model(image), [target], size).values()).item()
    assert last < first / 8, (first, last)

    model.eval()
    with torch.no_grad():
        det = model.predict(model(image), size, [(128, 128)])[0]  # original image twice as large
    assert len(det) >= 1
    assert det.labels[0].item() == 2 and det.scores[0].item() > 0.5
    assert box_iou(det.boxes[:1], target["boxes"] * 2).item() > 0.7
    big_disc = torch.nn.functional.interpolate(disc[None, None].float(), scale_factor=2.0)[0, 0] > 0.5
    iou = (det.masks[0] & big_disc).sum() / (det.masks[0] | big_disc).sum()
    assert iou.item() > 0.7, iou
