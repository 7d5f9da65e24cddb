"""A synthetic dataset in real COCO format: the default dataset of every entry point.

`make_synthetic_coco` draws shapes (circle, square, triangle, star, ring, ...) of sizes that span
several pyramid levels, overlapping and occluding each other, on textured backgrounds, and writes

    root/train/000000000001.png ...        RGB images
    root/val/...
    root/annotations/instances_train.json  COCO instances (exact masks as polygons or RLE)
    root/annotations/instances_val.json
    root/params.json                       the parameters; written last, it marks a complete dataset

Every mask is the exact set of pixels painted with the object's colour: the shape is rasterised
with pycocotools (the same rasteriser that decodes the annotation), and objects drawn later
occlude earlier ones. An object whose visible mask is exactly its polygon is stored as a polygon,
every other object (occluded, or a ring, whose hole a COCO polygon cannot express) as compressed
RLE, so both code paths of the COCO reader run on every use. Category ids are deliberately
non-contiguous (1, 3, 5, ...) so the contiguous-id mapping is exercised too.

The generation is deterministic for a seed (each image has its own random stream), idempotent
(a folder whose params.json matches is reused) and atomic (written to a temporary sibling folder
and renamed into place, so an interrupted run never leaves a dataset that looks complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
from tqdm.auto import tqdm

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "diamond")
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$TENSORMASK_CACHE`` if set, else ``~/.cache/tensormask``."""
    env = os.environ.get("TENSORMASK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tensormask"


def _params(
    seed: int,
    num_train: int,
    num_val: int,
    image_size: int | tuple[int, int],
    num_classes: int,
    min_objects: int,
    max_objects: int,
    min_object_size: int,
    max_object_size: int | None,
    size_jitter: float,
    mask_format: str,
) -> dict[str, Any]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    h, w = (int(s) for s in image_size)
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPES)}] (one shape per class), got {num_classes}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if min(h, w) < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {(h, w)}")
    if not 0.0 <= size_jitter < 1.0:
        raise ValueError(f"size_jitter must be in [0, 1), got {size_jitter}")
    if mask_format not in ("mixed", "rle"):
        raise ValueError(f"mask_format must be 'mixed' or 'rle', got {mask_format!r}")
    if max_object_size is None:
        max_object_size = int(0.75 * min(h, w))
    if not 4 <= min_object_size <= max_object_size:
        raise ValueError(f"need 4 <= min_object_size <= max_object_size, got {min_object_size}, {max_object_size}")
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [h, w],
        "num_classes": int(num_classes),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
        "min_object_size": int(min_object_size),
        "max_object_size": int(max_object_size),
        "size_jitter": float(size_jitter),
        "mask_format": mask_format,
    }


def _params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _info(root: Path, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "root": str(root),
        "train_images": str(root / "train"),
        "train_annotations": str(root / "annotations" / "instances_train.json"),
        "val_images": str(root / "val"),
        "val_annotations": str(root / "annotations" / "instances_val.json"),
        "num_classes": params["num_classes"],
        "class_names": list(SHAPES[: params["num_classes"]]),
        "category_ids": [2 * i + 1 for i in range(params["num_classes"])],
        "params": params,
    }


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    marker = root / "params.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def make_synthetic_coco(
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    num_train: int = 64,
    num_val: int = 16,
    image_size: int | tuple[int, int] = 256,
    num_classes: int = 5,
    min_objects: int = 2,
    max_objects: int = 6,
    min_object_size: int = 12,
    max_object_size: int | None = None,
    size_jitter: float = 0.25,
    mask_format: str = "mixed",
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or reuse) a synthetic COCO-format instance segmentation dataset.

    Args:
        root: output folder; default ``default_cache_dir()/synthetic/<hash of the parameters>``.
        seed: random seed; the same parameters give byte-identical files.
        num_train, num_val: number of images per split.
        image_size: largest (h, w) of an image (an int means square). Each image's height and width
            are drawn independently in [(1 - size_jitter) * size, size], so sizes vary as in COCO.
        num_classes: number of shape classes, taken in order from `SHAPES` (at most 8).
        min_objects, max_objects: objects drawn per image (before dropping hidden ones).
        min_object_size, max_object_size: the object's extent in pixels, drawn log-uniformly
            (default max: 3/4 of the shorter image side), so objects fall on several pyramid levels.
        mask_format: "mixed" (polygons where exact, compressed RLE elsewhere) or "rle" (all RLE).
        progress: show a tqdm progress bar.

    Returns:
        dict with ``root``, ``train_images``, ``train_annotations``, ``val_images``,
        ``val_annotations`` (paths as str), ``num_classes``, ``class_names``, ``category_ids``
        (the COCO ids, 1, 3, 5, ...) and ``params``.
    """
    params = _params(
        seed, num_train, num_val, image_size, num_classes, min_objects, max_objects,
        min_object_size, max_object_size, size_jitter, mask_format,
    )
    if root is None:
        root = default_cache_dir() / "synthetic" / _params_hash(params)
    root = Path(root).expanduser().absolute()
    if _is_complete(root, params):
        return _info(root, params)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _generate(tmp, params, progress)
        # params.json last: its presence marks a complete dataset.
        (tmp / "params.json").write_text(json.dumps(params, sort_keys=True, indent=1))
        _move_into_place(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _info(root, params)


def _move_into_place(tmp: Path, root: Path, params: dict[str, Any]) -> None:
    """Atomically rename `tmp` to `root`, replacing a stale or partial folder there."""
    if root.exists():
        if _is_complete(root, params):  # another process finished first
            return
        if any(root.iterdir()) and not (root / "params.json").exists() and not (root / "annotations").exists():
            raise FileExistsError(f"{root} exists and is not a synthetic dataset; refusing to overwrite it")
        stale = root.with_name(f".{root.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(root, stale)
        except FileNotFoundError:
            stale = None
    else:
        stale = None
    try:
        os.rename(tmp, root)
    except OSError:
        # Lost a race against another process that renamed its own copy into place.
        if not _is_complete(root, params):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- drawing


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outline(s) of a shape of "radius" r centred at (cx, cy), as (K, 2) xy arrays.

    Returns (filled polygons whose union is the shape, polygons of holes cut out of it).
    """

    def ring_pts(n: int, radius: float | np.ndarray, phase: float = 0.0) -> np.ndarray:
        t = angle + phase + 2 * np.pi * np.arange(n) / n
        return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)

    if shape == "circle":
        return [ring_pts(max(16, int(2 * np.pi * r / 2)), r)], []
    if shape == "square":
        return [ring_pts(4, r, np.pi / 4)], []
    if shape == "triangle":
        return [ring_pts(3, r, -np.pi / 2)], []
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [ring_pts(10, radii, -np.pi / 2)], []
    if shape == "ring":
        n = max(16, int(2 * np.pi * r / 2))
        return [ring_pts(n, r)], [ring_pts(n, 0.55 * r)]
    if shape == "cross":
        a, b = r, 0.35 * r
        c, s = np.cos(angle), np.sin(angle)
        rects = []
        for hx, hy in ((a, b), (b, a)):
            pts = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
            rot = pts @ np.array([[c, s], [-s, c]])
            rects.append(rot + np.array([cx, cy]))
        return rects, []
    if shape == "hexagon":
        return [ring_pts(6, r)], []
    if shape == "diamond":
        t = angle + np.array([0, np.pi / 2, np.pi, 3 * np.pi / 2])
        radii = np.array([r, 0.6 * r, r, 0.6 * r])
        return [np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)], []
    raise ValueError(f"unknown shape {shape!r}")


def _rasterise(polys: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Union of polygons as an (h, w) bool mask, with pycocotools' rasteriser."""
    from tensormask.data.coco import decode_masks

    rles = mask_util.frPyObjects([p.reshape(-1).tolist() for p in polys], h, w)
    return decode_masks([mask_util.merge(rles)], h, w)[0].astype(bool)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured (h, w, 3) float background: gradient + stripes or checker + noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    t = (xx * np.cos(rng.uniform(0, np.pi)) + yy * np.sin(rng.uniform(0, np.pi))) / max(h, w)
    img = c0 + (c1 - c0) * ((t - t.min()) / (np.ptp(t) + 1e-6))[..., None]
    kind = rng.integers(3)
    period = rng.uniform(6, 40)
    if kind == 0:
        phase = xx * np.cos(rng.uniform(0, np.pi)) + yy * np.sin(rng.uniform(0, np.pi))
        img += rng.uniform(10, 35) * np.sin(2 * np.pi * phase / period)[..., None]
    elif kind == 1:
        checker = ((xx // period).astype(int) + (yy // period).astype(int)) % 2
        img += rng.uniform(10, 35) * (checker[..., None] - 0.5)
    img += rng.normal(0, rng.uniform(3, 12), size=(h, w, 3))
    return img


def _object_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An object's (h, w, 3) fill: a saturated colour with a little noise (strong edges on purpose)."""
    colour = rng.uniform(0, 255, size=3)
    colour[rng.integers(3)] = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])
    return colour + rng.normal(0, rng.uniform(2, 8), size=(h, w, 3))


def _draw_image(rng: np.random.Generator, params: dict[str, Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (h, w, 3) uint8 and its objects (class index, visible mask, polygon if exact)."""
    H, W = params["image_size"]
    jitter = params["size_jitter"]
    h = int(round(H * rng.uniform(1 - jitter, 1.0)))
    w = int(round(W * rng.uniform(1 - jitter, 1.0)))
    img = _background(rng, h, w)
    lo, hi = params["min_object_size"], min(params["max_object_size"], min(h, w))
    n = int(rng.integers(params["min_objects"], params["max_objects"] + 1))
    objects: list[dict[str, Any]] = []
    for _ in range(n):
        label = int(rng.integers(params["num_classes"]))
        size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        r = size / 2
        # centre may sit near the border (partly visible objects), but most of it stays inside
        cx = rng.uniform(0.2 * r, w - 0.2 * r)
        cy = rng.uniform(0.2 * r, h - 0.2 * r)
        polys, holes = _shape_polygons(SHAPES[label], cx, cy, r, rng.uniform(0, 2 * np.pi))
        # rounded as written to the JSON, so the stored polygon rasterises to exactly this mask
        polys = [np.round(p, 2) for p in polys]
        mask = _rasterise(polys, h, w)
        if holes:
            mask &= ~_rasterise(holes, h, w)
        if mask.sum() < 16:
            continue
        for o in objects:  # the new object occludes the ones drawn before it
            o["mask"] &= ~mask
        img[mask] = _object_texture(rng, h, w)[mask]
        objects.append({"label": label, "mask": mask, "full": mask.copy(), "polys": None if holes else polys})
    kept = []
    for o in objects:
        visible = int(o["mask"].sum())
        # drop objects that are hidden or nearly so: their few pixels carry no shape
        if visible < 16 or visible < 0.25 * o["full"].sum():
            continue
        exact_polygon = o["polys"] is not None and np.array_equal(o["mask"], o["full"])
        kept.append({"label": o["label"], "mask": o["mask"], "polys": o["polys"] if exact_polygon else None})
    return np.clip(img, 0, 255).astype(np.uint8), kept


def _encode(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _generate(out: Path, params: dict[str, Any], progress: bool) -> None:
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": 2 * i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES[: params["num_classes"]])
    ]
    splits = [("train", params["num_train"], 0), ("val", params["num_val"], 1)]
    bar = tqdm(total=params["num_train"] + params["num_val"], desc="synthetic COCO", disable=not progress, leave=False)
    for split, count, split_index in splits:
        (out / split).mkdir()
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([params["seed"], split_index, i])
            image, objects = _draw_image(rng, params)
            image_id = i + 1
            file_name = f"{image_id:012d}.png"
            Image.fromarray(image).save(out / split / file_name)
            h, w = image.shape[:2]
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for o in objects:
                rle = mask_util.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
                x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
                if o["polys"] is not None and params["mask_format"] == "mixed":
                    seg: Any = [[float(v) for v in p.reshape(-1)] for p in o["polys"]]
                else:
                    seg = _encode(o["mask"])
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[o["label"]]["id"],
                    "segmentation": seg,
                    "area": float(mask_util.area(rle)),
                    "bbox": [x, y, bw, bh],
                    "iscrowd": 0,
                })
            bar.update(1)
        data = {
            "info": {"description": "tensormask synthetic shapes", "version": str(FORMAT_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data, sort_keys=True))
    bar.close()
