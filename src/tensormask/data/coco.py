"""COCO instance segmentation dataset through pycocotools.

The annotation file is parsed and validated once, in the constructor; each item then only reads
and decodes its image and its pre-indexed annotations (no per-item JSON work), so DataLoader
worker processes keep up with the model.

What is checked, and what happens:
- malformed JSON, missing top-level keys, duplicate ids: error naming the file (and the record);
- an annotation whose image id or category id does not exist: error naming file and annotation;
- an annotation without a usable bbox (not four numbers, or a negative width or height): error
  naming file and annotation;
- a polygon with fewer than 3 points (dropped; the annotation too if nothing is left), a box of
  zero area, a box entirely outside its image (dropped), a box partly outside (clipped): a
  warning with the count and the first few annotation ids;
- a missing image file: error listing the first missing files; a corrupt one, or one whose size
  disagrees with the JSON: error at load time naming the file and the image id; a 16-bit one is
  scaled to 8 bit (`tensormask.data.images.read_image`);
- nothing left to load: error (never a silent empty dataset).
Crowd regions (iscrowd=1) are kept in `coco` for evaluation but are never training targets.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torchvision import tv_tensors

from tensormask.data.images import ImageReadError, read_image
from tensormask.errors import MissingFileError, UserError

log = logging.getLogger(__name__)


class CocoFormatError(UserError, ValueError):
    """A COCO annotation file (or an image it lists) is malformed; the message names file and record.
    A `UserError`: the entry points end it in one line (docs/framework.md#errors)."""


def load_coco_json(annotation_file: str | os.PathLike) -> dict[str, Any]:
    """Parse a COCO instances JSON, with errors that name the file and the position."""
    path = Path(annotation_file)
    if not path.is_file():
        raise MissingFileError(f"COCO annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{path}: not a UTF-8 JSON file ({e})") from e
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{path}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over an already parsed dict (no second JSON parse, no printing)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def decode_masks(rles: list[dict[str, Any]], h: int, w: int) -> np.ndarray:
    """pycocotools RLEs -> (N, h, w) uint8 masks.

    pycocotools' decode trips a numpy 2 DeprecationWarning (``__array__`` copy keyword) on every
    call; it is harmless and would flood logs and test reports, so it is silenced here only.
    """
    if not rles:
        return np.zeros((0, h, w), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        masks = mask_util.decode(rles)  # (h, w, N), Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


class _SkipCounter:
    """Counts skipped/clipped records per reason and warns once with the counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reasons: dict[str, list[int]] = {}

    def add(self, reason: str, ann_id: int) -> None:
        self.reasons.setdefault(reason, []).append(ann_id)

    def warn(self) -> None:
        for reason, ids in self.reasons.items():
            first = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            warnings.warn(f"{self.path}: {len(ids)} annotation(s) {reason} (annotation ids {first})", stacklevel=3)


def _record_id(record: Any, kind: str, path: Path, index: int) -> int:
    if not isinstance(record, dict) or "id" not in record:
        raise CocoFormatError(f"{path}: {kind} record #{index} has no 'id': {str(record)[:200]}")
    rid = record["id"]
    if isinstance(rid, bool) or not isinstance(rid, int):
        raise CocoFormatError(f"{path}: {kind} record #{index} has a non-integer id {rid!r}")
    return rid


def _clean_segmentation(seg: Any, ann_id: int, path: Path, h: int, w: int, skips: _SkipCounter,
                        what: str = "annotation") -> Any | None:
    """Validate a segmentation; return it (polygons with short parts removed: a new list) or None
    to drop the `what` (an annotation, a crowd region), from training and evaluation alike."""
    if isinstance(seg, list):
        polys, short = [], 0
        for poly in seg:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
                raise CocoFormatError(f"{path}: annotation {ann_id}: polygon is not a list of numbers")
            if len(poly) % 2 != 0:
                raise CocoFormatError(f"{path}: annotation {ann_id}: polygon has an odd number of coordinates ({len(poly)})")
            if len(poly) < 6:
                short += 1
                continue
            polys.append(poly)
        if not polys:
            skips.add(f"had no polygon with at least 3 points ({what} skipped)", ann_id)
            return None
        if short:
            skips.add("had a polygon with fewer than 3 points (polygon dropped)", ann_id)
        return polys
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise CocoFormatError(f"{path}: annotation {ann_id}: RLE segmentation needs 'counts' and 'size'")
        if [int(s) for s in seg["size"]] != [h, w]:
            raise CocoFormatError(
                f"{path}: annotation {ann_id}: RLE size {list(seg['size'])} differs from its image's (h, w) = {[h, w]}"
            )
        return seg
    raise CocoFormatError(f"{path}: annotation {ann_id}: segmentation must be a polygon list or an RLE dict")


def _mask_area(seg: Any, h: int, w: int) -> float:
    """The pixel area of a (validated) COCO segmentation: polygons, uncompressed or compressed RLE."""
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, h, w)
    else:
        counts = seg["counts"]
        rle = {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return float(mask_util.area(rle))


def _evaluation_ground_truth(data: dict[str, Any], images: dict[int, dict[str, Any]], unusable: set[int],
                             cleaned_segs: dict[int, Any]) -> dict[str, Any]:
    """`data` as COCOeval can read every annotation of it: without the annotations left with no
    usable polygon, with the short parts of polygons dropped (as in training), and with COCO's
    "iscrowd" (0) and "area" (the mask's) where the file leaves them out (COCOeval reads both)."""
    anns = data["annotations"]
    if not unusable and not cleaned_segs and all("area" in a and "iscrowd" in a for a in anns):
        return data
    out = []
    for a in anns:
        if a["id"] in unusable:
            continue
        if a["id"] in cleaned_segs or "area" not in a or "iscrowd" not in a:
            a = {**a, "segmentation": cleaned_segs.get(a["id"], a["segmentation"])}
            a.setdefault("iscrowd", 0)
            if "area" not in a:
                image = images[a["image_id"]]
                a["area"] = _mask_area(a["segmentation"], int(image["height"]), int(image["width"]))
        out.append(a)
    return {**data, "annotations": out}


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances (boxes, masks, classes) of one split.

    Args:
        image_dir: folder the images' ``file_name`` are relative to.
        annotation_file: COCO instances JSON.
        transforms: a torchvision.transforms.v2 callable applied to the item dict (see
            `tensormask.data.transforms.build_transforms`); None leaves the image as stored.
        train: training split (drops images without annotations unless `drop_empty` says otherwise).
        drop_empty: drop images without any non-crowd annotation; default: `train`. Evaluation
            keeps every image (an image without objects still counts for false positives).
        check_files: check at construction that every image file exists.
        category_ids: the categories that are classes (contiguous labels in sorted id order);
            annotations of other categories are skipped with a warning. None: every category of the file.

    Each item is a dict:
        ``image``      tv_tensors.Image uint8 (3, h, w) RGB;
        ``boxes``      tv_tensors.BoundingBoxes float32 (N, 4) XYXY in the item's pixels;
        ``masks``      tv_tensors.Mask uint8 (N, h, w);
        ``labels``     int64 (N,) contiguous class index 0..K-1;
        ``image_id``   int COCO image id;  ``orig_size`` (h0, w0) as stored on disk.
    Crowd annotations are left out of the items (they stay in `coco` for evaluation).

    Attributes (the class-mapping contract): ``contiguous_to_coco`` list[int], ``coco_to_contiguous``
    dict[int, int], ``class_names`` list[str], ``coco`` (pycocotools COCO), ``annotation_file``,
    ``image_ids`` (the ids of the items, in order).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        *,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        train: bool,
        drop_empty: bool | None = None,
        check_files: bool = True,
        category_ids: list[int] | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = str(annotation_file)
        self.transforms = transforms
        self.train = train
        self.drop_empty = train if drop_empty is None else drop_empty
        path = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise MissingFileError(f"image folder not found: {self.image_dir} (for {path})")

        data = load_coco_json(path)
        # categories -> contiguous ids, sorted by COCO id (the usual convention)
        cats: dict[int, dict[str, Any]] = {}
        for i, c in enumerate(data["categories"]):
            cid = _record_id(c, "category", path, i)
            if cid in cats:
                raise CocoFormatError(f"{path}: duplicate category id {cid}")
            cats[cid] = c
        if not cats:
            raise CocoFormatError(f"{path}: no categories")
        if category_ids is not None:
            unknown = sorted(set(int(c) for c in category_ids) - set(cats))
            if unknown:
                raise CocoFormatError(f"{path}: no categories {unknown} (category_ids); it has {sorted(cats)}")
        self.contiguous_to_coco: list[int] = sorted(cats) if category_ids is None else sorted(int(c) for c in category_ids)
        self.coco_to_contiguous: dict[int, int] = {cid: i for i, cid in enumerate(self.contiguous_to_coco)}
        self.class_names: list[str] = [str(cats[cid].get("name", cid)) for cid in self.contiguous_to_coco]

        images: dict[int, dict[str, Any]] = {}
        for i, im in enumerate(data["images"]):
            iid = _record_id(im, "image", path, i)
            if iid in images:
                raise CocoFormatError(f"{path}: duplicate image id {iid}")
            for key in ("file_name", "height", "width"):
                if key not in im:
                    raise CocoFormatError(f"{path}: image {iid} has no {key!r}")
            images[iid] = im
        if not images:
            raise CocoFormatError(f"{path}: no images")

        skips = _SkipCounter(path)
        # what evaluation's ground truth (`self.coco`) gets too: COCOeval rasterises every
        # annotation's mask, and fails on an empty or too short polygon
        unusable: set[int] = set()
        cleaned_segs: dict[int, Any] = {}
        per_image: dict[int, list[dict[str, Any]]] = {iid: [] for iid in images}
        seen_ann: set[int] = set()
        for i, ann in enumerate(data["annotations"]):
            aid = _record_id(ann, "annotation", path, i)
            if aid in seen_ann:
                raise CocoFormatError(f"{path}: duplicate annotation id {aid}")
            seen_ann.add(aid)
            iid = ann.get("image_id")
            if iid not in images:
                raise CocoFormatError(f"{path}: annotation {aid} points at image id {iid!r}, which is not in 'images'")
            cid = ann.get("category_id")
            if cid not in cats:
                raise CocoFormatError(
                    f"{path}: annotation {aid} has unknown category id {cid!r} (known: {self.contiguous_to_coco})"
                )
            h, w = int(images[iid]["height"]), int(images[iid]["width"])
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
                raise CocoFormatError(f"{path}: annotation {aid}: 'bbox' must be [x, y, w, h], got {bbox!r}")
            seg = ann.get("segmentation")
            if seg is None:
                raise CocoFormatError(f"{path}: annotation {aid} has no 'segmentation'")
            crowd = bool(ann.get("iscrowd", 0))
            if crowd:  # honoured by evaluation through `self.coco`, never a training target
                if isinstance(seg, list):
                    cleaned = _clean_segmentation(seg, aid, path, h, w, skips, what="crowd region")
                    if cleaned is None:
                        unusable.add(aid)
                    elif len(cleaned) != len(seg):  # short parts dropped
                        cleaned_segs[aid] = cleaned
                continue
            if cid not in self.coco_to_contiguous:
                skips.add("had a category that is not one of the classes (skipped)", aid)
                continue
            x, y, bw, bh = (float(v) for v in bbox)
            if bw < 0 or bh < 0:  # COCO's bbox is [x, y, width, height]: a negative size is no box at all
                raise CocoFormatError(
                    f"{path}: annotation {aid}: malformed 'bbox' {bbox!r}: negative width or height "
                    "(COCO boxes are [x, y, width, height])"
                )
            if bw == 0 or bh == 0:
                skips.add("had a box of zero area (skipped)", aid)
                continue
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
            if x1 <= x0 or y1 <= y0:
                skips.add("had a box outside the image (skipped)", aid)
                continue
            if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
                skips.add("had a box partly outside the image (clipped)", aid)
            cleaned = _clean_segmentation(seg, aid, path, h, w, skips)
            if cleaned is None:
                unusable.add(aid)
                continue
            if isinstance(seg, list) and len(cleaned) != len(seg):  # short parts dropped
                cleaned_segs[aid] = cleaned
            seg = cleaned
            per_image[iid].append(
                {"box": (x0, y0, x1, y1), "label": self.coco_to_contiguous[cid], "segmentation": seg}
            )
        skips.warn()

        ids = sorted(images)
        if self.drop_empty:
            kept = [iid for iid in ids if per_image[iid]]
            if len(kept) < len(ids):
                log.info("%s: dropped %d of %d images without annotations (training)", path, len(ids) - len(kept), len(ids))
            ids = kept
        if not ids:
            raise CocoFormatError(
                f"{path}: no image left to load ({len(images)} images, {len(data['annotations'])} annotations"
                + (", images without annotations dropped" if self.drop_empty else "")
                + ")"
            )
        if check_files:
            missing = [images[i]["file_name"] for i in ids if not (self.image_dir / images[i]["file_name"]).is_file()]
            if missing:
                windows = [m for m in missing if "\\" in str(m)]
                raise MissingFileError(
                    f"{path}: {len(missing)} image file(s) missing under {self.image_dir}, e.g. {missing[:5]}"
                    + (f"; {len(windows)} file_name(s) use Windows' '\\' between folders: write them with '/'"
                       if windows else "")
                )

        self.image_ids: list[int] = ids
        self._images = [images[i] for i in ids]
        self._anns = [per_image[i] for i in ids]
        self.coco = coco_from_dict(_evaluation_ground_truth(data, images, unusable, cleaned_segs))

    @property
    def num_classes(self) -> int:
        return len(self.contiguous_to_coco)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, index: int) -> torch.Tensor:
        """The stored image as uint8 (3, h0, w0) RGB; errors name the file and the image id."""
        info = self._images[index]
        file = self.image_dir / info["file_name"]
        try:
            image = read_image(file)  # 16-bit files scaled to 8 bit, not clipped (data/images.py)
        except FileNotFoundError as e:
            raise MissingFileError(f"image file missing: {file} (image id {info['id']} in {self.annotation_file})") from e
        except ImageReadError as e:
            raise CocoFormatError(
                f"cannot decode image {file} (image id {info['id']} in {self.annotation_file}): {e.reason}"
            ) from e
        h0, w0 = int(info["height"]), int(info["width"])
        if tuple(image.shape[-2:]) != (h0, w0):
            raise CocoFormatError(
                f"image {file} (image id {info['id']} in {self.annotation_file}) is {tuple(image.shape[-2:])} (h, w) "
                f"but the JSON says {(h0, w0)}"
            )
        return image

    def load_target(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """boxes (N, 4) float32 xyxy, masks (N, h0, w0) uint8, labels (N,) int64, non-crowd only."""
        info = self._images[index]
        h, w = int(info["height"]), int(info["width"])
        anns = self._anns[index]
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["label"] for a in anns], dtype=torch.int64)
        rles = []
        for a in anns:
            seg = a["segmentation"]
            if isinstance(seg, list):  # polygons: rasterised by pycocotools, parts merged
                rles.append(mask_util.merge(mask_util.frPyObjects(seg, h, w)))
            elif isinstance(seg["counts"], list):  # uncompressed RLE
                rles.append(mask_util.frPyObjects(seg, h, w))
            else:  # compressed RLE
                rles.append({"size": seg["size"], "counts": seg["counts"]})
        masks = decode_masks(rles, h, w)
        return boxes, torch.from_numpy(masks), labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.load_image(index)
        boxes, masks, labels = self.load_target(index)
        h0, w0 = image.shape[-2:]
        item = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h0, w0)),
            "masks": tv_tensors.Mask(masks),
            "labels": labels,
            "image_id": self.image_ids[index],
            "orig_size": (int(h0), int(w0)),
        }
        if self.transforms is not None:
            item = self.transforms(item)
        return item

    def __repr__(self) -> str:
        return (
            f"CocoInstances({self.annotation_file!r}, images={len(self)}, classes={self.num_classes}, "
            f"train={self.train}, drop_empty={self.drop_empty})"
        )
