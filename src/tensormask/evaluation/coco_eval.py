"""COCO bbox and segm evaluation of `Detections`, with pycocotools or faster-coco-eval.

Detections (original-image pixels, contiguous labels) become standard COCO results: boxes as
[x, y, w, h], category ids mapped back through ``contiguous_to_coco``, masks as compressed RLE.
Under torch.distributed every rank's results are gathered (``all_gather_object``); images seen by
more than one rank (a DistributedSampler pads the last batch with repeats) count once, so the
numbers equal those of one process over the same images. Evaluation runs on rank 0 and its
numbers are broadcast, so every rank returns the same dict.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tensormask.structures import Detections

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")
RESULTS_FILE = "coco_instances_results.json"


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def detections_to_coco_results(
    image_id: int, detections: Detections, contiguous_to_coco: Sequence[int], *, with_masks: bool = True
) -> list[dict[str, Any]]:
    """One image's detections as COCO result records.

    boxes (D, 4) xyxy -> "bbox" [x, y, w, h]; labels (D,) -> "category_id" through
    `contiguous_to_coco`; masks (D, h0, w0) bool -> "segmentation" compressed RLE (counts as str).
    """
    n = len(detections)
    if n == 0:
        return []
    boxes = detections.boxes.detach().float().cpu().reshape(-1, 4)
    scores = detections.scores.detach().float().cpu().reshape(-1)
    labels = detections.labels.detach().cpu().reshape(-1)
    if not (boxes.shape[0] == scores.shape[0] == labels.shape[0]):
        raise ValueError(f"image {image_id}: {boxes.shape[0]} boxes, {scores.shape[0]} scores, {labels.shape[0]} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(contiguous_to_coco)):
        raise ValueError(
            f"image {image_id}: label out of range [0, {len(contiguous_to_coco)}): {labels.min().item()}..{labels.max().item()}"
        )
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rles = None
    if with_masks and detections.masks is not None:
        masks = detections.masks.detach().cpu()
        if masks.shape[0] != n:
            raise ValueError(f"image {image_id}: {masks.shape[0]} masks for {n} detections")
        # pycocotools wants (h, w, D) Fortran-ordered uint8
        array = np.asfortranarray(masks.to(torch.uint8).permute(1, 2, 0).numpy())
        with _quiet():
            rles = mask_util.encode(array)
    results = []
    for k in range(n):
        r = {
            "image_id": int(image_id),
            "category_id": int(contiguous_to_coco[int(labels[k])]),
            "bbox": [round(float(v), 3) for v in xywh[k]],
            "score": float(scores[k]),
        }
        if rles is not None:
            r["segmentation"] = {"size": [int(s) for s in rles[k]["size"]], "counts": rles[k]["counts"].decode("ascii")}
        results.append(r)
    return results


def _load_gt(coco_gt: COCO | str | os.PathLike | dict) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    if hasattr(coco_gt, "dataset") and hasattr(coco_gt, "getImgIds"):  # faster_coco_eval's COCO
        return _pycoco_from_dict(coco_gt.dataset)
    if isinstance(coco_gt, dict):
        return _pycoco_from_dict(coco_gt)
    from tensormask.data.coco import coco_from_dict, load_coco_json

    return coco_from_dict(load_coco_json(coco_gt))


def _pycoco_from_dict(data: dict) -> COCO:
    from tensormask.data.coco import coco_from_dict

    return coco_from_dict(data)


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' progress prints and its harmless numpy 2 DeprecationWarning."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        yield


def run_cocoeval(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_type: str,
    image_ids: Sequence[int] | None = None,
    backend: str = "pycocotools",
    cat_ids: Sequence[int] | None = None,
) -> Any:
    """Evaluate, accumulate and summarise `results` against `coco_gt`; returns the COCOeval object.

    `image_ids` restricts the evaluation (default: every image of `coco_gt`), `cat_ids` the
    categories averaged over (default: every category of `coco_gt`). The results list is not
    modified (loadRes annotates its records in place, so it gets a copy).
    """
    results = copy.deepcopy(results)
    if iou_type == "bbox":
        for r in results:  # a box evaluation must not see masks (loadRes would take their area)
            r.pop("segmentation", None)
    if backend == "pycocotools":
        gt = coco_gt
        with _quiet():
            dt = gt.loadRes(results) if results else _empty_results(gt, COCO)
            ev = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(set(int(i) for i in image_ids))
            if cat_ids is not None:
                ev.params.catIds = sorted(set(int(c) for c in cat_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("backend 'faster_coco_eval' needs `pip install faster-coco-eval`") from e
        with _quiet():
            gt = FCOCO(copy.deepcopy(coco_gt.dataset), print_function=log.debug)
            dt = gt.loadRes(results) if results else _empty_results(gt, FCOCO)
            ev = COCOeval_faster(gt, dt, iou_type, print_function=log.debug, rle_iou_max_workers=2)
            if image_ids is not None:
                ev.params.imgIds = sorted(set(int(i) for i in image_ids))
            if cat_ids is not None:
                ev.params.catIds = sorted(set(int(c) for c in cat_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")


def _empty_results(gt: Any, coco_cls: type) -> Any:
    """A results object with no detections (loadRes refuses an empty list)."""
    dt = coco_cls()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]), "annotations": []}
    with _quiet():
        dt.createIndex()
    return dt


def stats_to_metrics(stats: Iterable[float]) -> dict[str, float]:
    """COCOeval.stats (12 numbers) -> named metrics, with -1 (no ground truth) as nan."""
    stats = [float(s) for s in list(stats)[:12]]
    if len(stats) != 12:
        raise ValueError(f"expected 12 COCO summary numbers, got {len(stats)}")
    return {name: (math.nan if s < 0 else s) for name, s in zip(METRIC_NAMES, stats)}


def per_category_ap(cocoeval: Any) -> dict[int, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each evaluated COCO category id; nan without ground truth."""
    precision = np.asarray(cocoeval.eval["precision"])  # (T, R, K, A, M)
    out = {}
    for k, cat_id in enumerate(cocoeval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[int(cat_id)] = float(p.mean()) if p.size else math.nan
    return out


class COCOEvaluator:
    """Accumulates detections over a dataset (and over ranks) and computes COCO AP.

    Args:
        coco_gt_or_annotation_file: a pycocotools COCO (e.g. ``dataset.coco``), a dict, or a path.
        contiguous_to_coco: COCO category id of each contiguous label (``dataset.contiguous_to_coco``).
        iou_types: any of "bbox", "segm".
        backend: "pycocotools" or "faster_coco_eval" (same numbers, faster on large sets).
        output_dir: if given, rank 0 writes the COCO results JSON there (`RESULTS_FILE`).
        per_category: add "AP-<class name>" entries to each metrics dict (and `per_category_table`).
        class_names: names for the per-category table (default: the categories' names in the GT).

    Use: ``reset()``; ``process(image_ids, detections)`` per batch; ``evaluate()``.
    """

    def __init__(
        self,
        coco_gt_or_annotation_file: COCO | str | os.PathLike | dict,
        contiguous_to_coco: Sequence[int],
        *,
        iou_types: Sequence[str] = ("bbox", "segm"),
        backend: str = "pycocotools",
        output_dir: str | os.PathLike | None = None,
        per_category: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")
        bad = [t for t in iou_types if t not in ("bbox", "segm")]
        if bad or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of ('bbox', 'segm'), got {tuple(iou_types)}")
        self.coco_gt = _load_gt(coco_gt_or_annotation_file)
        self.contiguous_to_coco = [int(c) for c in contiguous_to_coco]
        unknown = [c for c in self.contiguous_to_coco if c not in self.coco_gt.cats]
        if unknown:
            raise ValueError(f"contiguous_to_coco has category ids {unknown} that the ground truth does not define")
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.per_category = per_category
        if class_names is None:
            class_names = [self.coco_gt.cats[c].get("name", str(c)) for c in self.contiguous_to_coco]
        self.class_names = list(class_names)
        self.cocoevals: dict[str, Any] = {}
        self.per_category_results: dict[str, dict[str, float]] = {}
        self.reset()

    def reset(self) -> None:
        self.last_results: list[dict[str, Any]] = []
        self._predictions: dict[int, list[dict[str, Any]]] = {}
        self._box_only_images = 0

    def process(self, image_ids: Sequence[int], detections: Sequence[Detections]) -> None:
        """Add one batch: `detections[i]` (original-image pixels) belongs to COCO image `image_ids[i]`."""
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detections")
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id)
            info = self.coco_gt.imgs.get(image_id)
            if info is None:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if det.masks is not None and len(det) and tuple(det.masks.shape[-2:]) != (info["height"], info["width"]):
                raise ValueError(
                    f"image {image_id}: masks are {tuple(det.masks.shape[-2:])} but the image is "
                    f"{(info['height'], info['width'])}; masks must be in original image pixels"
                )
            if det.masks is None:
                self._box_only_images += 1
            self._predictions[image_id] = detections_to_coco_results(image_id, det, self.contiguous_to_coco)

    def _gather(self) -> tuple[dict[int, list[dict[str, Any]]], int]:
        rank, world = _dist_rank_world()
        if world == 1:
            return self._predictions, self._box_only_images
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (self._predictions, self._box_only_images))
        merged: dict[int, list[dict[str, Any]]] = {}
        box_only = 0
        for preds, n_box_only in gathered:
            for image_id, res in preds.items():
                merged.setdefault(image_id, res)  # a repeated image (sampler padding) counts once
            box_only += n_box_only
        return merged, box_only

    def results(self) -> list[dict[str, Any]]:
        """This process's COCO result records so far (not gathered)."""
        return [r for image_id in sorted(self._predictions) for r in self._predictions[image_id]]

    def evaluate(self) -> dict[str, dict[str, float]]:
        """COCO metrics per IoU type, fractions in [0, 1] (nan where COCO reports -1).

        Returns e.g. {"bbox": {"AP": .., "AP50": .., ..., "ARl": ..}, "segm": {...}}; "segm" is
        left out when any detections came without masks (box-only model). Every rank gets the same.
        """
        predictions, box_only = self._gather()
        rank, world = _dist_rank_world()
        payload: list[Any] = [None]
        if rank == 0:
            payload[0] = self._evaluate_gathered(predictions, box_only)
        if world > 1:
            dist.broadcast_object_list(payload, src=0)
        metrics, per_cat = payload[0]
        self.per_category_results = per_cat
        return metrics

    def _evaluate_gathered(self, predictions: dict[int, list[dict[str, Any]]], box_only: int) -> tuple[dict, dict]:
        if not predictions:
            raise RuntimeError("COCOEvaluator.evaluate() called before any process(): no images to evaluate")
        image_ids = sorted(predictions)
        results = [r for i in image_ids for r in predictions[i]]
        self.last_results = results  # all ranks' results (on rank 0), e.g. for ScoreCalibration.fit
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / RESULTS_FILE
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results))
            os.replace(tmp, path)
            log.info("wrote %d COCO results to %s", len(results), path)
        self._warn_other_categories(image_ids)
        metrics: dict[str, dict[str, float]] = {}
        per_cat: dict[str, dict[str, float]] = {}
        for iou_type in self.iou_types:
            if iou_type == "segm" and box_only:
                warnings.warn(f"{box_only} image(s) have detections without masks: segm evaluation skipped", stacklevel=3)
                continue
            ev = run_cocoeval(self.coco_gt, results, iou_type, image_ids=image_ids, backend=self.backend,
                              cat_ids=self.contiguous_to_coco)
            self.cocoevals[iou_type] = ev
            metrics[iou_type] = stats_to_metrics(ev.stats)
            if self.per_category:
                by_id = per_category_ap(ev)
                names = {c: n for c, n in zip(self.contiguous_to_coco, self.class_names)}
                per_cat[iou_type] = {names.get(c, str(c)): ap for c, ap in by_id.items()}
                metrics[iou_type].update({f"AP-{n}": ap for n, ap in per_cat[iou_type].items()})
        return metrics, per_cat

    def _warn_other_categories(self, image_ids: Sequence[int]) -> None:
        """Only the classes (`contiguous_to_coco`) are evaluated: the model cannot detect any other
        category, which would count as AP 0 in the mean. Ground-truth objects of other categories
        (a category left out with data.category_ids, or one only this file uses) are named here."""
        classes, evaluated = set(self.contiguous_to_coco), set(image_ids)
        others: dict[int, int] = {}
        for ann in self.coco_gt.dataset.get("annotations", []):
            cid = ann.get("category_id")
            if cid not in classes and ann.get("image_id") in evaluated and not ann.get("iscrowd", 0):
                others[cid] = others.get(cid, 0) + 1
        if others:
            names = ", ".join(f"{n} annotation(s) of '{self.coco_gt.cats.get(c, {}).get('name', c)}' (id {c})"
                              for c, n in sorted(others.items()))
            log.warning("left out of the evaluation: %s: not one of the classes (%s)", names,
                        ", ".join(self.class_names))

    def per_category_table(self) -> str:
        """The per-category AP of the last `evaluate()` (needs per_category=True) as a text table."""
        if not self.per_category_results:
            raise RuntimeError("no per-category results: construct with per_category=True and call evaluate()")
        return format_per_category_table(self.per_category_results)


def _fmt(v: float | None) -> str:
    # None: a NaN that went through strict JSON (run summaries store NaN as null)
    return "  nan" if v is None or math.isnan(v) else f"{100 * v:5.1f}"


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """The 12 COCO numbers of each IoU type as a table, in percent (as papers print them)."""
    header = f"{'':6s} " + " ".join(f"{n:>5s}" for n in METRIC_NAMES)
    lines = [header]
    for iou_type, m in metrics.items():
        lines.append(f"{iou_type:6s} " + " ".join(_fmt(m.get(n, math.nan)) for n in METRIC_NAMES))
    return "\n".join(lines)


def format_per_category_table(per_category: dict[str, dict[str, float]]) -> str:
    """Per-category AP (percent), one row per category, one column per IoU type."""
    types = list(per_category)
    names = list(dict.fromkeys(n for t in types for n in per_category[t]))
    width = max([8] + [len(n) for n in names])
    lines = [f"{'category':{width}s} " + " ".join(f"{t:>6s}" for t in types)]
    for n in names:
        lines.append(f"{n:{width}s} " + " ".join(f"{_fmt(per_category[t].get(n, math.nan)):>6s}" for t in types))
    return "\n".join(lines)
