"""tensormask-eval: evaluate a checkpoint on a dataset's validation split; print and save the metrics.

    tensormask-eval ckpt_path=outputs/train/runs/default/checkpoints/last.ckpt
    tensormask-eval ckpt_path=... data=coco                      # another dataset than the run's
    tensormask-eval experiment=r50_1x ckpt_path=model_final.pkl  # a detectron2 checkpoint

A Lightning checkpoint's model (and, unless the command line sets `data`, its data) are rebuilt
from the `config.yaml` saved beside it; a detectron2 `.pkl` is loaded into this config's model
through `tensormask.modeling.detectron2_import`. Writes `<run folder>/metrics.json` and the COCO
results JSON.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a CPU shared with
# other work, spinning threads wait for each other's time slices at every parallel region and a
# training step gets several times slower (measured: docs/framework.md). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from tensormask import framework  # noqa: F401  (registers the config resolvers)
from tensormask.framework.builders import (
    build_datamodule, build_model, build_module, build_trainer, find_run_config, instantiate_list, load_model_weights,
)
from tensormask.framework.checkpoint_io import atomic_write_json
from tensormask.framework.entry import command_overrides, config_dir, metrics_table, quiet_known_warnings
from tensormask.framework.validation import validate_config

log = logging.getLogger(__name__)


def merge_run_config(cfg: DictConfig, run_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`cfg` with the model (and the data, unless `overrides` choose another `data=...`) of the
    training run; `model.*` / `data.*` overrides on the command line apply on top."""
    other_data = any(o.lstrip("+").startswith("data=") for o in overrides)
    merged = cfg.copy()
    with open_dict(merged):
        merged.model = run_cfg.model
        if "mode" in run_cfg:
            merged.mode = run_cfg.mode
        if not other_data:
            merged.data = run_cfg.data
        for o in overrides:
            key, _, value = o.lstrip("+").partition("=")
            if key.startswith("model.") or (key.startswith("data.") and not other_data):
                OmegaConf.update(merged, key, _yaml_value(value), force_add=True)
    return merged


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate `cfg.ckpt_path`; returns (metrics, objects) as `train` does."""
    ckpt = Path(str(cfg.ckpt_path))
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt}: no such checkpoint file")
    overrides = command_overrides(cfg)
    if ckpt.suffix != ".pkl":
        run_config = find_run_config(ckpt)
        if run_config is None:
            raise FileNotFoundError(
                f"no config.yaml beside {ckpt} (or in its parent folder): cannot rebuild the model of this checkpoint"
            )
        cfg = merge_run_config(cfg, OmegaConf.load(run_config), overrides)
    validate_config(cfg)
    quiet_known_warnings()
    run_dir = Path(cfg.paths.output_dir)
    t0 = time.monotonic()
    model = build_model(cfg)
    source = load_model_weights(model, ckpt)
    datamodule = build_datamodule(cfg, model)
    module = build_module(cfg, model, output_dir=str(run_dir))
    if cfg.get("per_category"):
        module.evaluator_factory.keywords["per_category"] = True
    loggers = instantiate_list(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks=instantiate_list(cfg.get("callbacks")), loggers=loggers or False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = module.last_metrics
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", {
            "checkpoint": str(ckpt.resolve()), "source": source.get("source"), "step": source.get("global_step"),
            "metrics": metrics, "overrides": overrides,
        })
        lines = ["", f"tensormask-eval: {ckpt} ({time.monotonic() - t0:.0f} s)", metrics_table(metrics)]
        if cfg.get("per_category") and module.evaluator is not None and module.evaluator.per_category_results:
            lines += ["", module.evaluator.per_category_table()]
        lines.append(f"metrics: {run_dir / 'metrics.json'}")
        print("\n".join(lines), flush=True)
    return metrics, {"cfg": cfg, "model": model, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
