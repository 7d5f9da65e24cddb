"""tensormask-eval: evaluate a checkpoint on a dataset's validation split; print and save the metrics.

    tensormask-eval ckpt_path=outputs/train/latest               # the newest training run's last.ckpt
    tensormask-eval ckpt_path=outputs/train/runs/<run>/checkpoints/step0000100.ckpt per_category=true
    tensormask-eval ckpt_path=... data=coco                      # another dataset than the run's
    tensormask-eval experiment=r50_1x ckpt_path=model_final.pkl  # a detectron2 checkpoint

A Lightning checkpoint's model (and, unless the command line sets `data`, its data) are rebuilt
from the `config.yaml` saved beside it; a detectron2 `.pkl` is loaded into this config's model
through `tensormask.modeling.detectron2_import`. Writes `metrics.json` and the COCO results JSON
into outputs/eval/<checkpoint>/<settings>/, one folder per checkpoint and evaluation settings.
"""

from __future__ import annotations

from tensormask import openmp

openmp.configure()  # before torch loads OpenMP: idle threads spin briefly, then sleep

import logging  # noqa: E402
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from tensormask import framework  # noqa: F401  (registers the config resolvers)
from tensormask.errors import MissingFileError, UserError
from tensormask.framework.builders import (
    build_datamodule, build_model, build_module, build_trainer, find_run_config, instantiate_list, load_model_weights,
)
from tensormask.framework.checkpoint_io import atomic_write_json, checkpoint_file
from tensormask.framework.data_config import PATH_KEYS, prepare_data_config
from tensormask.framework.entry import (
    command_overrides, config_dir, link_latest, metrics_table, quiet_known_warnings, run_main, short_user_errors,
)
from tensormask.framework.validation import check_environment, validate_config

log = logging.getLogger(__name__)


# the command line's `data.<key>=...` that `main` gave to Hydra as `++data.<key>=...`
_FORCED: set[str] = set()


def force_run_data_overrides(args: list[str]) -> list[str]:
    """`args` with each `data.<key>=<value>` made `++data.<key>=<value>` unless a `data=` is given.

    Without `data=`, the data are the training run's (`merge_run_config`), e.g. data=coco's
    `data.root` or `data.val_annotations` (a data set moved, another split), which this entry
    point's own default data (the synthetic set) lacks: Hydra would refuse them as unknown keys
    before the run's config is read. They are checked against the run's config instead (an
    unknown key is an error there), and against the data module's arguments for a detectron2
    `.pkl`, which has no run config (`validate_config`)."""
    if any(a.split("=", 1)[0].lstrip("+~") == "data" for a in args):
        return list(args)
    out = []
    for arg in args:
        if arg.startswith("data.") and "=" in arg:
            arg = f"++{arg}"
            _FORCED.add(arg)
        out.append(arg)
    return out


def merge_run_config(cfg: DictConfig, run_config: str | Path, overrides: list[str]) -> DictConfig:
    """`cfg` with the model (and the data, unless `overrides` choose another `data=...`) of the
    training run. Hydra composes them from the run's saved config (`run_config`, the config.yaml
    beside its checkpoints) with the command line's `model.*` / `data.*` overrides, so those follow
    Hydra's override grammar and an unknown key is an error, as on the training command line."""
    keys = {o: o.split("=", 1)[0].lstrip("+~") for o in overrides}
    other_data = any(k == "data" for k in keys.values())
    for override, key in keys.items():
        if key.startswith("model/") or key == "model":
            raise UserError(f"{override}: the model of a checkpoint is the one it was trained with; only its "
                            "keys (e.g. model.score_threshold=0.3) can change at evaluation")
    wanted = [o[2:] if o in _FORCED else o for o, k in keys.items()
              if k.startswith("model.") or (k.startswith("data.") and not other_data)]
    run_cfg = compose_saved_config(Path(run_config), wanted)
    if not other_data and "data.root" in keys.values() and run_cfg.get("data") is not None:
        _move_data_paths(run_cfg.data, OmegaConf.load(run_config).get("data", {}).get("root"),
                         {k for k in keys.values() if k.startswith("data.")})
    merged = cfg.copy()
    with open_dict(merged):
        merged.model = run_cfg.model
        if "mode" in run_cfg:
            merged.mode = run_cfg.mode
        if not other_data:
            merged.data = run_cfg.data
    return merged


def _move_data_paths(data: DictConfig, trained_root: Any, given: set[str]) -> None:
    """`data.root=<new folder>` for a run trained under another root (the data set moved): the
    saved config holds the resolved paths, so each image folder and annotation file under the run's
    root is moved under the new one (in place), unless the command line gives it itself."""
    if not trained_root:
        return
    old, new = str(trained_root).rstrip("/"), str(data.root).rstrip("/")
    for key in PATH_KEYS:
        value = data.get(key)
        if f"data.{key}" in given or value is None:
            continue
        value = str(value)
        if value == old or value.startswith(old + "/"):
            data[key] = new + value[len(old):]


def compose_saved_config(path: Path, overrides: list[str]) -> DictConfig:
    """Hydra's compose API on a run's saved config (a primary config with no defaults list), from
    inside the running Hydra app: its global state is set aside for the call and restored."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    global_hydra = GlobalHydra.instance()
    running, hydra_cfg = global_hydra.hydra, HydraConfig.instance().cfg
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base="1.3"):
            return compose(config_name=path.stem, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
        if running is not None:
            GlobalHydra.instance().initialize(running)
        HydraConfig.instance().cfg = hydra_cfg


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate `cfg.ckpt_path`; returns (metrics, objects) as `train` does."""
    ckpt = checkpoint_file(str(cfg.ckpt_path))
    overrides = command_overrides(cfg)
    if ckpt.suffix != ".pkl":
        run_config = find_run_config(ckpt)
        if run_config is None:
            raise MissingFileError(
                f"no config.yaml beside {ckpt} (or in its parent folder): cannot rebuild the model of this checkpoint"
            )
        cfg = merge_run_config(cfg, run_config, overrides)
    validate_config(cfg)
    check_environment(cfg)
    prepare_data_config(cfg, splits=("val",))
    quiet_known_warnings()
    run_dir = Path(cfg.paths.output_dir)
    link_latest(run_dir, Path(cfg.paths.log_dir) / str(cfg.task_name))
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
@short_user_errors("tensormask-eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    argv = sys.argv
    sys.argv = [argv[0], *force_run_data_overrides(argv[1:])]
    try:
        run_main(_hydra_main, "tensormask-eval", "eval", __doc__)
    finally:
        sys.argv = argv


if __name__ == "__main__":
    main()
