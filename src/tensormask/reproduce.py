"""Reproduce one of the paper's tables with one command, and hand it back beside the paper's numbers.

    tensormask-reproduce table=table4 scale=mini                 # synthetic data, minutes on a CPU
    tensormask-reproduce table=table4 scale=paper launcher=slurm

Steps, for table T at scale S (the options are in ``conf/reproduce.yaml``):

1. Read ``sweeps/T.yaml``: the table's rows, each one training run with its overrides and the
   paper's numbers (`tensormask.tables.spec`).
2. Skip the rows whose run already finished (``<runs_dir>/S/T/<row>/run_summary.json`` says
   ``finished``); hand the others to the chosen Hydra launcher as one multirun of the training
   config (``conf/train.yaml``): ``basic`` runs them here one after another, ``local``
   and ``slurm`` through submitit. Each row runs in ``<runs_dir>/S/T/<row>``; a row that
   raises is recorded as failed with its reason and the other rows go on.
3. Collect every row's ``run_summary.json`` into ``<results_dir>/T.md`` and ``T.csv``: our AP
   columns beside the paper's, the status (a failure keeps its reason), the run directory and the
   wandb run id; log the same table to wandb.

The exit status is 0 when every row of the table finished, 1 otherwise (the table is written
either way).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tensormask.tables import (
    SCALES,
    RowResult,
    TableSpec,
    collect_table,
    list_tables,
    load_table,
    wandb_table,
    write_csv,
    write_markdown,
)
from tensormask.tables.collect import SUMMARY_FILE, read_summary

log = logging.getLogger("tensormask.reproduce")

TRAIN_CONFIG = "train"
REPRODUCE_CONFIG = "reproduce"


def default_conf_dir() -> Path:
    """The training configs: ``$TENSORMASK_CONFIG_DIR`` if set, else ``<repository>/conf``."""
    from tensormask.framework.entry import config_dir

    return Path(config_dir())


# ---------------------------------------------------------------------------------------------
# The training job of one row (runs inside the launcher: in this process, or a submitit worker)
# ---------------------------------------------------------------------------------------------


def _write_failed_summary(run_dir: Path, error: str, overrides: list[str] | None = None) -> None:
    """Record a failure the training run could not record itself (it raised before, or while, writing)."""
    previous = read_summary(run_dir) or {}
    summary = {
        "status": "failed",
        "error": error,
        "metrics": previous.get("metrics") or {},
        "wandb": previous.get("wandb"),
        "overrides": previous.get("overrides") or (_task_overrides() if overrides is None else overrides),
        "run_dir": str(run_dir),
        "steps": previous.get("steps") or 0,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _close_wandb_run() -> None:
    """Rows run one after another in one process with the basic launcher: a wandb run left open by
    a row (e.g. one that failed) must not become the next row's run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def run_row(cfg: DictConfig) -> dict[str, Any]:
    """The launcher's task: train + evaluate one row, never raise, leave a final run_summary.json.

    Returns ``{"status", "error", "run_dir"}``. Exceptions are caught here rather than by the
    launcher so that one failing row does not stop the others (submitit would re-raise it while
    gathering the results, dropping every other row's).
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        from tensormask.train import train

        train(cfg)
    except Exception as err:  # noqa: BLE001 - a failed row is data, not a crash
        error = f"{type(err).__name__}: {err}"
        log.error("row %s failed: %s\n%s", run_dir.name, error, traceback.format_exc())
        summary = read_summary(run_dir)
        if summary is None or summary.get("status") != "failed":
            _write_failed_summary(run_dir, error)
        return {"status": "failed", "error": (read_summary(run_dir) or {}).get("error", error), "run_dir": str(run_dir)}
    finally:
        _close_wandb_run()
    summary = read_summary(run_dir)
    if summary is None or summary.get("status") == "running":
        error = f"training returned without a final {SUMMARY_FILE} (status: {(summary or {}).get('status', 'missing')})"
        _write_failed_summary(run_dir, error)
        return {"status": "failed", "error": error, "run_dir": str(run_dir)}
    return {"status": summary["status"], "error": summary.get("error"), "run_dir": str(run_dir)}


# ---------------------------------------------------------------------------------------------
# The table's multirun
# ---------------------------------------------------------------------------------------------


def row_overrides(spec: TableSpec, row_id: str, cfg: DictConfig) -> list[str]:
    """Everything the training config of one row gets: the scale's base, the table's and the
    row's overrides, the wandb group and tags that file the run under its table, resuming from
    the row's last checkpoint, then the user's extra ``train_overrides``."""
    row = spec.row(row_id)
    base = list(cfg.scales[cfg.scale])
    tags = ",".join(["reproduce", spec.name, row.id, cfg.scale])
    # An interrupted row resumes from its last checkpoint (a fresh one starts from scratch);
    # force=true retrains from scratch.
    resume = [] if cfg.force else ["ckpt_path=last"]
    return [
        *spec.job_overrides(row, cfg.scale, base=base),
        f"group={spec.name}",
        f"tags=[{tags}]",
        *resume,
        *list(cfg.train_overrides or []),
    ]


def sweep_dir(cfg: DictConfig) -> Path:
    """Where the rows run: ``<runs_dir>/<scale>/<table>/<row id>`` (stable, so a re-run finds them)."""
    return (Path(cfg.runs_dir).expanduser() / cfg.scale / cfg.table).resolve()


def plan(spec: TableSpec, cfg: DictConfig) -> tuple[dict[str, list[str]], list[str]]:
    """(row id -> training overrides for the rows to launch, ids of the rows skipped as finished)."""
    wanted = list(cfg.rows) if cfg.get("rows") else [r.id for r in spec.rows]
    for row_id in wanted:
        spec.row(row_id)  # unknown ids fail here, before anything runs
    done = {r.row.id for r in collect_table(spec, sweep_dir(cfg)) if r.finished}
    skipped = [] if cfg.force else [r for r in wanted if r in done]
    jobs = {r: row_overrides(spec, r, cfg) for r in wanted if r not in skipped}
    return jobs, skipped


def _config_loader(cfg: DictConfig):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.utils import JobRuntime

    from tensormask import framework  # noqa: F401  (registers the resolvers the training config uses)

    conf_dir = Path(cfg.conf_dir).expanduser() if cfg.get("conf_dir") else default_conf_dir()
    JobRuntime.instance().set("name", TRAIN_CONFIG)
    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir.resolve())))


def _hydra_overrides(cfg: DictConfig) -> list[str]:
    return [f"hydra/launcher={cfg.launcher}", f"hydra.sweep.dir={sweep_dir(cfg)}", *list(cfg.launcher_overrides or [])]


def group_by_resources(jobs: dict[str, list[str]], cfg: DictConfig, loader=None):
    """Compose every row's config: ({resources: [row ids]}, {row id: error for rows that do not compose}).

    The launcher asks the cluster for what its config says (``hydra.launcher.gpus_per_node``
    follows the row's ``trainer.devices``), so rows are launched in groups with the same
    resolved launcher settings, usually one group for the whole table.
    """
    from hydra.types import RunMode

    loader = loader or _config_loader(cfg)
    base = loader.load_configuration(config_name=TRAIN_CONFIG, overrides=_hydra_overrides(cfg), run_mode=RunMode.MULTIRUN)
    groups: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    for row_id, overrides in jobs.items():
        try:
            row_cfg = loader.load_sweep_config(base, [*overrides, f"hydra.sweep.subdir={row_id}"])
            resources = OmegaConf.to_container(row_cfg.hydra.launcher, resolve=True)
        except Exception as err:  # noqa: BLE001 - a row that does not compose fails alone
            errors[row_id] = f"{type(err).__name__}: {err}"
            continue
        groups.setdefault(json.dumps(resources, sort_keys=True, default=str), []).append(row_id)
    return groups, errors


def launch(jobs: dict[str, list[str]], cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run the jobs as a Hydra multirun of the training config with ``hydra/launcher=<launcher>``.

    Hydra's launchers take any list of override lists (its basic sweeper only builds Cartesian
    products, which most tables are not), so the rows go straight to the launcher, each job's
    ``hydra.sweep.subdir`` its row id. Rows are composed first: one that does not compose fails
    alone (a launcher composes each job outside the task, where the error would stop every row).
    Returns {row id: {"status", "error", "run_dir"}}.
    """
    from hydra._internal.callbacks import Callbacks
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobStatus
    from hydra.types import HydraContext, RunMode

    loader = _config_loader(cfg)
    groups, errors = group_by_resources(jobs, cfg, loader)
    outcomes: dict[str, dict[str, Any]] = {}
    for row_id, error in errors.items():
        run_dir = sweep_dir(cfg) / row_id
        _write_failed_summary(run_dir, error, overrides=jobs[row_id])
        outcomes[row_id] = {"status": "failed", "error": error, "run_dir": str(run_dir)}
    job_overrides = {r: [*jobs[r], f"hydra.sweep.subdir={r}"] for r in jobs}
    hydra_overrides = _hydra_overrides(cfg)
    returns = []
    saved = HydraConfig.instance().cfg
    try:
        for ids in groups.values():
            # The launcher reads its settings from the multirun config: compose it like the group's rows.
            master = loader.load_configuration(
                config_name=TRAIN_CONFIG, overrides=[*hydra_overrides, *jobs[ids[0]]], run_mode=RunMode.MULTIRUN
            )
            HydraConfig.instance().set_config(master)
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(master)),
                task_function=run_row,
                config=master,
            )
            returns += zip(ids, launcher.launch([job_overrides[r] for r in ids], initial_job_idx=len(returns)))
    finally:
        HydraConfig.instance().cfg = saved
    for row_id, ret in returns:
        if ret.status == JobStatus.COMPLETED:
            outcomes[row_id] = ret.return_value
            continue
        try:  # raised outside run_row (e.g. while composing the row's config): re-raised here
            ret.return_value
            error = f"job status {ret.status}"
        except Exception as err:  # noqa: BLE001
            error = f"{type(err).__name__}: {err}"
        run_dir = sweep_dir(cfg) / row_id
        if (read_summary(run_dir) or {}).get("status") != "failed":
            _write_failed_summary(run_dir, error, overrides=jobs[row_id])
        outcomes[row_id] = {"status": "failed", "error": error, "run_dir": str(run_dir)}
    return {r: outcomes[r] for r in jobs}


def log_to_wandb(spec: TableSpec, results: list[RowResult], cfg: DictConfig) -> str | None:
    """Log the collected table to wandb (one short run per collection, grouped with the table's runs)."""
    if not cfg.wandb.log_table:
        return None
    import wandb

    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.get("entity"),
        group=spec.name,
        job_type="reproduce",
        name=f"{spec.name}-{cfg.scale}",
        tags=["reproduce", spec.name, cfg.scale],
        mode=cfg.wandb.get("mode"),
        dir=str(sweep_dir(cfg)),
        config={"table": spec.name, "scale": cfg.scale, "launcher": cfg.launcher},
        reinit="finish_previous",
    )
    try:
        run.log({f"{spec.name}/{cfg.scale}": wandb_table(spec, results, cfg.scale)})
        run.summary["rows_finished"] = sum(r.finished for r in results)
        run.summary["rows_total"] = len(results)
        return run.id
    finally:
        run.finish()


def reproduce(cfg: DictConfig) -> list[RowResult]:
    """Run (what is not finished of) one table's sweep, then collect and write it. Returns its rows."""
    if cfg.scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {cfg.scale!r}")
    sweeps = Path(cfg.sweeps_dir).expanduser() if cfg.get("sweeps_dir") else None
    spec = load_table(cfg.table, sweeps)
    jobs, skipped = plan(spec, cfg)
    where = sweep_dir(cfg)
    if skipped:
        log.info("%s: %d row(s) already finished, skipped: %s", spec.name, len(skipped), ", ".join(skipped))
    if jobs:
        log.info("%s (%s): launching %d row(s) with launcher=%s in %s", spec.name, cfg.scale, len(jobs), cfg.launcher, where)
        for row_id, outcome in launch(jobs, cfg).items():
            log.info("  %s: %s%s", row_id, outcome["status"], f" ({outcome['error']})" if outcome.get("error") else "")
    results = collect_table(spec, where)
    out = Path(cfg.results_dir).expanduser()
    md = write_markdown(out / f"{spec.name}.md", spec, results, cfg.scale, sweep_dir=where)
    csv = write_csv(out / f"{spec.name}.csv", spec, results, cfg.scale)
    wandb_id = log_to_wandb(spec, results, cfg)
    log.info("wrote %s and %s%s", md, csv, f"; wandb run {wandb_id}" if wandb_id else "")
    return results


def compose(overrides: list[str], conf_dir: str | Path | None = None) -> DictConfig:
    """``conf/reproduce.yaml`` with command-line overrides (Hydra's override grammar)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf_dir = Path(conf_dir) if conf_dir else default_conf_dir()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name=REPRODUCE_CONFIG, overrides=list(overrides))
    if cfg.get("conf_dir") is None:
        cfg.conf_dir = str(conf_dir)
    return cfg


USAGE = """usage: tensormask-reproduce table=<name> [scale=mini|paper] [launcher=basic|local|slurm]
                            [rows=[id,...]] [force=true] ["train_overrides=['key=value',...]"] [results_dir=...]

Runs the sweep of one of the paper's tables and writes results/<table>.md and .csv beside the
paper's numbers. Tables: {tables}. All options: conf/reproduce.yaml."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv) or not argv:
        print(USAGE.format(tables=", ".join(list_tables())))
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    cfg = compose(argv)
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg))
    try:
        results = reproduce(cfg)
    except (FileNotFoundError, KeyError, ValueError) as err:  # an unknown table, row or scale
        print(f"tensormask-reproduce: {err}", file=sys.stderr)
        return 2
    print(Path(cfg.results_dir, f"{cfg.table}.md").read_text())
    return 0 if all(r.finished for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
