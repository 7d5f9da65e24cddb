"""tensormask-export: a trained checkpoint -> a ``torch.export`` program and an AOTInductor package.

    tensormask-export ckpt_path=outputs/train/runs/default/checkpoints/last.ckpt
    tensormask-export ckpt_path=... aoti=false            # the torch.export program only
    python -m tensormask.deploy outputs/export/latest photos/   # predict with it (no Hydra, no Lightning)

Writes ``program.pt2``, ``model.pt2`` and ``deploy.json`` (see tensormask.deploy) into its own folder, one
per checkpoint and settings: outputs/export/<run>-<checkpoint>_<hash>/<settings>/ (outputs/export/latest
points at the newest; docs/framework.md#export).
The exported network is :class:`tensormask.deploy.InferenceNetwork` (backbone, class / box heads and
the mask head at every level) for one image; its input height and width are dynamic (multiples of the
model's size divisibility, over 128 px: P7 at least 2 cells; the runner pads smaller images to 160 px). The align2nat ops are not in it: inference decodes masks only at the kept windows, in
the post-processing (pure PyTorch); their fake kernels (tensormask/ops/backend.py) make them
exportable for models that call them densely.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tensormask import framework  # noqa: F401  (registers the config resolvers)
from tensormask.deploy import DEPLOY_JSON, PACKAGE_FILE, PROGRAM_FILE, InferenceNetwork
from tensormask.errors import UserError
from tensormask.framework.builders import class_mapping, trained_model
from tensormask.framework.entry import config_dir, link_latest, run_main, short_user_errors

log = logging.getLogger(__name__)


def export_program(model: torch.nn.Module, example_size: tuple[int, int], max_size: int = 2048,
                   device: str = "cpu") -> torch.export.ExportedProgram:
    """``torch.export`` of the model's inference network, height and width dynamic (multiples of
    ``model.size_divisibility``, up to ``max_size``)."""
    network = InferenceNetwork(model).to(device).eval()
    d = int(model.size_divisibility)
    h, w = (int(s) for s in example_size)
    if h % d or w % d or min(h, w) <= max(model.strides):
        raise UserError(f"example_size={list(example_size)}: must be multiples of the size divisibility {d} "
                        f"and over {max(model.strides)} px (P7 at least 2 cells)")
    lo = max(model.strides) // d + 1
    if int(max_size) // d < max(lo, h // d, w // d):
        raise UserError(f"max_size={max_size}: must be at least the example_size {list(example_size)} and over "
                        f"{max(model.strides)} px ({max(lo * d, h, w)} or more)")
    images = torch.zeros(1, 3, h, w, device=device)
    shapes = {"images": {2: torch.export.Dim("rows", min=lo, max=max_size // d) * d,
                         3: torch.export.Dim("cols", min=lo, max=max_size // d) * d}}
    with torch.no_grad():
        return torch.export.export(network, (images,), dynamic_shapes=shapes)


def deploy_metadata(run_cfg: DictConfig, model: torch.nn.Module, classes: dict[str, Any]) -> dict[str, Any]:
    """deploy.json: the model's constructor arguments (for the weightless decoder), layout, pre-processing."""
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    if isinstance(model_cfg.get("backbone"), dict):
        model_cfg["backbone"].pop("weights", None)  # the decoder runs no layer; ImageNet files are not needed
    test = OmegaConf.to_container(run_cfg.data.test_transforms, resolve=True)
    min_size = test["min_size"]
    if isinstance(min_size, list):
        min_size = max(min_size)
    classes = class_mapping(int(run_cfg.data.num_classes), classes)
    return {
        "model": model_cfg,
        "layout": InferenceNetwork(model).layout(),
        "preprocess": {"min_size": int(min_size), "max_size": int(test["max_size"]),
                       "size_divisibility": int(model.size_divisibility),
                       "min_padded_size": (max(model.strides) // int(model.size_divisibility) + 1)
                       * int(model.size_divisibility), "pixel_mean": list(model.pixel_mean),
                       "pixel_std": list(model.pixel_std), "bgr": str(model.input_format).upper() == "BGR"},
        "classes": classes,
    }


def write_export(model: torch.nn.Module, metadata: dict[str, Any], out_dir: str | Path,
                 example_size: tuple[int, int] = (512, 512), max_size: int = 2048, aoti: bool = True,
                 device: str = "cpu") -> dict[str, Path]:
    """Export ``model`` into ``out_dir``: program.pt2, (aoti) model.pt2, deploy.json. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    program = export_program(model, example_size, max_size, device)
    paths = {"program": out_dir / PROGRAM_FILE, "deploy": out_dir / DEPLOY_JSON}
    torch.export.save(program, str(paths["program"]))
    if aoti:
        paths["package"] = out_dir / PACKAGE_FILE
        torch._inductor.aoti_compile_and_package(program, package_path=str(paths["package"]))
    paths["deploy"].write_text(json.dumps(metadata, indent=1))
    return paths


def _check_keys(cfg: DictConfig) -> None:
    """export.yaml's own keys, before the (minutes-long) export: aoti=no is the string "no", not false."""
    if not isinstance(cfg.aoti, bool):
        raise UserError(f"aoti={cfg.aoti!r}: must be true or false")
    if isinstance(cfg.max_size, bool) or not isinstance(cfg.max_size, int):
        raise UserError(f"max_size={cfg.max_size!r}: must be an integer (pixels)")
    size = cfg.example_size
    if not OmegaConf.is_list(size) or len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in size):
        raise UserError(f"example_size={size!r}: must be [height, width] in pixels, e.g. example_size=[512,512]")


def export(cfg: DictConfig) -> dict[str, Path]:
    _check_keys(cfg)
    if str(cfg.device) not in ("cpu", "cuda"):
        raise UserError(f"device={cfg.device}: expected cpu or cuda")
    if str(cfg.device) == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA device here")
    ckpt, run_cfg, model, classes = trained_model(str(cfg.ckpt_path))
    if not hasattr(model, "mask_head") or not hasattr(model, "window_sizes"):
        raise UserError(f"{ckpt}: model {run_cfg.model.get('_target_')} is not a TensorMask; only TensorMask "
                        "models are exported")
    metadata = deploy_metadata(run_cfg, model, classes)
    pre = metadata["preprocess"]
    largest = -(-max(pre["max_size"], pre["min_size"]) // pre["size_divisibility"]) * pre["size_divisibility"]
    if int(cfg.max_size) < largest:  # the runner resizes as the run's evaluation: such images would not run
        raise UserError(f"max_size={cfg.max_size}: below the largest image the run's test resize makes "
                        f"(data.test_transforms.max_size={pre['max_size']}: up to {largest} px padded); "
                        f"give max_size={largest} or more")
    paths = write_export(model, metadata, cfg.paths.output_dir, tuple(cfg.example_size), int(cfg.max_size),
                         bool(cfg.aoti), str(cfg.device))
    link_latest(Path(cfg.paths.output_dir), Path(cfg.paths.log_dir) / str(cfg.task_name))
    print("tensormask-export:\n" + "\n".join(f"  {k + ':':<9} {v}" for k, v in paths.items()), flush=True)
    return paths


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
@short_user_errors("tensormask-export")
def _hydra_main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    run_main(_hydra_main, "tensormask-export", "export", __doc__)


if __name__ == "__main__":
    main()
