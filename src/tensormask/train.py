"""tensormask-train: train, then evaluate on the validation set.

With no arguments: the quickstart (a small TensorMask on the synthetic dataset, on the CPU), ending
with the bbox and segm AP table and the commands that evaluate and run its checkpoint. Every key
and group is a Hydra override:

    tensormask-train debug=fast_dev_run                   # smoke run: one step + one evaluation batch
    tensormask-train experiment=r50_1x data=coco trainer=gpu
    tensormask-train ckpt_path=last                       # resume the run of this same command
    tensormask-train -m model/mask_head=natural,aligned   # a sweep (hydra/launcher=slurm on SLURM)

Runs land in outputs/train/runs/<name>/ (outputs/train/latest points at the newest); see
docs/framework.md#where-outputs-land.
"""

from __future__ import annotations

from tensormask import openmp

openmp.configure()  # before torch loads OpenMP: idle threads spin briefly, then sleep

import logging  # noqa: E402
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tensormask import framework  # noqa: F401  (registers the config resolvers)
from tensormask.framework.builders import (
    build_datamodule, build_model, build_module, build_trainer, instantiate_list, save_run_config,
)
from tensormask.framework.checkpoint_io import (
    checkpoint_step, find_resume_checkpoint, remove_orphans, resolve_ckpt_path,
)
from tensormask.framework.data_config import prepare_data_config
from tensormask.framework.entry import (
    command_overrides, config_dir, entry_command, error_text, link_latest, metrics_table, override_arg,
    quiet_known_warnings, run_main, short_user_errors, to_plain,
)
from tensormask.framework.loggers import RunCSVLogger, wandb_info
from tensormask.framework.pretrained import check_pretrained
from tensormask.framework.run_summary import RunSummary
from tensormask.framework.validation import check_environment, validate_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (unless `train=false`) and evaluate (unless `evaluate=false`) the run `cfg` describes.

    Returns (metrics, objects): metrics {"bbox": {...}, "segm": {...}} of the final evaluation
    (fractions), objects {"cfg", "model", "datamodule", "module", "trainer", "loggers"}.
    Writes `<paths.output_dir>/run_summary.json` (status running -> finished / failed).
    """
    validate_config(cfg)
    check_environment(cfg)
    # before anything heavy (no synthetic data written, no model built): weights and data paths
    # exist, and the classes come from the annotation file (docs/data.md "Your own data")
    if cfg.get("train", True):
        check_pretrained(cfg)
    prepare_data_config(cfg, splits=("train", "val") if cfg.get("train", True) else ("val",))
    quiet_known_warnings()
    run_dir = Path(cfg.paths.output_dir)
    ckpt_dir = Path(cfg.paths.checkpoint_dir)
    if cfg.get("ckpt_path") not in (None, "", "null", "last"):
        resolve_ckpt_path(cfg.ckpt_path, ckpt_dir)  # a missing or damaged checkpoint fails before any work
    rank_zero = rank_zero_only.rank == 0
    if rank_zero:
        link_latest(run_dir, Path(cfg.paths.log_dir) / str(cfg.task_name))
    summary = RunSummary(run_dir, command_overrides(cfg), enabled=rank_zero)
    summary.update(status="running")
    loggers: list[Any] = []
    trained_to: int | None = None  # the step training finished at, once it did
    t0 = time.monotonic()
    try:
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True, verbose=False)
        model = build_model(cfg)
        datamodule = build_datamodule(cfg, model)
        module = build_module(cfg, model, output_dir=str(run_dir / "eval"))
        callbacks = instantiate_list(cfg.get("callbacks"))
        loggers = instantiate_list(cfg.get("logger"))
        trainer = build_trainer(cfg, callbacks=callbacks, loggers=loggers or False)
        if trainer.is_global_zero:
            save_run_config(cfg, ckpt_dir)
        for logger in loggers:
            logger.log_hyperparams(to_plain(cfg))
        ckpt_path, start_step = _starting_point(cfg, ckpt_dir, rank_zero)
        for logger in loggers:
            if isinstance(logger, RunCSVLogger) and cfg.get("train", True):
                logger.continue_at(start_step)  # one record: drop the rows of the steps trained again
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            save_final_checkpoint(trainer)
            trained_to = int(trainer.global_step)
        metrics: dict[str, Any] = {}
        if cfg.get("evaluate", True):
            trainer.validate(module, datamodule=datamodule, ckpt_path=None if cfg.get("train", True) else ckpt_path,
                             verbose=False)
            metrics = module.last_metrics
        summary.update(status="finished", metrics=metrics, steps=int(trainer.global_step), wandb=wandb_info(loggers))
        report = _final_report(cfg, metrics, trainer, time.monotonic() - t0, ckpt_dir, loggers, datamodule)
    except BaseException as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {error_text(e)}")
        last = ckpt_dir / "last.ckpt"
        if trained_to is not None and rank_zero and last.is_file() and not isinstance(e, KeyboardInterrupt):
            # the training is done and kept: running the same command again would start it afresh
            log.warning("training finished (%d steps, %s); the evaluation after it failed: fix the cause, then "
                        "evaluate the run with %s %s", trained_to, last, entry_command("eval"),
                        override_arg("ckpt_path", run_dir))
        raise
    finally:
        _finish_wandb(loggers)
    if trainer.is_global_zero:  # last, after W&B's own summary: the AP table and what to run next
        print(report, flush=True)
    objects = {"cfg": cfg, "model": model, "datamodule": datamodule, "module": module, "trainer": trainer,
               "loggers": loggers}
    return metrics, objects


def _starting_point(cfg: DictConfig, ckpt_dir: Path, rank_zero: bool) -> tuple[str | None, int]:
    """(checkpoint to resume from or None, its step) and, on rank 0, the files killed writes left.

    `ckpt_path=last` takes the newest complete checkpoint of the run, passing over damaged ones
    with a warning (`checkpoint_io.find_resume_checkpoint`), and says which one it took."""
    if rank_zero:
        remove_orphans(ckpt_dir)  # temporary files of writes a kill interrupted (docs/framework.md)
    requested = cfg.get("ckpt_path")
    if requested == "last":
        found, damaged = find_resume_checkpoint(ckpt_dir)
        if found is None:
            message = f"ckpt_path=last: no complete checkpoint in {ckpt_dir} yet, starting fresh"
            if damaged:
                message += f" (passed over damaged: {', '.join(str(e.path.name) for e in damaged)})"
            log.warning(message)
            return None, 0
        step = checkpoint_step(found)
        if rank_zero:
            print(f"ckpt_path=last: resuming from {found} (step {step}, the newest complete checkpoint of the run"
                  + (f"; passed over damaged {', '.join(e.path.name for e in damaged)}" if damaged else "") + ")",
                  flush=True)
        return str(found), step
    ckpt_path = resolve_ckpt_path(requested, ckpt_dir)
    if ckpt_path is None:
        if any(ckpt_dir.glob("*.ckpt")):
            log.warning("starting a fresh run in %s: its checkpoints will be replaced (add ckpt_path=last to resume "
                        "it instead)", ckpt_dir.parent)
        return None, 0
    return ckpt_path, checkpoint_step(ckpt_path)


def save_final_checkpoint(trainer: L.Trainer) -> None:
    """last.ckpt at the end of training too (the ModelCheckpoint saves every N steps; training is
    one endless epoch that max_steps ends, so no epoch-end save happens)."""
    callback = trainer.checkpoint_callback
    if callback is None or trainer.fast_dev_run or trainer.interrupted or callback.dirpath is None:
        return
    if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
        return
    trainer.save_checkpoint(str(Path(callback.dirpath) / "last.ckpt"))


def _finish_wandb(loggers: list[Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _final_report(cfg, metrics, trainer, seconds, ckpt_dir, loggers, datamodule) -> str:
    lines = ["", "=" * 78, f"tensormask-train finished: {trainer.global_step} steps in {seconds / 60:.1f} min"]
    lines.append(f"  run folder:   {cfg.paths.output_dir}")
    info = wandb_info(loggers)
    if info and info.get("mode") == "offline" and info.get("dir"):
        lines.append(f"  W&B (offline): wandb sync {Path(info['dir']).parent}")
    last = Path(ckpt_dir) / "last.ckpt"
    if last.is_file():
        run = override_arg("ckpt_path", cfg.paths.output_dir)
        try:
            paths = datamodule.dataset_paths()
        except Exception:  # noqa: BLE001 - only a suggestion
            paths = {}
        images = override_arg("input", paths["val_images"]) if paths.get("val_images") else "input=<an image or a folder>"
        if paths.get("val_images") and paths.get("val_annotations") and cfg.data.get("synthetic") is None:
            # one's own COCO files: their image ids, also for images in sub-folders (docs/data.md)
            images += " " + override_arg("annotations", paths["val_annotations"])
        lines += [f"  checkpoint:   {last}  (resume: the same command + ckpt_path=last)", "", "next:",
                  f"  {entry_command('eval')} {run}",
                  f"  {entry_command('predict')} {run} {images}"]
    if metrics:
        lines += ["", "COCO evaluation on the validation set (AP in %):", metrics_table(metrics)]
        for task in ("bbox", "segm"):
            if task in metrics:
                lines.append(f"  {task} AP = {100 * metrics[task]['AP']:.1f}")
    lines.append("=" * 78)
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@short_user_errors("tensormask-train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    objective = cfg.get("optimized_metric")
    if objective:
        task, _, key = str(objective).partition("/")
        return metrics.get(task, {}).get(key)
    return None


def main() -> None:
    run_main(_hydra_main, "tensormask-train", "train", __doc__)


if __name__ == "__main__":
    main()
