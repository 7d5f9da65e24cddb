"""Run an exported TensorMask (``tensormask-export``) without Hydra or Lightning.

An export folder holds:
  program.pt2    the network as a ``torch.export`` program (images -> class logits, box deltas and the
                 mask head's raw tensors at every level), loadable with ``torch.export.load``;
  model.pt2      the same network compiled ahead of time by AOTInductor (CPU, or CUDA when exported there),
                 loadable with ``torch._inductor.aoti_load_package`` (no Python model code runs);
  deploy.json    what the post-processing and the pre-processing need: the model's constructor arguments
                 (to rebuild its weightless decoder), the output layout, resizing and normalisation, the
                 class names and COCO ids.

The post-processing (score threshold, top-k, box decoding, per-class NMS, the kept windows' mask decoding
and pasting: docs/model.md, "Inference never builds every window's mask") is ``TensorMask.predict``,
run by :class:`Postprocessor` on the exported outputs; it needs only torch and torchvision (and this
package's Python code, whose align2nat decoding at kept windows is pure PyTorch).

    python -m tensormask.deploy EXPORT_DIR IMAGES [--output predictions.json] [--program]

predicts on an image file or a folder and writes COCO results (image_id = the image's index in sorted
order), and the file names and categories to ``<output stem>.images.json`` beside them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from tensormask.data.images import list_images, read_image
from tensormask.errors import UserError, check_writable_folder
from tensormask.structures import Detections

DEPLOY_JSON = "deploy.json"
PROGRAM_FILE = "program.pt2"
PACKAGE_FILE = "model.pt2"


class InferenceNetwork(nn.Module):
    """The exportable part of a ``TensorMask``: images (N, 3, Hp, Wp) -> a flat tuple of tensors.

    Order: class logits per level (L tensors (N, A*K, H_k, W_k)), box deltas per level (L, or none without
    a box head), the mask head's raw tensors per level and window size (L*A, level-major, or none without a
    mask head). Unlike eager inference, which runs the mask branch only at the levels of the kept
    detections, a static graph runs it at every level.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def layout(self) -> dict[str, int]:
        m = self.model
        return {"num_levels": len(m.strides), "num_windows": len(m.window_sizes),
                "box_head": int(m.box_head is not None), "mask_head": int(m.mask_head is not None)}

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        features = m.backbone(images)
        outputs = list(m.class_head(features))
        if m.box_head is not None:
            outputs += m.box_head(features)
        if m.mask_head is not None:
            outputs += [t for level in m.mask_head(features).raw for t in level]
        return tuple(outputs)


def unflatten_outputs(flat: Sequence[Tensor], layout: dict[str, int]):
    """The flat tuple of :class:`InferenceNetwork` -> ``TensorMaskOutput`` (no features)."""
    from tensormask.modeling.heads import MaskPrediction
    from tensormask.modeling.tensormask import TensorMaskOutput

    n_levels, n_windows = layout["num_levels"], layout["num_windows"]
    flat = list(flat)
    logits, flat = flat[:n_levels], flat[n_levels:]
    deltas = None
    if layout["box_head"]:
        deltas, flat = flat[:n_levels], flat[n_levels:]
    masks = None
    if layout["mask_head"]:
        masks = MaskPrediction([flat[k * n_windows:(k + 1) * n_windows] for k in range(n_levels)])
    return TensorMaskOutput(None, logits, deltas, masks)


def instantiate(node: Any) -> Any:
    """Build ``{"_target_": "tensormask.X", **kwargs}`` nodes (recursively), as Hydra would, without Hydra.

    Only classes of this package are built (the file comes from an export folder)."""
    if isinstance(node, list):
        return [instantiate(v) for v in node]
    if not isinstance(node, dict):
        return node
    kwargs = {k: instantiate(v) for k, v in node.items() if k != "_target_"}
    target = node.get("_target_")
    if target is None:
        return kwargs
    module, _, name = str(target).rpartition(".")
    if not module.startswith("tensormask."):
        raise UserError(f"{DEPLOY_JSON}: _target_ {target!r} is not a tensormask class")
    return getattr(importlib.import_module(module), name)(**kwargs)


class Postprocessor:
    """``TensorMask.predict`` on exported outputs, with a weightless copy of the model (built on the meta
    device from the saved constructor arguments: nothing of the network is kept or run)."""

    def __init__(self, model_config: dict, layout: dict[str, int]):
        import tensormask.modeling  # noqa: F401  (imported outside the meta-device context: module-level tensors)
        from tensormask.modeling.tensormask import current_model_config

        with torch.device("meta"):
            self.decoder = instantiate(current_model_config(model_config))
        self.decoder.eval()
        self.layout = layout

    def __call__(self, flat: Sequence[Tensor], image_sizes: list[tuple[int, int]],
                 orig_sizes: list[tuple[int, int]]) -> list[Detections]:
        return self.decoder.predict(unflatten_outputs(flat, self.layout), image_sizes, orig_sizes)


class ExportedModel:
    """An export folder loaded for inference: ``detections = ExportedModel(folder)(uint8 RGB images)``.

    ``use_program=True`` runs the ``torch.export`` program instead of the AOTInductor package."""

    def __init__(self, folder: str | Path, use_program: bool = False, device: str = "cpu"):
        from tensormask.data import Collator, ResizeShortestEdge

        import tensormask.ops  # noqa: F401  (registers the align2nat ops and their fake kernels)

        folder = Path(folder)
        meta_file = folder / DEPLOY_JSON
        if not meta_file.is_file():
            raise UserError(f"{folder}: not an export folder (no {DEPLOY_JSON}; make one with tensormask-export)")
        self.meta = json.loads(meta_file.read_text())
        file = folder / (PROGRAM_FILE if use_program else PACKAGE_FILE)
        if not file.is_file():
            raise UserError(f"{file}: missing (tensormask-export writes it"
                            f"{'' if use_program else ' unless aoti=false; --program runs the program instead'})")
        self.device = torch.device(device)
        t0 = time.perf_counter()
        if use_program:
            self.network: Callable[..., Any] = torch.export.load(str(file)).module()
        else:
            self.network = torch._inductor.aoti_load_package(str(file))
        self.load_seconds = time.perf_counter() - t0
        pre = self.meta["preprocess"]
        self.resize = ResizeShortestEdge(pre["min_size"], pre["max_size"])
        self.collator = Collator(pre["size_divisibility"], pre["pixel_mean"], pre["pixel_std"], pre["bgr"])
        self.postprocess = Postprocessor(self.meta["model"], self.meta["layout"])
        self.min_padded = int(self.meta["preprocess"].get("min_padded_size", 0))

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
        """uint8 RGB (3, h, w) images -> padded normalised batch, resized sizes, original sizes."""
        from torchvision import tv_tensors

        resized, sizes, origs = [], [], []
        for image in images:
            out = self.resize({"image": tv_tensors.Image(image)})["image"].as_subclass(Tensor)
            resized.append(self.collator.normalize(out))
            sizes.append(tuple(int(s) for s in out.shape[-2:]))
            origs.append(tuple(int(s) for s in image.shape[-2:]))
        hp, wp = self.collator.padded_size(sizes)
        # the exported graph needs P7 (stride 128) at least 2 cells wide: smaller images get more padding
        hp, wp = max(hp, self.min_padded), max(wp, self.min_padded)
        batch = resized[0].new_zeros(len(resized), 3, hp, wp)
        for b, img in zip(batch, resized):
            b[:, : img.shape[1], : img.shape[2]] = img
        return batch, sizes, origs

    @torch.no_grad()
    def __call__(self, images: list[Tensor]) -> list[Detections]:
        """One image at a time (the exported batch size is 1)."""
        detections = []
        for image in images:
            batch, sizes, origs = self.preprocess([image])
            detections += self.postprocess(self.network(batch.to(self.device)), sizes, origs)
        return detections


def _check_writable(output: Path) -> None:
    """``--output`` names a file that can be written (its folder is made); a UserError naming it otherwise."""
    if output.is_dir():
        raise UserError(f"--output {output}: a folder; give the results file, e.g. {output / 'predictions.json'}")
    check_writable_folder(output.parent, f"--output {output}")


def predict_folder(folder: str | Path, images: str | Path, output: str | Path, use_program: bool = False) -> list[dict]:
    """Run an export folder on an image file or folder; write COCO results to ``output``; return them."""
    from tensormask.evaluation import detections_to_coco_results

    output = Path(output)
    _check_writable(output)  # before any image runs: a wrong --output must not cost the predictions
    model = ExportedModel(folder, use_program=use_program)
    contiguous_to_coco = model.meta["classes"]["contiguous_to_coco"]
    results: list[dict] = []
    files = list_images(images, key="images")
    for index, file in enumerate(files):
        (det,) = model([read_image(file)])
        results += detections_to_coco_results(index, det, contiguous_to_coco)
    output.write_text(json.dumps(results))
    output.with_name(output.stem + ".images.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": str(f)} for i, f in enumerate(files)],
        "categories": [{"id": c, "name": n} for c, n in zip(contiguous_to_coco, model.meta["classes"]["class_names"])],
    }))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tensormask.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("images", help="an image file or a folder of images")
    parser.add_argument("--output", default="predictions.json")
    parser.add_argument("--program", action="store_true", help="run program.pt2 (torch.export) instead of model.pt2")
    args = parser.parse_args(argv)
    try:
        results = predict_folder(args.export_dir, args.images, args.output, use_program=args.program)
    except UserError as err:
        raise SystemExit(f"tensormask.deploy: {err}") from None
    print(f"tensormask.deploy: {len(results)} detections -> {args.output}", flush=True)


if __name__ == "__main__":
    main()
