"""Score-to-precision calibration (TensorMask appendix A.5).

"For each model and for each category, we compute its precision-recall (PR) curve on val2017. As a
PR curve is parameterized by score, we can map an uncalibrated score for the detector-category
pair to its corresponding precision value." The paper's pictures then show every detection whose
calibrated score is >= 0.6, so two models are compared at one threshold.

Here the PR curve of a category is COCO's: detections matched to ground truth greedily by score
at an IoU threshold (crowd regions and ignored objects neither help nor hurt), sorted by score;
at the k-th detection precision = TP_k / k over the non-ignored ones, made monotone the way COCO
interpolates (the precision at a score is the best precision reachable at that score or a lower
one). Several IoU thresholds (default: COCO's 0.50:0.95) are averaged. A new score s maps to the
precision of the fitted curve at the lowest fitted score >= s, i.e. the precision of keeping every
detection that scores at least s; a score above every fitted one gets the top precision.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO

from tensormask.evaluation.coco_eval import _load_gt, _quiet

COCO_IOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))


@dataclass
class CategoryCurve:
    """The PR curve of one category, by descending score.

    scores:    (D,) descending detection scores (the curve's parameter).
    precision: (D,) interpolated precision of keeping the detections scoring >= scores[k].
    recall:    (D,) recall at the same cut.
    """

    scores: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    num_gt: int


@dataclass
class ScoreCalibration:
    """Per-category maps from detector score to precision (indexed by contiguous label).

    curves: one `CategoryCurve` per contiguous label, or None where the category had no detection
        or no ground truth on the fitting set (its scores then map to precision 0).
    """

    curves: list[CategoryCurve | None]
    class_names: list[str] = field(default_factory=list)
    iou_type: str = "segm"
    iou_thresholds: tuple[float, ...] = COCO_IOU_THRESHOLDS

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        coco_gt: COCO | str | os.PathLike | dict,
        results: Sequence[dict[str, Any]] | str | os.PathLike,
        contiguous_to_coco: Sequence[int],
        *,
        iou_type: str = "segm",
        iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
        class_names: Sequence[str] | None = None,
        image_ids: Sequence[int] | None = None,
        max_dets: int = 100,
    ) -> "ScoreCalibration":
        """Fit on COCO results (records or a results JSON, e.g. `COCOEvaluator`'s) against `coco_gt`.

        Args:
            coco_gt: the ground truth (a pycocotools COCO, dict or path).
            results: COCO result records ("image_id", "category_id", "bbox", "score"[, "segmentation"]).
            contiguous_to_coco: COCO category id of each contiguous label.
            iou_type: "segm" (masks) or "bbox".
            iou_thresholds: IoU thresholds whose PR curves are averaged.
            class_names: names for plots (default: the ground truth's).
            image_ids: images to use (default: those with results, as `COCOEvaluator` does).
            max_dets: detections per image considered (COCO's 100).
        """
        from pycocotools.cocoeval import COCOeval

        gt = _load_gt(coco_gt)
        if isinstance(results, (str, os.PathLike)):
            results = json.loads(Path(results).read_text())
        results = [dict(r) for r in results]
        if iou_type == "bbox":
            for r in results:
                r.pop("segmentation", None)
        elif any("segmentation" not in r for r in results):
            raise ValueError("segm calibration needs results with 'segmentation' (masks); use iou_type='bbox'")
        if not results:
            raise ValueError("cannot fit a calibration without any detection")
        with _quiet():
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
            ev.params.maxDets = [max_dets]
            ev.params.areaRng = [ev.params.areaRng[0]]  # all areas
            ev.params.areaRngLbl = ["all"]
            ev.params.imgIds = sorted(set(int(i) for i in (image_ids if image_ids is not None else [r["image_id"] for r in results])))
            ev.evaluate()
        by_cat: dict[int, list[dict[str, Any]]] = {}
        for e in ev.evalImgs:
            if e is not None:
                by_cat.setdefault(int(e["category_id"]), []).append(e)
        curves = [cls._curve(by_cat.get(int(c), []), max_dets) for c in contiguous_to_coco]
        if class_names is None:
            class_names = [gt.cats[int(c)].get("name", str(c)) for c in contiguous_to_coco]
        return cls(curves, list(class_names), iou_type, tuple(float(t) for t in iou_thresholds))

    @classmethod
    def from_evaluator(cls, evaluator: Any, *, iou_type: str = "segm", **kwargs: Any) -> "ScoreCalibration":
        """Fit on the results of a `COCOEvaluator` after its `evaluate()` (all ranks' results, on rank 0)."""
        results = evaluator.last_results or evaluator.results()
        return cls.fit(evaluator.coco_gt, results, evaluator.contiguous_to_coco, iou_type=iou_type,
                       class_names=evaluator.class_names, **kwargs)

    @staticmethod
    def _curve(evals: list[dict[str, Any]], max_dets: int) -> CategoryCurve | None:
        """COCO's accumulate for one category, keeping the score of every point."""
        if not evals:
            return None
        scores = np.concatenate([e["dtScores"][:max_dets] for e in evals])
        if scores.size == 0:
            return None
        order = np.argsort(-scores, kind="mergesort")  # COCO's tie order
        matches = np.concatenate([e["dtMatches"][:, :max_dets] for e in evals], axis=1)[:, order]  # (T, D)
        ignore = np.concatenate([e["dtIgnore"][:, :max_dets] for e in evals], axis=1)[:, order]
        num_gt = int(sum(np.count_nonzero(~np.asarray(e["gtIgnore"], dtype=bool)) for e in evals))
        if num_gt == 0:
            return None
        scores = scores[order]
        tp = np.cumsum(np.logical_and(matches != 0, ~ignore.astype(bool)), axis=1).astype(np.float64)
        fp = np.cumsum(np.logical_and(matches == 0, ~ignore.astype(bool)), axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)  # nan: only ignored detections so far
        recall = tp / num_gt
        # detections whose score ties must share one point: the cut keeps all of them or none
        last_of_tie = np.r_[scores[1:] != scores[:-1], True]
        precision = np.where(last_of_tie[None], precision, np.nan)
        # COCO's interpolation: best precision at this cut or any lower-score cut (nan = no cut here)
        filled = np.where(np.isnan(precision), -np.inf, precision)
        interp = np.maximum.accumulate(filled[:, ::-1], axis=1)[:, ::-1]
        interp = np.where(np.isinf(interp), 0.0, interp)  # only ignored detections from here on
        # ties take the value of their group's last element
        idx = np.flatnonzero(last_of_tie)
        group_end = idx[np.searchsorted(idx, np.arange(scores.size))]
        precision_mean = interp.mean(axis=0)[group_end]
        recall_mean = recall.mean(axis=0)[group_end]
        return CategoryCurve(scores=scores, precision=precision_mean, recall=recall_mean, num_gt=num_gt)

    # ------------------------------------------------------------------ applying
    def precision_at(self, label: int, score: float) -> float:
        return float(self.apply(torch.tensor([label]), torch.tensor([score]))[0])

    def apply(self, labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Calibrated scores: labels (D,) int64 contiguous, scores (D,) -> precision (D,) float32."""
        labels_np = labels.detach().cpu().numpy().astype(np.int64).reshape(-1)
        scores_np = scores.detach().cpu().numpy().astype(np.float64).reshape(-1)
        out = np.zeros(scores_np.shape, dtype=np.float32)
        for k in np.unique(labels_np):
            if k < 0 or k >= len(self.curves):
                raise ValueError(f"label {k} out of range for a calibration of {len(self.curves)} categories")
            curve = self.curves[k]
            if curve is None:
                continue
            sel = labels_np == k
            asc = curve.scores[::-1]  # ascending
            # the lowest fitted score >= s; above every fitted score: the top one
            pos = np.searchsorted(asc, scores_np[sel], side="left")
            pos = np.minimum(pos, asc.size - 1)
            out[sel] = curve.precision[::-1][pos]
        return torch.from_numpy(out).to(scores.device)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "tensormask-score-calibration-v1",
            "iou_type": self.iou_type,
            "iou_thresholds": list(self.iou_thresholds),
            "class_names": self.class_names,
            "curves": [
                None if c is None else {
                    "scores": _strict(c.scores), "precision": _strict(c.precision),
                    "recall": _strict(c.recall), "num_gt": c.num_gt,
                }
                for c in self.curves
            ],
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreCalibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed calibration file ({e})") from e
        if not isinstance(data, dict) or data.get("format") != "tensormask-score-calibration-v1":
            raise ValueError(f"{path}: not a tensormask score calibration file")
        curves = [
            None if c is None else CategoryCurve(
                np.asarray(c["scores"], dtype=np.float64), np.asarray(c["precision"], dtype=np.float64),
                np.asarray(c["recall"], dtype=np.float64), int(c["num_gt"]),
            )
            for c in data["curves"]
        ]
        return cls(curves, list(data.get("class_names", [])), data["iou_type"], tuple(data["iou_thresholds"]))

    def __len__(self) -> int:
        return len(self.curves)


def _strict(values: np.ndarray) -> list[float | None]:
    """`values` as a JSON list, a NaN as null (strict JSON has no NaN; `load` reads null back as NaN)."""
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def average_precision_of(curve: CategoryCurve | None) -> float:
    """Area under the interpolated PR curve (not COCO's 101-point sampling; for plot legends)."""
    if curve is None or curve.recall.size == 0:
        return math.nan
    r = np.r_[0.0, curve.recall]
    return float(np.sum(np.diff(r) * curve.precision))
