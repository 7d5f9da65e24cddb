"""Pictures: detections drawn on images, two models side by side (the paper's Figs. 10-11), PR curves.

Following appendix A.5, pictures show the detections whose CALIBRATED score (precision, see
`ScoreCalibration`) is >= 0.6 when a calibration is given, so two models are compared at one
threshold; without a calibration the raw score is thresholded instead.
"""

from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tensormask.evaluation.calibration import ScoreCalibration, average_precision_of
from tensormask.structures import Detections

DEFAULT_CALIBRATED_THRESHOLD = 0.6
DEFAULT_SCORE_THRESHOLD = 0.5


def class_colour(label: int) -> tuple[int, int, int]:
    """A stable, well separated colour per class (golden-ratio hue steps)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def _to_uint8_chw(image: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image.copy())
        if image.ndim == 3 and image.shape[-1] == 3:
            image = image.permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W) or (H, W, 3), got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = image.float().clamp(0, 255).round().to(torch.uint8)
    return image.cpu()


def select(
    detections: Detections,
    *,
    calibration: ScoreCalibration | None = None,
    threshold: float | None = None,
) -> tuple[Detections, torch.Tensor]:
    """The detections shown in a picture and the score printed beside each.

    With a calibration: calibrated score >= `threshold` (default 0.6), printed calibrated.
    Without: raw score >= `threshold` (default 0.5).
    """
    scores = detections.scores.detach().cpu().float()
    labels = detections.labels.detach().cpu()
    if calibration is not None:
        scores = calibration.apply(labels, scores)
        threshold = DEFAULT_CALIBRATED_THRESHOLD if threshold is None else threshold
    else:
        threshold = DEFAULT_SCORE_THRESHOLD if threshold is None else threshold
    keep = scores >= threshold
    kept = Detections(
        boxes=detections.boxes.detach().cpu()[keep],
        scores=detections.scores.detach().cpu()[keep],
        labels=labels[keep],
        masks=None if detections.masks is None else detections.masks.detach().cpu()[keep],
    )
    return kept, scores[keep]


@dataclass
class LabelLayout:
    """Where the labels of a picture go: `texts[i]` of kept detection i at `boxes[i]`
    (x0, y0, x1, y1) in pixels, or None where no free place was found (the mask and box are still
    drawn, in the class colour). Placed labels never overlap each other."""

    texts: list[str]
    boxes: list[tuple[int, int, int, int] | None]

    @property
    def placed(self) -> int:
        return sum(b is not None for b in self.boxes)


def _label_font(size: int = 10) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    boxes: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    canvas_size: tuple[int, int],
    priority: Sequence[int] | None = None,
) -> list[tuple[int, int, int, int] | None]:
    """Greedy label placement that keeps labels apart on crowded pictures.

    Labels are placed in `priority` order (default: as given; callers pass highest score first).
    Each tries, in turn, above the box's top-left corner, inside it, below the box, above its
    top-right corner and inside its bottom-left corner, shifted into the canvas; of the spots that
    overlap no label placed before, the one hiding the least of the other detections' boxes wins.
    A label with no free spot is left out (None): labels never pile up on dense small objects.

    Args:
        boxes: (D, 4) xyxy pixels.
        sizes: (width, height) of each label's rectangle, padding included.
        canvas_size: (H, W).
    Returns: D rectangles (x0, y0, x1, y1), end-exclusive, or None.
    """
    h, w = canvas_size
    xyxy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    taken: list[tuple[int, int, int, int]] = []
    out: list[tuple[int, int, int, int] | None] = [None] * len(sizes)
    for i in (range(len(sizes)) if priority is None else priority):
        tw, th = sizes[i]
        if tw > w or th > h:
            continue
        x0, y0, x1, y1 = (int(round(float(v))) for v in xyxy[i])
        best, best_cover = None, math.inf
        for cx, cy in ((x0, y0 - th), (x0, y0), (x0, y1), (x1 - tw, y0 - th), (x0, y1 - th)):
            cx, cy = min(max(cx, 0), w - tw), min(max(cy, 0), h - th)
            rect = (cx, cy, cx + tw, cy + th)
            if any(_overlaps(rect, t) for t in taken):
                continue
            # among the free spots, the one hiding the least of the other objects
            iw = np.clip(np.minimum(xyxy[:, 2], rect[2]) - np.maximum(xyxy[:, 0], rect[0]), 0, None)
            ih = np.clip(np.minimum(xyxy[:, 3], rect[3]) - np.maximum(xyxy[:, 1], rect[1]), 0, None)
            cover = float((iw * ih).sum() - iw[i] * ih[i])
            if cover < best_cover:
                best, best_cover = rect, cover
        if best is not None:
            taken.append(best)
            out[i] = best
    return out


def label_layout(
    detections: Detections,
    shown_scores: torch.Tensor,
    class_names: Sequence[str] | None,
    canvas_size: tuple[int, int],
    *,
    font_size: int = 10,
) -> LabelLayout:
    """The labels ("<class> <score>") of already selected detections and where `draw_detections`
    puts them (`place_labels`, highest score first)."""
    font = _label_font(font_size)
    texts, sizes = [], []
    for label, score in zip(detections.labels.tolist(), shown_scores.tolist()):
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        text = f"{name} {score:.2f}"
        l, t, r, b = font.getbbox(text)
        texts.append(text)
        sizes.append((int(r - min(l, 0)) + 2, int(b - min(t, 0)) + 2))  # 1 px of padding around the text
    priority = torch.argsort(shown_scores, descending=True, stable=True).tolist()
    return LabelLayout(texts, place_labels(detections.boxes, sizes, canvas_size, priority))


def draw_detections(
    image: torch.Tensor | np.ndarray | Image.Image,
    detections: Detections,
    class_names: Sequence[str] | None = None,
    *,
    calibration: ScoreCalibration | None = None,
    score_threshold: float | None = None,
    mask_alpha: float = 0.5,
    draw_boxes: bool = True,
    draw_labels: bool = True,
    font_size: int = 10,
    path: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Draw masks, boxes, class names and scores on an image.

    Masks and boxes are drawn with torchvision's `draw_segmentation_masks` and
    `draw_bounding_boxes`, in the class colour; where masks overlap, the smaller object's colour
    is on top. Labels ("<class> <score>", white on a black box) are placed by `place_labels`, so
    they never overlap: on dense small objects the lower-scoring ones are left out instead.

    Args:
        image: RGB uint8 (3, H, W) tensor, (H, W, 3) array or PIL image, in the detections' pixels
            (the ORIGINAL image, as `Detections` are).
        detections: boxes (D, 4) xyxy, scores (D,), labels (D,), masks (D, H, W) or None.
        class_names: names of the contiguous labels (default: the label number).
        calibration: map scores to precision and threshold those (A.5); the printed score is then
            the calibrated one.
        score_threshold: threshold on the (calibrated, if given) score; default 0.6 calibrated,
            0.5 raw.
        draw_boxes, draw_labels: also draw the boxes, the labels.
        font_size: of the labels, in pixels.
        path: also save the picture as PNG there.

    Returns the picture, uint8 (3, H, W).
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    canvas = _to_uint8_chw(image)
    h, w = canvas.shape[-2:]
    kept, shown = select(detections, calibration=calibration, threshold=score_threshold)
    colours = [class_colour(int(k)) for k in kept.labels]
    if kept.masks is not None and len(kept):
        if tuple(kept.masks.shape[-2:]) != (h, w):
            raise ValueError(f"masks are {tuple(kept.masks.shape[-2:])} but the image is {(h, w)}")
        # each pixel takes the colour of the smallest mask covering it (torchvision blacks out overlaps)
        owner = torch.full((h, w), -1, dtype=torch.int64)
        areas = kept.masks.flatten(1).sum(1)
        for i in torch.argsort(areas, descending=True, stable=True).tolist():
            owner[kept.masks[i].bool()] = i
        disjoint = owner[None] == torch.arange(len(kept))[:, None, None]
        if disjoint.any():
            canvas = draw_segmentation_masks(canvas, disjoint, alpha=mask_alpha, colors=colours)
    if draw_boxes and len(kept):
        boxes = kept.boxes.float().clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
        canvas = draw_bounding_boxes(canvas, boxes, colors=colours, width=max(1, round(min(h, w) / 300)))
    if draw_labels and len(kept):
        layout = label_layout(kept, shown, class_names, (h, w), font_size=font_size)
        picture = Image.fromarray(canvas.permute(1, 2, 0).numpy().copy())
        draw = ImageDraw.Draw(picture)
        font = _label_font(font_size)
        for text, rect in zip(layout.texts, layout.boxes):
            if rect is None:
                continue
            x0, y0, x1, y1 = rect
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(0, 0, 0))
            l, t, _, _ = font.getbbox(text)
            draw.text((x0 + 1 - min(l, 0), y0 + 1 - min(t, 0)), text, fill=(255, 255, 255), font=font)
        canvas = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    result = canvas.contiguous()
    if path is not None:
        save_png(result, path)
    return result


def save_png(picture: torch.Tensor, path: str | os.PathLike) -> Path:
    """uint8 (3, H, W) -> PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)
    return path


def side_by_side(
    images: Sequence[torch.Tensor | np.ndarray | Image.Image],
    detections_a: Sequence[Detections],
    detections_b: Sequence[Detections],
    class_names: Sequence[str] | None = None,
    *,
    names: tuple[str, str] = ("model A", "model B"),
    calibrations: tuple[ScoreCalibration | None, ScoreCalibration | None] = (None, None),
    score_threshold: float | None = None,
    height: int = 256,
    gap: int = 4,
    path: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Two models on the same images, as the paper's Figs. 10-11: model A on the top row, B below.

    Each image is drawn with `draw_detections` (calibrated threshold 0.6 where a model has a
    calibration) and scaled to `height` pixels; a label names each row. Returns uint8 (3, H, W).
    """
    if not (len(images) == len(detections_a) == len(detections_b)) or not images:
        raise ValueError(f"need as many detections as images, got {len(images)}, {len(detections_a)}, {len(detections_b)}")
    rows = []
    for dets, calibration in ((detections_a, calibrations[0]), (detections_b, calibrations[1])):
        tiles = []
        for image, det in zip(images, dets):
            pic = draw_detections(image, det, class_names, calibration=calibration, score_threshold=score_threshold)
            pil = Image.fromarray(pic.permute(1, 2, 0).numpy())
            scale = height / pil.height
            tiles.append(pil.resize((max(1, round(pil.width * scale)), height), Image.BILINEAR))
        rows.append(tiles)
    label_w = 70
    width = label_w + max(sum(t.width for t in row) + gap * (len(row) - 1) for row in rows)
    canvas = Image.new("RGB", (width, 2 * height + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, name) in enumerate(zip(rows, names)):
        y = r * (height + gap)
        draw.text((4, y + height // 2 - 5), str(name)[:11], fill=(0, 0, 0), font=ImageFont.load_default())
        x = label_w
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + gap
    result = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
    if path is not None:
        save_png(result, path)
    return result


def plot_pr_curves(
    calibration: ScoreCalibration,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    marked_scores: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
    columns: int = 4,
) -> Path:
    """One precision-recall panel per category (the curves the calibration maps scores through).

    Points of the curve where the detector score crosses `marked_scores` are labelled, so the
    score -> precision map can be read off. Written with matplotlib's Agg backend (no display).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = list(class_names or calibration.class_names or [str(i) for i in range(len(calibration))])
    n = len(calibration)
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    FigureCanvasAgg(fig)
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        curve = calibration.curves[k]
        title = names[k] if k < len(names) else str(k)
        if curve is None:
            ax.text(0.5, 0.5, "no detections\nor ground truth", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.step(np.r_[0.0, curve.recall], np.r_[curve.precision[0], curve.precision], where="pre")
            for s in marked_scores:
                idx = np.flatnonzero(curve.scores >= s)
                if idx.size:
                    i = idx[-1]
                    ax.plot(curve.recall[i], curve.precision[i], "o", ms=3, color="C3")
                    ax.annotate(f"{s:g}", (curve.recall[i], curve.precision[i]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
            title += f" (AP {100 * average_precision_of(curve):.1f})"
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"PR curves ({calibration.iou_type}), labels: detector score", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close("all")
    return path


def wandb_overlays(
    detections: Detections,
    class_names: Sequence[str] | None = None,
    *,
    calibration: ScoreCalibration | None = None,
    score_threshold: float | None = None,
    ground_truth: Detections | None = None,
    canvas_size: tuple[int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """The W&B overlays of one picture: {"masks": {...}, "boxes": {...}}, the keyword arguments of
    `wandb.Image(image, masks=..., boxes=...)` (plain dicts and arrays; no wandb import here).

    Each has a "predictions" layer (the detections `select` keeps) and, with `ground_truth`
    (boxes, labels, masks in the same pixels; scores unused), a "ground_truth" layer; W&B shows a
    toggle per layer and per class. Class ids are contiguous label + 1 (0 is the masks'
    background). Masks become one class map per layer, the smaller object on top where masks
    overlap; boxes carry their caption "<class> <score>" and the shown (calibrated, if given)
    score, which W&B's score slider filters. `canvas_size` (H, W): the class maps' size when the
    image is padded beyond the masks (at the bottom and right; default: the masks' size).
    """
    names = list(class_names) if class_names is not None else []
    kept, shown = select(detections, calibration=calibration, threshold=score_threshold)
    num_classes = max([len(names)] + [int(k) + 1 for k in kept.labels.tolist()]
                      + ([int(k) + 1 for k in ground_truth.labels.tolist()] if ground_truth is not None else []))
    class_labels = {k + 1: (names[k] if k < len(names) else str(k)) for k in range(num_classes)}
    masks: dict[str, Any] = {}
    boxes: dict[str, Any] = {}
    layers = [("predictions", kept, shown)]
    if ground_truth is not None:
        layers.append(("ground_truth", ground_truth, None))
    for layer, dets, scores in layers:
        labels = dets.labels.detach().cpu().tolist()
        box_data = []
        for i, (x0, y0, x1, y1) in enumerate(dets.boxes.detach().cpu().float().tolist()):
            entry: dict[str, Any] = {
                "position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1},
                "domain": "pixel",
                "class_id": labels[i] + 1,
                "box_caption": class_labels[labels[i] + 1],
            }
            if scores is not None:
                entry["box_caption"] += f" {float(scores[i]):.2f}"
                entry["scores"] = {"score": float(scores[i])}
            box_data.append(entry)
        boxes[layer] = {"box_data": box_data, "class_labels": class_labels}
        if dets.masks is not None:
            m = dets.masks.detach().cpu().bool()
            h, w = canvas_size if canvas_size is not None else m.shape[-2:]
            class_map = torch.zeros((h, w), dtype=torch.uint8 if num_classes < 255 else torch.int32)
            m = torch.nn.functional.pad(m.to(torch.uint8), (0, w - m.shape[-1], 0, h - m.shape[-2])).bool()
            for i in torch.argsort(m.flatten(1).sum(1), descending=True, stable=True).tolist():
                class_map[m[i]] = labels[i] + 1
            masks[layer] = {"mask_data": class_map.numpy(), "class_labels": {0: "background", **class_labels}}
    return {"masks": masks, "boxes": boxes}
