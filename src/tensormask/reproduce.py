"""Reproduce the paper's tables with one command, and hand them back beside the paper's numbers.

    tensormask-reproduce table=table4 scale=mini                 # synthetic data, minutes on a CPU
    tensormask-reproduce table=all scale=paper launcher=slurm
    tensormask-reproduce table=all scale=paper dry_run=true     # the plan: rows, folders, shared runs, cost

Steps, for the chosen tables at scale S (options: ``conf/reproduce.yaml``):

1. Run the tables' rows as one Hydra multirun of the training config (``conf/train.yaml``) with
   the ``rows`` sweeper (``conf/hydra/sweeper/rows.yaml``, `hydra_plugins.tensormask_rows`) and
   the chosen launcher: exactly ``tensormask-train -m hydra/sweeper=rows hydra.sweeper.table=...``.
   Rows whose training config is the same share one training run per seed; rows that differ only
   at inference evaluate its checkpoint with their own overrides; a finished run is reused only
   when it was trained with the config asked for now (`tensormask.tables.plan`). One run's failure
   fails its rows alone.
2. Collect every row (mean +- std over the seeds) from the plan the sweeper wrote, check the
   paper's comparisons, write ``<results_dir>/<table>.md`` and ``.csv``, log both to wandb.

The exit status is 0 when every row of every table finished, 1 otherwise (the tables are written
either way), 2 for a usage error (unknown table or row, a stale run with ``on_stale=stop``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tensormask.errors import UserError, check_writable_folder
from tensormask.tables import (
    RowResult,
    TableSpec,
    list_tables,
    load_table,
    wandb_table,
    write_csv,
    write_markdown,
)
from tensormask.tables.collect import collect_seeds
from tensormask.tables.format import wandb_comparisons
from tensormask.tables.plan import flag, name_list, resolve_tables, seed_list

log = logging.getLogger("tensormask.reproduce")

REPRODUCE_CONFIG = "reproduce"


class ReproduceError(UserError):
    """The multirun stopped before running any row (e.g. ``on_stale=stop`` found a stale run)."""


def default_conf_dir() -> Path:
    """The training configs: ``$TENSORMASK_CONFIG_DIR`` if set, else ``<repository>/conf``."""
    from tensormask.framework.entry import config_dir

    return Path(config_dir())


def _quote(text: Any) -> str:
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hydra_list(values: Any) -> str:
    return "[" + ",".join(_quote(v) for v in values) + "]"


def scale_dir(cfg: DictConfig) -> Path:
    """Where the runs of a scale go: ``<runs_dir>/<scale>`` (each row in ``<table>/<row>``)."""
    return (Path(cfg.runs_dir).expanduser() / cfg.scale).resolve()


def plan_file(cfg: DictConfig) -> Path:
    """The plan the sweeper writes (``collect_only`` keeps the one of a multirun still in flight)."""
    return scale_dir(cfg) / ("collect-plan.json" if cfg.get("collect_only") else "plan.json")


def tables_of(cfg: DictConfig) -> list[str]:
    table = cfg.table
    table = OmegaConf.to_container(table) if OmegaConf.is_config(table) else table
    return resolve_tables(table, _sweeps_dir(cfg))


def _sweeps_dir(cfg: DictConfig) -> Path | None:
    return Path(cfg.sweeps_dir).expanduser().resolve() if cfg.get("sweeps_dir") else None


def multirun_arguments(cfg: DictConfig) -> list[str]:
    """The ``tensormask-train`` command line that runs the tables (printed with ``dry_run``)."""
    seeds = cfg.seeds
    seeds = f"[{','.join(str(int(s)) for s in seeds)}]" if OmegaConf.is_list(seeds) else str(int(seeds))
    args = [
        "-m",
        "hydra/sweeper=rows",
        f"hydra/launcher={cfg.launcher}",
        f"hydra.sweeper.table={_hydra_list(tables_of(cfg))}",
        f"hydra.sweeper.scale={cfg.scale}",
        f"hydra.sweeper.seeds={seeds}",
        f"hydra.sweeper.dry_run={str(bool(cfg.dry_run or cfg.get('collect_only'))).lower()}",
        f"hydra.sweeper.on_stale={cfg.on_stale}",
        f"hydra.sweeper.force={str(bool(cfg.force)).lower()}",
        f"hydra.sweeper.runs_dir={_quote(Path(cfg.runs_dir).expanduser().resolve())}",
        f"hydra.sweeper.plan_file={_quote(plan_file(cfg))}",
        f"hydra.sweep.dir={_quote(scale_dir(cfg))}",
    ]
    if cfg.get("rows"):
        args.append(f"hydra.sweeper.rows={_hydra_list(cfg.rows)}")
    if cfg.get("sweeps_dir"):
        args.append(f"hydra.sweeper.sweeps_dir={_quote(_sweeps_dir(cfg))}")
    args += list(cfg.launcher_overrides or [])
    args += list(cfg.train_overrides or [])
    if cfg.get("imagenet_weights"):
        # every row's training reads its ImageNet backbone weights from this folder (docs/reproduce.md)
        args.append(f"++imagenet_weights={_quote(Path(cfg.imagenet_weights).expanduser().resolve())}")
    return args


def run_multirun(arguments: list[str]) -> None:
    """``tensormask-train <arguments>`` in this process, through Hydra's own command line (hydra.main).

    Runs with the basic launcher stay in this process (and see any stand-in for
    `tensormask.train.train`); other launchers start their own processes or cluster jobs.
    """
    from hydra.core.global_hydra import GlobalHydra

    import tensormask.train as train_entry

    saved = sys.argv
    sys.argv = ["tensormask-train", *arguments]
    try:
        train_entry.main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise ReproduceError(_plan_error() or f"the multirun stopped (exit status {exit_.code}); see the messages above") from None
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S", force=True)


_PLAN_FILE: Path | None = None


def _plan_error() -> str | None:
    try:
        data = json.loads(_PLAN_FILE.read_text()) if _PLAN_FILE else {}
    except (OSError, ValueError):
        return None
    return data.get("error")


def collect(spec: TableSpec, plan: dict[str, Any], default_root: Path) -> list[RowResult]:
    """The table's rows from the plan the sweeper wrote: every seed's run folder, or the reason it has none."""
    results = []
    seeds = plan.get("seeds") or [0]
    for row in spec.rows:
        entry = plan.get("rows", {}).get(f"{spec.name}/{row.id}")
        if entry is None:  # not asked for this time (rows=...): a row whose run we cannot vouch for
            folders = {s: default_root / spec.name / (row.id + (f"-seed{s}" if s else "")) for s in seeds}
            errors = {s: "not in this command's rows" for s in seeds}
            result = collect_seeds(spec, row, folders, errors)
            if not result.finished:
                result.status, result.error = "missing", "not run by this command (rows=...)"
            results.append(result)
            continue
        runs = entry["runs"]
        folders = {int(s): Path(r["folder"]) for s, r in runs.items()}
        errors = {int(s): r.get("error") for s, r in runs.items()}
        results.append(collect_seeds(spec, row, folders, errors))
    return results


def log_to_wandb(spec: TableSpec, results: list[RowResult], cfg: DictConfig) -> str | None:
    """Log the collected table and its comparisons to wandb (one short run per collection)."""
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
        dir=str(scale_dir(cfg) / spec.name),
        config={"table": spec.name, "scale": cfg.scale, "launcher": cfg.launcher, "seeds": OmegaConf.to_container(cfg.seeds) if OmegaConf.is_config(cfg.seeds) else cfg.seeds},
        reinit="finish_previous",
    )
    try:
        run.log({f"{spec.name}/{cfg.scale}": wandb_table(spec, results, cfg.scale),
                 f"{spec.name}/{cfg.scale}/comparisons": wandb_comparisons(spec, results)})
        run.summary["rows_finished"] = sum(r.finished for r in results)
        run.summary["rows_total"] = len(results)
        return run.id
    finally:
        run.finish()


def _check_options(cfg: DictConfig) -> None:
    """Refuse a flag that is not true/false and seeds that are not seeds, naming them, before anything runs;
    a single name for a list option (``rows=natural``, ``"train_overrides=trainer=gpu"``) is a list of one."""
    from omegaconf import open_dict

    for key in ("dry_run", "collect_only", "force", "print_config"):
        flag(key, cfg.get(key, False))
    seed_list(OmegaConf.to_container(cfg.seeds) if OmegaConf.is_list(cfg.seeds) else cfg.seeds)
    with open_dict(cfg):
        for key in ("rows", "train_overrides", "launcher_overrides"):
            value = cfg.get(key)
            names = name_list(key, OmegaConf.to_container(value) if OmegaConf.is_list(value) else value)
            cfg[key] = names if key == "rows" else (names or [])


def reproduce(cfg: DictConfig) -> list[RowResult]:
    """Run the chosen tables' rows (what is not finished), then collect and write every table.

    Returns the rows of every table, in order (nothing with ``dry_run=true``, which prints the plan).
    """
    global _PLAN_FILE
    _check_options(cfg)
    tables = tables_of(cfg)
    specs = [load_table(t, _sweeps_dir(cfg)) for t in tables]
    _PLAN_FILE = plan_file(cfg)
    if _PLAN_FILE.is_file():
        _PLAN_FILE.unlink()
    if not cfg.dry_run:  # the tables are written after every training: a wrong results_dir must stop it now
        out = Path(cfg.results_dir).expanduser()
        check_writable_folder(out, f"results_dir={out}", "the tables ")
    arguments = multirun_arguments(cfg)
    log.info("tensormask-train %s", " ".join(arguments))
    run_multirun(arguments)
    if cfg.dry_run:
        return []  # collect_only: the plan says where every run is; collect what is there
    plan = json.loads(_PLAN_FILE.read_text())
    out = Path(cfg.results_dir).expanduser()
    everything: list[RowResult] = []
    for spec in specs:
        results = collect(spec, plan, scale_dir(cfg))
        md = write_markdown(out / f"{spec.name}.md", spec, results, cfg.scale, sweep_dir=scale_dir(cfg))
        csv = write_csv(out / f"{spec.name}.csv", spec, results, cfg.scale)
        try:
            wandb_id = log_to_wandb(spec, results, cfg)
        except Exception as err:  # noqa: BLE001 - the table is written; wandb is a copy
            log.error("could not log %s to wandb: %s: %s", spec.name, type(err).__name__, err)
            wandb_id = None
        log.info("wrote %s and %s%s", md, csv, f"; wandb run {wandb_id}" if wandb_id else "")
        everything += results
    return everything


def compose(overrides: list[str], conf_dir: str | Path | None = None) -> DictConfig:
    """``conf/reproduce.yaml`` with command-line overrides (Hydra's override grammar)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf_dir = Path(conf_dir) if conf_dir else default_conf_dir()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name=REPRODUCE_CONFIG, overrides=list(overrides))
    return cfg


USAGE = """usage: tensormask-reproduce table=<name>|all [scale=mini|paper] [seeds=N] [dry_run=true]
                            [launcher=basic|local|slurm|joblib] [rows=[id,...]] [on_stale=retrain|stop]
                            [imagenet_weights=DIR] ["train_overrides=['key=value',...]"] [results_dir=...]

Runs the rows of the paper's tables (one Hydra multirun; rows that train the same network share
one run) and writes results/<table>.md and .csv beside the paper's numbers.
Tables: {tables}. All options: conf/reproduce.yaml; docs/reproduce.md.

examples:
  tensormask-reproduce table=table2c scale=mini                 # synthetic data, minutes per run on a CPU
  tensormask-reproduce table=table2c rows=[tensor_bipyramid]    # only this row (the table lists all)
  tensormask-reproduce table=all scale=paper dry_run=true       # the plan: each row's run, shared trainings, cost
  tensormask-reproduce table=table4 scale=paper launcher=slurm  # COCO and the paper's schedules, on SLURM
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv) or not argv:
        print(USAGE.format(tables=", ".join(list_tables())))
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = compose(argv)
        if cfg.get("print_config"):
            print(OmegaConf.to_yaml(cfg))
        results = reproduce(cfg)
    except (UserError, FileNotFoundError, KeyError, ValueError) as err:  # an unknown table, row or scale; a stale run
        print(f"tensormask-reproduce: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # an unknown key, a bad override: a short message, unless HYDRA_FULL_ERROR=1
        from tensormask.framework.entry import full_errors_wanted, user_error_message

        message = None if full_errors_wanted() else user_error_message(err)
        if message is None:
            raise
        print(f"tensormask-reproduce: error: {message}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        return 0
    for table in tables_of(cfg):
        print(Path(cfg.results_dir, f"{table}.md").expanduser().read_text())
    return 0 if all(r.finished for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
