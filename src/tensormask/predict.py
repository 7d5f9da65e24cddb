"""tensormask-predict: images in; pictures with the predicted masks and a COCO results JSON out.

    tensormask-predict ckpt_path=outputs/train/latest input=photo.jpg
    tensormask-predict ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt input=some/folder
    tensormask-predict ckpt_path=outputs/train/latest input=some/folder draw_score_threshold=0.3
    tensormask-predict ckpt_path=... input=mydata/val annotations=mydata/annotations/val.json

The model is rebuilt from the `config.yaml` saved beside the checkpoint and the images are resized
and normalised as in the run's evaluation. Writes, into outputs/predict/<checkpoint>/<settings>/
(one folder per checkpoint and settings), `pictures/<image name>.png`, `predictions.json` (COCO
results: image_id = the image's index in sorted order) and `images.json` (those ids' file names,
the categories, and the files skipped as unreadable). With `annotations=<COCO file>` the images
are that file's (its `file_name`s relative to `input`, or absolute) and the results carry its
image ids, so pycocotools' COCOeval takes predictions.json as it is (docs/data.md "Predictions for
a COCO data set"). It runs as `trainer.predict` (the module's `predict_step`) with a
`PredictionWriter` callback writing the outputs batch by batch.
"""

from __future__ import annotations

from tensormask import openmp

openmp.configure()  # before torch loads OpenMP: idle threads spin briefly, then sleep

import logging  # noqa: E402
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tensormask import framework  # noqa: F401  (registers the config resolvers)
from tensormask.data.images import ImageFiles, list_images
from tensormask.errors import UserError
from tensormask.framework.builders import build_module, build_trainer, instantiate_list, trained_model
from tensormask.framework.callbacks import PredictionImages, PredictionWriter
from tensormask.framework.entry import config_dir, link_latest, quiet_known_warnings, run_main, short_user_errors
from tensormask.framework.loggers import finish_wandb
from tensormask.framework.validation import check_environment

log = logging.getLogger(__name__)


class SkipUnreadable:
    """Collates the readable items of a batch (`ImageFiles` gives None for the others); None if none is."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items: list[dict[str, Any] | None]):
        items = [it for it in items if it is not None]
        return self.collate(items) if items else None


def images_of_annotation_file(annotations: str | Path, image_dir: str | Path) -> tuple[list[Path], list[int]]:
    """(image files, image ids) of every image a COCO annotation file lists, in id order; its
    `file_name`s are relative to `image_dir` (or absolute). Errors name the key and the files."""
    from tensormask.data.coco import CocoFormatError, load_coco_json

    path = Path(str(annotations))
    if not path.is_file():
        raise UserError(f"annotations={path}: no such annotation file")
    folder = Path(str(image_dir))
    if not folder.is_dir():
        raise UserError(f"input={folder}: with annotations=..., input is the folder its file_names are relative to")
    try:
        images = load_coco_json(path)["images"]
    except CocoFormatError as e:
        raise UserError(str(e)) from e
    pairs, missing = [], []
    for record in images:
        if not isinstance(record, dict) or not isinstance(record.get("id"), int) or "file_name" not in record:
            raise UserError(f"{path}: image record without an integer 'id' and a 'file_name': {str(record)[:200]}")
        file = folder / record["file_name"]  # an absolute file_name stays as it is
        (pairs if file.is_file() else missing).append((file, int(record["id"])))
    if missing:
        raise UserError(f"{path}: {len(missing)} image file(s) missing under input={folder}, "
                        f"e.g. {[str(f) for f, _ in missing[:3]]}")
    pairs.sort(key=lambda p: p[1])
    return [f for f, _ in pairs], [i for _, i in pairs]


def predict(cfg: DictConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the checkpoint on `cfg.input` through `trainer.predict`; returns (COCO result records, objects).

    The LightningModule's `predict_step` detects, `framework.callbacks.PredictionWriter` writes the
    pictures and JSON files; unreadable images are skipped with a warning naming each one.
    """
    from torch.utils.data import DataLoader

    from tensormask.data import Collator, build_transforms
    from tensormask.framework.datamodule import _transform_kwargs

    check_environment(cfg)
    quiet_known_warnings()
    _, run_cfg, model, classes = trained_model(str(cfg.ckpt_path))
    contiguous_to_coco, class_names = classes["contiguous_to_coco"], classes["class_names"]
    # the module of the run (channels-last, compile) without its evaluator: nothing is evaluated here
    module = build_module(run_cfg, model)
    module.evaluator_factory = None

    transforms = build_transforms(False, **_transform_kwargs(OmegaConf.to_container(run_cfg.data.test_transforms)))
    collate = Collator(int(getattr(model, "size_divisibility", 32)), list(model.pixel_mean), list(model.pixel_std),
                       str(getattr(model, "input_format", "RGB")).upper() == "BGR")
    if cfg.get("annotations"):
        files, image_ids = images_of_annotation_file(cfg.annotations, cfg.input)
    else:
        files, image_ids = list_images(cfg.input), None
    dataset = ImageFiles(files, transforms, image_ids=image_ids)
    loader = DataLoader(dataset, batch_size=int(cfg.get("batch_size", 1)), shuffle=False,
                        collate_fn=SkipUnreadable(collate))

    out_dir = Path(cfg.paths.output_dir)
    link_latest(out_dir, Path(cfg.paths.log_dir) / str(cfg.task_name))
    writer = PredictionWriter(out_dir, dataset, contiguous_to_coco, class_names, float(cfg.draw_score_threshold))
    # logger=wandb: the first `wandb_images` pictures also go to W&B, with mask and box overlays
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = [writer]
    if loggers:
        callbacks.append(PredictionImages(int(cfg.get("wandb_images", 16)), float(cfg.draw_score_threshold),
                                          image_reader=lambda i: dataset.read(dataset.index_of(i)),
                                          names=lambda i: dataset.files[dataset.index_of(i)].name,
                                          class_names=class_names))
    trainer = build_trainer(cfg, callbacks=callbacks, loggers=loggers or False)
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    finally:
        finish_wandb(loggers)

    results = writer.results
    lines = [f"tensormask-predict: {len(files) - len(writer.skipped)} image(s), {len(results)} detections",
             f"  pictures:    {writer.pictures}", f"  predictions: {out_dir / 'predictions.json'}"]
    if writer.skipped:
        lines.append(f"  skipped {len(writer.skipped)} unreadable file(s):")
        lines += [f"    {s['error']}" for s in writer.skipped]
    print("\n".join(lines), flush=True)
    if len(writer.skipped) == len(files):
        raise UserError(f"input={cfg.input}: none of the {len(files)} image file(s) could be read "
                        f"(first: {writer.skipped[0]['error']})")
    return results, {"model": model, "module": module, "trainer": trainer, "files": files,
                     "skipped": writer.skipped, "output_dir": out_dir}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
@short_user_errors("tensormask-predict")
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    run_main(_hydra_main, "tensormask-predict", "predict", __doc__)


if __name__ == "__main__":
    main()
