"""Evaluation: COCO AP (bbox, segm), score-to-precision calibration (appendix A.5), pictures."""

from tensormask.evaluation.coco_eval import (
    METRIC_NAMES,
    COCOEvaluator,
    detections_to_coco_results,
    format_metrics,
    format_per_category_table,
    run_cocoeval,
)
from tensormask.evaluation.calibration import CategoryCurve, ScoreCalibration
from tensormask.evaluation.visualize import draw_detections, plot_pr_curves, save_png, side_by_side

__all__ = [
    "CategoryCurve",
    "ScoreCalibration",
    "draw_detections",
    "plot_pr_curves",
    "save_png",
    "side_by_side",
    "COCOEvaluator",
    "METRIC_NAMES",
    "detections_to_coco_results",
    "format_metrics",
    "format_per_category_table",
    "run_cocoeval",
]
