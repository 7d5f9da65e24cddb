"""tensormask-predict: images in; pictures with the predicted masks and a COCO results JSON out.

    tensormask-predict ckpt_path=outputs/train/runs/default/checkpoints/last.ckpt input=photo.jpg
    tensormask-predict ckpt_path=... input=some/folder draw_score_threshold=0.3

The model is rebuilt from the `config.yaml` saved beside the checkpoint and the images are resized
and normalised as in the run's evaluation. Writes `<run folder>/pictures/<image name>.png` and
`<run folder>/predictions.json` (COCO results: image_id = the image's index in sorted order) and
`<run folder>/images.json` (those ids' file names, and the categories).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a CPU shared with
# other work, spinning threads wait for each other's time slices at every parallel region and a
# training step gets several times slower (measured: docs/framework.md). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tensormask import framework  # noqa: F401  (registers the config resolvers)
from tensormask.framework.builders import build_model, find_run_config, load_model_weights
from tensormask.framework.checkpoint_io import atomic_write_json
from tensormask.framework.entry import config_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"input={path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    raise FileNotFoundError(f"input={path}: no such file or folder")


def _load_item(file: Path, index: int) -> dict[str, Any]:
    from torchvision import tv_tensors
    from torchvision.io import ImageReadMode, decode_image

    data = torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8)
    image = decode_image(data, mode=ImageReadMode.RGB)
    h, w = image.shape[-2:]
    return {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "image_id": index,
        "orig_size": (int(h), int(w)),
    }


def predict(cfg: DictConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the checkpoint on `cfg.input`; returns (COCO result records, objects)."""
    from tensormask.data import Collator, build_transforms
    from tensormask.evaluation import detections_to_coco_results, draw_detections
    from tensormask.framework.datamodule import _transform_kwargs

    ckpt = Path(str(cfg.ckpt_path))
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt}: no such checkpoint file")
    run_config = find_run_config(ckpt)
    if run_config is None:
        raise FileNotFoundError(f"no config.yaml beside {ckpt}: cannot rebuild the model of this checkpoint")
    run_cfg = OmegaConf.load(run_config)
    model = build_model(run_cfg)
    load_model_weights(model, ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    classes = state.get("classes") or {}
    num_classes = int(run_cfg.data.num_classes)
    contiguous_to_coco = classes.get("contiguous_to_coco", list(range(1, num_classes + 1)))
    class_names = classes.get("class_names", [str(c) for c in contiguous_to_coco])

    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    device = torch.device("cuda" if accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    transforms = build_transforms(False, **_transform_kwargs(OmegaConf.to_container(run_cfg.data.test_transforms)))
    collate = Collator(int(getattr(model, "size_divisibility", 32)), list(model.pixel_mean), list(model.pixel_std),
                       str(getattr(model, "input_format", "RGB")).upper() == "BGR")

    out_dir = Path(cfg.paths.output_dir)
    pictures = out_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    files = list_images(cfg.input)
    results: list[dict[str, Any]] = []
    batch_size = int(cfg.get("batch_size", 1))
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        items = [_load_item(f, start + i) for i, f in enumerate(chunk)]
        originals = [it["image"].as_subclass(torch.Tensor).clone() for it in items]
        batch = collate([transforms(it) for it in items]).to(device)
        with torch.no_grad():
            detections = model.predict(model(batch.images), batch.image_sizes, batch.orig_sizes)
        for file, image, image_id, det in zip(chunk, originals, batch.image_ids, detections):
            det = det.to("cpu")
            results += detections_to_coco_results(image_id, det, contiguous_to_coco)
            draw_detections(image, det, class_names, score_threshold=float(cfg.draw_score_threshold),
                            path=pictures / f"{file.stem}.png")
            log.info("%s: %d detections >= %.2f", file.name, int((det.scores >= cfg.draw_score_threshold).sum()),
                     cfg.draw_score_threshold)
    atomic_write_json(out_dir / "predictions.json", results)
    atomic_write_json(out_dir / "images.json", {
        "images": [{"id": i, "file_name": str(f)} for i, f in enumerate(files)],
        "categories": [{"id": c, "name": n} for c, n in zip(contiguous_to_coco, class_names)],
    })
    print(f"tensormask-predict: {len(files)} image(s), {len(results)} detections\n"
          f"  pictures:    {pictures}\n  predictions: {out_dir / 'predictions.json'}", flush=True)
    return results, {"model": model, "files": files, "output_dir": out_dir}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
