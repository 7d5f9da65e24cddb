"""Experiment loggers: Weights & Biases (default; offline unless a key is configured), csv (one record per
run folder, continued on resume), tensorboard."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(mode: str = "auto") -> str:
    """`auto` is online only when the environment holds a W&B key (WANDB_API_KEY) or WANDB_MODE says
    online; otherwise offline, and the run is synced later with `wandb sync <run dir>/wandb/...`."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}: must be one of {', '.join(WANDB_MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "disabled", "online"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_logger(
    *,
    project: str = "tensormask",
    save_dir: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str = "auto",
    entity: str | None = None,
    job_type: str = "train",
    **kwargs: Any,
):
    """A Lightning WandbLogger; `mode` auto/online/offline/disabled (see `wandb_mode`)."""
    from lightning.pytorch.loggers import WandbLogger

    resolved = wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    run_id = kwargs.pop("id", None) or _run_id(save_dir)
    return WandbLogger(
        project=project, save_dir=save_dir, name=name, group=group, tags=list(tags or []), id=run_id,
        entity=entity, job_type=job_type, offline=resolved == "offline", mode=resolved, log_model=False, **kwargs,
    )


def _run_id(save_dir: str) -> str:
    """The W&B run id of this run folder: made once, then read back, so that a run resumed with
    `ckpt_path=last` (same command, same folder) continues the same W&B run."""
    path = os.path.join(save_dir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    from tensormask.framework.checkpoint_io import atomic_write_bytes

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # other processes never start a W&B run
        atomic_write_bytes(path, run_id.encode())
    return run_id


def wandb_info(loggers: Sequence[Any]) -> dict[str, Any] | None:
    """{"run_id", "project", "group", "tags", "mode"} of the W&B run among `loggers`, or None."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run_id = getattr(run, "id", None)
            if not isinstance(run_id, str):  # a non-zero rank's dummy experiment
                return None
            settings = getattr(run, "settings", None)
            mode = getattr(settings, "mode", None) if settings is not None else None
            return {
                "run_id": run_id,
                "project": getattr(run, "project", None),
                "group": getattr(run, "group", None) or None,
                "tags": list(getattr(run, "tags", ()) or ()),
                "mode": str(mode) if mode is not None else None,
                "dir": getattr(run, "dir", None),
            }
    return None


# -- what goes to W&B beyond scalars: pictures with overlays, the AP tables, the A.5 curves -------

def wandb_loggers(loggers: Sequence[Any]) -> list[Any]:
    """The Lightning `WandbLogger`s among `loggers` (a trainer's `trainer.loggers`)."""
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def finish_wandb(loggers: Sequence[Any]) -> None:
    """End the W&B run of `loggers` (if any), so that its files are complete when this returns."""
    if wandb_loggers(loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def detection_image(
    image: Any,
    detections: Any,
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float | None = None,
    calibration: Any = None,
    ground_truth: Any = None,
    caption: str | None = None,
    canvas_size: tuple[int, int] | None = None,
):
    """A `wandb.Image` of the undrawn `image` (uint8 (3, H, W)) with the detections (and the
    ground truth) as W&B mask and box overlays (`tensormask.evaluation.visualize.wandb_overlays`):
    in W&B each layer and each class can be toggled and boxes filtered by score. `canvas_size`:
    the (H, W) of a padded `image` (the masks are padded with background to it)."""
    import wandb

    from tensormask.evaluation.visualize import _to_uint8_chw, wandb_overlays

    overlays = wandb_overlays(detections, class_names, calibration=calibration, score_threshold=score_threshold,
                              ground_truth=ground_truth, canvas_size=canvas_size)
    array = _to_uint8_chw(image).permute(1, 2, 0).numpy()
    return wandb.Image(array, caption=caption, masks=overlays["masks"] or None, boxes=overlays["boxes"])


def log_detection_images(
    logger: Any,
    key: str,
    pictures: Sequence[dict[str, Any]],
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float | None = None,
    step: int | None = None,
) -> None:
    """Log pictures to a `WandbLogger` under `key`, each a dict {"image", "detections",
    optional "ground_truth", "caption"}, as `wandb.Image`s with overlays (`detection_image`).

    W&B shows the images of one key as a grid of one size, so images smaller than the largest
    are padded (black, at the bottom and right: the overlays' pixel coordinates do not move).
    """
    import numpy as np

    from tensormask.evaluation.visualize import _to_uint8_chw

    images = [_to_uint8_chw(p["image"]) for p in pictures]
    if not images:
        return
    h = max(int(im.shape[1]) for im in images)
    w = max(int(im.shape[2]) for im in images)
    logged = []
    for image, p in zip(images, pictures):
        wandb_image = detection_image(
            torch_pad(image, h, w), p["detections"], class_names, score_threshold=score_threshold,
            ground_truth=p.get("ground_truth"), caption=p.get("caption"), canvas_size=(h, w))
        logged.append(wandb_image)
    logger.log_metrics({key: logged}, step=step)


def torch_pad(image: Any, h: int, w: int) -> Any:
    """uint8 (3, h0, w0) -> (3, h, w), zero-padded at the bottom and right."""
    import torch

    return torch.nn.functional.pad(image, (0, w - image.shape[2], 0, h - image.shape[1]))


def _percent(value: float) -> float | None:
    """AP fraction -> percent for a W&B table; nan (no ground truth) -> None (JSON null)."""
    return None if value is None or math.isnan(float(value)) else round(100.0 * float(value), 3)


def _curve_points(n: int, max_points: int):
    import numpy as np

    return np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int)) if n else np.zeros(0, int)


def evaluation_report(
    metrics: dict[str, dict[str, float]],
    per_category: dict[str, dict[str, float]] | None = None,
    calibrations: dict[str, Any] | None = None,
    *,
    prefix: str = "val",
    max_curve_points: int = 200,
    figure_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The final evaluation as W&B objects, {key: wandb.Table | chart | wandb.Image}:

    - `<prefix>/coco_ap`: table, one row per IoU type, the 12 COCO numbers in percent;
    - `<prefix>/per_category_ap`: table (category x IoU type, percent) and
      `<prefix>/per_category_ap_<iou>` a bar chart of it;
    - with `calibrations` ({iou type: ScoreCalibration}, appendix A.5): `<prefix>/pr_curve_<iou>`
      (precision against recall, one line per category) and `<prefix>/calibration_<iou>`
      (precision, i.e. the calibrated score, against the detector score), from one table of at most
      `max_curve_points` points per category; with `figure_dir` also the per-category PR panels
      (`plot_pr_curves`, written there as `pr_curves_<iou>.png`) as `<prefix>/pr_curves_<iou>`.
    """
    import wandb

    from tensormask.evaluation.coco_eval import METRIC_NAMES
    from tensormask.evaluation.visualize import plot_pr_curves

    out: dict[str, Any] = {}
    out[f"{prefix}/coco_ap"] = wandb.Table(
        columns=["iou_type", *METRIC_NAMES],
        data=[[iou, *(_percent(values.get(n, math.nan)) for n in METRIC_NAMES)] for iou, values in metrics.items()],
    )
    if per_category:
        types = list(per_category)
        names = list(dict.fromkeys(n for t in types for n in per_category[t]))
        table = wandb.Table(columns=["category", *[f"{t} AP" for t in types]],
                            data=[[n, *(_percent(per_category[t].get(n, math.nan)) for t in types)] for n in names])
        out[f"{prefix}/per_category_ap"] = table
        for t in types:
            out[f"{prefix}/per_category_ap_{t}"] = wandb.plot.bar(table, "category", f"{t} AP",
                                                                  title=f"{t} AP per category (%)")
    for iou, calibration in (calibrations or {}).items():
        rows = []
        for k, curve in enumerate(calibration.curves):
            if curve is None:
                continue
            name = calibration.class_names[k] if k < len(calibration.class_names) else str(k)
            for i in _curve_points(curve.scores.size, max_curve_points):
                rows.append([name, float(curve.recall[i]), float(curve.precision[i]), float(curve.scores[i])])
        table = wandb.Table(columns=["category", "recall", "precision", "score"], data=rows)
        out[f"{prefix}/pr_curve_{iou}"] = wandb.plot.line(table, "recall", "precision", stroke="category",
                                                          title=f"{iou} precision-recall per category (A.5)")
        out[f"{prefix}/calibration_{iou}"] = wandb.plot.line(
            table, "score", "precision", stroke="category",
            title=f"{iou} score -> precision (calibrated score, A.5)")
        if figure_dir is not None:
            path = plot_pr_curves(calibration, os.path.join(figure_dir, f"pr_curves_{iou}.png"))
            out[f"{prefix}/pr_curves_{iou}"] = wandb.Image(str(path), caption=f"{iou} PR curves per category")
    return out



class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)

    def drop_rows_from(self, step: int) -> int:
        """Remove the rows logged at `step` or later; returns how many."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step") in (None, "") or float(r["step"]) < step]
        if len(kept) == len(rows):
            return 0
        if not kept:
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return len(rows)
        from tensormask.framework.checkpoint_io import atomic_write

        def write(out) -> None:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
            out.write(text.getvalue().encode())

        atomic_write(self.metrics_file_path, write)
        return len(rows) - len(kept)


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger with one continuous record per run folder
    (`<save_dir>/<name>/version_0/metrics.csv` unless `version` says otherwise).

    A resumed run (`ckpt_path=last`) writes into the same file: `continue_at(step)` first drops
    the rows of the steps at or after the checkpoint's, which the resumed run logs again, so each
    step appears once; a fresh start (`continue_at(0)`) begins a new record. Rows reach the file
    as they are logged (`flush_logs_every_n_steps=1`; one appended line per logged step), so a
    killed run loses none that its checkpoint does not replay.
    """

    def __init__(self, save_dir: str, name: str = "csv", version: int | str = 0, flush_logs_every_n_steps: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps,
                         **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuedWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment

    def continue_at(self, step: int) -> None:
        if rank_zero_only.rank != 0:
            return
        dropped = self.experiment.drop_rows_from(int(step))
        if dropped and step:
            log.info("%s: dropped %d rows of steps >= %d (logged again by the resumed run)",
                     self.experiment.metrics_file_path, dropped, step)
