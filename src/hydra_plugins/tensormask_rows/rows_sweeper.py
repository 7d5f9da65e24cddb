"""``hydra/sweeper=rows``: a Hydra multirun of the rows of the paper's tables, with any launcher.

    tensormask-train -m hydra/sweeper=rows hydra.sweeper.table=table1                  # this process
    tensormask-train -m hydra/sweeper=rows hydra.sweeper.table=all hydra.sweeper.scale=paper \\
        hydra/launcher=slurm                                                            # SLURM

The rows come from ``sweeps/<table>.yaml``; `tensormask.tables.plan` turns them into training runs
(one per distinct training config and seed) and evaluations (rows with inference overrides).
The command line's other overrides apply to every run. The sweeper hands the runs to the
configured launcher (Hydra's launcher plugin API), trainings first, then the evaluations of
their checkpoints, and writes the plan with each run's folder and outcome to ``plan_file``
(`tensormask-reproduce` collects the tables from it). A run that fails, whatever the reason
(its folder not writable, its log file not openable, an exception while training), fails alone:
the other runs go on. Options: ``conf/hydra/sweeper/rows.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_COMPOSED: dict = {}


def _quote(text: str) -> str:
    """A value for Hydra's override grammar, whatever its characters."""
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


class RowsSweeper(Sweeper):
    def __init__(
        self,
        table: Any,
        scale: str = "mini",
        rows: Optional[Sequence[str]] = None,
        seeds: Any = 1,
        dry_run: bool = False,
        on_stale: str = "retrain",
        force: bool = False,
        runs_dir: str = "outputs/reproduce",
        plan_file: Optional[str] = None,
        sweeps_dir: Optional[str] = None,
        scales: Optional[dict] = None,
    ) -> None:
        self.table = table
        self.scale = scale
        from tensormask.tables.plan import flag, name_list

        self.rows = name_list("rows", rows) or None  # rows=natural: a list of one
        self.seeds = seeds
        self.dry_run = flag("dry_run", dry_run)  # force=no must not retrain every finished run
        self.on_stale = on_stale
        self.force = flag("force", force)
        self.runs_dir = runs_dir
        self.plan_file = plan_file
        self.sweeps_dir = sweeps_dir
        self.scales = scales or {}
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.task_function = task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _compose(self, overrides: List[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _compose_cached(self, overrides: List[str]) -> DictConfig:
        """`_compose`, remembered for the life of the process (the plan composes every row of every
        table; a second command in the same process, e.g. a test, need not compose them again)."""
        where = ("hydra.sweeper", "hydra.sweep.", "hydra/sweeper", "hydra.launcher", "hydra/launcher")  # no effect on the job's config
        hydra_overrides = tuple(o for o in self.config.hydra.overrides.hydra if not o.lstrip("+~").startswith(where))
        key = (str(self.config.hydra.job.config_name), hydra_overrides, tuple(overrides))
        if key not in _COMPOSED:
            _COMPOSED[key] = self._compose(overrides)
        return _COMPOSED[key].copy()

    def sweep(self, arguments: List[str]) -> Any:
        from tensormask import framework  # noqa: F401  (the resolvers the training config uses)
        from tensormask.tables.plan import build_plan, describe, write_plan

        def plain(value: Any) -> Any:
            return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

        table = plain(self.table)
        base = list(plain(self.scales).get(self.scale) or [])
        plan_file = Path(self.plan_file or Path(self.runs_dir) / self.scale / "plan.json").expanduser()
        try:
            plan = build_plan(
                self._compose_cached, [table] if isinstance(table, str) else table, self.scale, self.runs_dir,
                base=base, extra=list(arguments), rows=plain(self.rows), seeds=plain(self.seeds),
                on_stale=self.on_stale, force=self.force, sweeps_dir=self.sweeps_dir,
            )
        except Exception as err:
            _write_error(plan_file, err)
            raise
        served: dict[int, list[str]] = {}
        for row in plan.rows:
            for run in row.runs.values():
                served.setdefault(id(run), []).append(row.name)
                if run.training is not None:
                    served.setdefault(id(run.training), []).append(row.name)
        if self.dry_run:
            text = describe(plan)
            if not self._sequential():
                lines = text.splitlines()
                text = "\n".join([*lines[:-1], *self._describe_groups(plan, served), lines[-1]])
            print(text, flush=True)
            write_plan(plan, plan_file)
            return plan
        write_plan(plan, plan_file)
        # A launcher that runs one job after another (Hydra's basic one) goes seed by seed, each
        # seed's trainings then their evaluations: stopped early, it leaves whole rows of the first
        # seeds. Launchers that run jobs side by side get every training at once, then every evaluation.
        waves = [[s] for s in plan.seeds] if self._sequential() else [plan.seeds]
        for wave in waves:
            self._launch([r for r in plan.trainings if r.seed in wave], served, plan.root)
            evaluations = [r for r in plan.evaluations if r.seed in wave]
            for run in evaluations:
                trained = _status(run.training.folder) if run.training and run.training.folder else None
                if run.action == "run" and trained != "finished":
                    run.error = f"its training {run.training.folder} did not finish ({trained or 'no run_summary.json'})"
                    run.action = "skipped"
            self._launch(evaluations, served, plan.root)
            write_plan(plan, plan_file)
        return plan

    def _overrides(self, run, served: dict[int, list[str]], root: Path) -> list[str]:
        rows = sorted(set(served.get(id(run), [run.name])))
        tags = ["reproduce", self.scale, *sorted({r.split("/")[0] for r in rows}), *[r.replace("/", ".") for r in rows]]
        overrides = [*run.overrides, f"group={run.name.split('/')[0]}", f"tags=[{','.join(_quote(t) for t in tags)}]"]
        if run.kind == "train" and not self.force:
            overrides.append("ckpt_path=last")  # an interrupted run resumes from its last checkpoint
        return [*overrides, f"hydra.sweep.dir={_quote(root)}", f"hydra.sweep.subdir={_quote(run.folder.relative_to(root))}"]

    def _sequential(self) -> bool:
        return type(self.launcher).__name__ == "BasicLauncher"

    def _groups(self, runs, served: dict[int, list[str]], root: Path):
        """[(launcher, runs, overrides)]: a cluster launcher asks for the resources its config resolves
        to (conf/hydra/launcher/slurm.yaml: GPUs per node = trainer.devices), so runs are launched in
        groups with the same resolved launcher settings, each by a launcher set up with that config."""
        batch = [self._overrides(r, served, root) for r in runs]
        if self._sequential():
            return [(self.launcher, runs, batch, None)]
        groups: dict[str, tuple] = {}
        for run, overrides in zip(runs, batch):
            try:
                cfg = self._compose(overrides)
                settings = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
            except Exception as err:  # noqa: BLE001 - a run that does not compose fails alone
                run.error = f"{type(err).__name__}: {err}"
                continue
            key = json.dumps(settings, sort_keys=True, default=str)
            groups.setdefault(key, (cfg, [], [], settings))
            groups[key][1].append(run)
            groups[key][2].append(overrides)
        out = []
        for cfg, group_runs, group_batch, settings in groups.values():
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=self.hydra_context, task_function=self.task_function, config=cfg
            )
            out.append((launcher, group_runs, group_batch, settings))
        return out

    def _describe_groups(self, plan, served) -> list[str]:
        lines = []
        for _, runs, _, settings in self._groups([*plan.trainings, *plan.evaluations], served, plan.root):
            shown = {k: v for k, v in settings.items() if k in ("_target_", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "partition", "n_jobs")}
            lines.append(f"launch group of {len(runs)} run(s): " + " ".join(f"{k}={v}" for k, v in shown.items()))
        return lines

    def _launch(self, runs, served: dict[int, list[str]], root: Path) -> None:
        todo = [r for r in runs if r.action == "run" and not r.error]
        if not todo:
            return
        for launcher, group, batch, _ in self._groups(todo, served, root):
            self._launch_group(launcher, group, batch)

    def _launch_group(self, launcher, todo, batch) -> None:
        started = time.time()
        try:
            returns = launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(batch)
            for run, ret in zip(todo, returns):
                self._outcome(run, ret)
            return
        except Exception as err:  # noqa: BLE001 - one run's failure must not take the others with it
            log.warning("a run failed outside its training (%s: %s): running the remaining runs one by one",
                        type(err).__name__, err)
        for run, overrides in zip(todo, batch):
            if _touched_since(run.folder, started):
                run.error = _summary_error(run.folder)
                continue
            try:
                (ret,) = launcher.launch([overrides], initial_job_idx=self.job_idx)
                self.job_idx += 1
                self._outcome(run, ret)
            except Exception as err:  # noqa: BLE001 - e.g. its folder or its log file cannot be written
                run.error = f"{type(err).__name__}: {err} (run folder {run.folder})"
                _write_failed_summary(run.folder, run.error, run.overrides)
                log.error("%s (seed %d) failed: %s", run.name, run.seed, run.error)

    @staticmethod
    def _outcome(run, ret) -> None:
        from hydra.core.utils import JobStatus

        if ret.status == JobStatus.COMPLETED:
            run.error = _summary_error(run.folder)
            return
        try:
            ret.return_value
            error = f"job status {ret.status}"
        except Exception as err:  # noqa: BLE001 - the job's exception, re-raised by JobReturn
            error = f"{type(err).__name__}: {err}"
        if _status(run.folder) in (None, "running"):  # it died before it could say so: record why
            _write_failed_summary(run.folder, error, run.overrides)
        run.error = _summary_error(run.folder) if _status(run.folder) == "failed" else error


def _status(folder: Path) -> Optional[str]:
    from tensormask.tables.collect import read_summary

    summary = read_summary(folder) if Path(folder).is_dir() else None
    return summary.get("status") if summary else None


def _summary_error(folder: Path) -> Optional[str]:
    from tensormask.tables.collect import read_summary

    summary = read_summary(folder) if Path(folder).is_dir() else None
    if summary is None:
        return f"no run_summary.json in {folder}"
    if summary.get("status") == "finished":
        return None
    return summary.get("error") or f"status {summary.get('status')}"


def _write_failed_summary(folder: Path, error: str, overrides: List[str]) -> None:
    """A run_summary.json saying ``failed`` with the reason, for a run that raised before writing its own."""
    import json as _json

    from tensormask.tables.collect import SUMMARY_FILE, read_summary

    previous = (read_summary(folder) if Path(folder).is_dir() else None) or {}
    summary = {"status": "failed", "error": error, "metrics": previous.get("metrics") or {}, "wandb": previous.get("wandb"),
               "overrides": list(overrides), "run_dir": str(folder), "steps": previous.get("steps") or 0}
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / SUMMARY_FILE).write_text(_json.dumps(summary, indent=2))
    except OSError:
        pass  # an unwritable folder: the plan file keeps the reason


def _touched_since(folder: Path, since: float) -> bool:
    path = Path(folder) / "run_summary.json"
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _write_error(plan_file: Path, err: BaseException) -> None:
    import json

    try:
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps({"error": f"{err}", "type": type(err).__name__}))
    except OSError:
        pass
