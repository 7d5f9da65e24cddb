"""Plan a reproduction: which training runs the chosen rows need, where they run, which are done.

Every row of a table (``sweeps/<table>.yaml``) is a training config (the scale's base recipe plus
the table's and the row's overrides) and, optionally, evaluation-only ``inference`` overrides
(e.g. Table 5's NMS boxes). The plan

- composes the training config of every row of every table (Hydra's compose, through the caller's
  ``compose`` function) and reduces it to what determines the trained network (`training_key`:
  run folders, loggers, checkpoint cadence and the like left out);
- gives rows with the same training config one training run per seed, in the folder of the first
  such row in paper order (``<scale dir>/<table>/<row>``, ``<row>-seed<k>`` for seed k > 0), so a
  row of Table 5 finds the run Table 2d already trained;
- gives a row with inference overrides its own evaluation of that training's checkpoint
  (``train=false ckpt_path=...``) in its own folder;
- reuses a finished run only when the config it was trained with (its ``checkpoints/config.yaml``)
  equals the one asked for now. Otherwise it trains again into the next free version of the folder
  (``<row>-v2``, the old run kept), or, with ``on_stale=stop``, stops naming the differing keys.

`describe` prints the plan (``dry_run=true``); `RowsSweeper` (``hydra/sweeper=rows``) runs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tensormask.errors import UserError
from tensormask.framework.validation import ConfigError
from tensormask.tables.collect import SUMMARY_FILE, read_summary
from tensormask.tables.spec import SCALES, RowSpec, TableSpec, list_tables, load_table

CONFIG_FILE = "checkpoints/config.yaml"  # what tensormask.train saves before it trains (resolved)
ON_STALE = ("retrain", "stop")

# Keys that do not change the trained network: where the run writes, what it logs and how often it
# checkpoints, its name and tags, whether it resumes. Everything else (seed included) does.
BOOKKEEPING = (
    "group", "tags", "ckpt_path", "paths", "logger", "callbacks", "task_name", "train", "evaluate",
    "optimized_metric", "trainer.default_root_dir", "trainer.enable_progress_bar", "data.num_workers",
)


class StaleRunError(UserError):
    """A finished run was trained with another config than the one asked for (``on_stale=stop``)."""


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return
    tree.pop(leaf, None)


def training_key(cfg: DictConfig | dict[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config without the `BOOKKEEPING` keys (except those in ``keep``)."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    tree.pop("hydra", None)
    for key in BOOKKEEPING:
        if key not in keep:
            _drop(tree, key)
    return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (missing on one side: ``<unset>``).

    A key that one side lacks and the other sets to null is no difference: a config key added
    since (e.g. a new option whose default is off) does not make older runs stale.
    """
    a, b = flat(old), flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "<unset>"), b.get(k, "<unset>")
        added = (x == "<unset>" and y is None) or (y == "<unset>" and x is None)
        if x != y and not added:
            out.append(f"{k}: {x} -> {y}")
    return out


def flag(name: str, value: Any) -> bool:
    """A true/false option (``dry_run``, ``force``, ...): anything else is refused, naming it (a typo such
    as ``force=no`` is the string "no", which Python would take as true and retrain every run)."""
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name}={value!r}: must be true or false")


def name_list(name: str, value: Any) -> list[str] | None:
    """``rows=natural`` (one name) or ``rows=[natural,aligned]`` -> a list of names; null -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) or OmegaConf.is_list(value):
        return [str(v) for v in value]
    raise ConfigError(f"{name}={value!r}: give a name or a list of names, e.g. {name}=[a,b]")


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``seeds=3`` -> [0, 1, 2]; a list is taken as given."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"seeds={seeds}: give a positive number of seeds, or a list of seeds")
        return list(range(seeds))
    if isinstance(seeds, (str, bool, float)) or not (isinstance(seeds, Sequence) or OmegaConf.is_list(seeds)) or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds={seeds!r}: give a number of seeds (seeds=3) or a list of integer seeds (seeds=[0,7])")
    values = [int(s) for s in seeds]
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"seeds={list(seeds)}: give distinct seeds")
    return values


@dataclass
class Run:
    """One run for one seed: a training, or an evaluation of a training with inference overrides."""

    kind: str  # "train" | "eval"
    name: str  # "<table>/<row>" of the row whose folder it runs in
    seed: int
    overrides: list[str]
    key: dict[str, Any]
    steps: Any = None
    devices: Any = None
    training: Run | None = None  # for "eval": the training it evaluates
    folder: Path | None = None
    action: str = "run"  # "run" | "reuse"
    stale: list[str] = field(default_factory=list)  # older folders kept because their config differs
    error: str | None = None

    @property
    def checkpoint(self) -> Path:
        return Path(self.folder) / "checkpoints" / "last.ckpt"


@dataclass
class RowPlan:
    table: str
    row: RowSpec
    keys: list[str]  # what the row sets over the base recipe
    training: str  # the "<table>/<row>" that names the training run
    shares: list[str]  # the other rows (any table) trained by the same run
    runs: dict[int, Run] = field(default_factory=dict)  # seed -> the run whose results are this row's

    @property
    def name(self) -> str:
        return f"{self.table}/{self.row.id}"


@dataclass
class Plan:
    scale: str
    seeds: list[int]
    root: Path
    rows: list[RowPlan]
    trainings: list[Run]
    evaluations: list[Run]

    def to_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "seeds": self.seeds,
            "root": str(self.root),
            "rows": {
                r.name: {
                    "training": r.training,
                    "shares": r.shares,
                    "runs": {str(s): {"folder": str(run.folder), "kind": run.kind, "action": run.action, "error": run.error}
                             for s, run in r.runs.items()},
                }
                for r in self.rows
            },
        }


def resolve_tables(table: str | Sequence[str], sweeps_dir: Path | None = None) -> list[str]:
    """``all`` -> every table; a name or a list of names -> those, checked."""
    names = [table] if isinstance(table, str) else [str(t) for t in table]
    available = list_tables(sweeps_dir)
    if names == ["all"]:
        return available
    for name in names:
        if name not in available:
            where = sweeps_dir or "sweeps/"
            raise ConfigError(f"table={name}: no sweep file {name}.yaml in {where} (tables: {', '.join(available) or 'none'})")
    return names


def _folder_name(row: str, seed: int, version: int, suffix: str = "") -> str:
    return row + (f"-seed{seed}" if seed else "") + suffix + (f"-v{version}" if version > 1 else "")


def _saved_key(folder: Path, keep: Sequence[str]) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return training_key(OmegaConf.load(path), keep)
    except Exception:  # noqa: BLE001 - an unreadable saved config is not this config
        return {"<unreadable config.yaml>": str(path)}


def _place(run: Run, root: Path, on_stale: str, force: bool, stale_errors: list[str]) -> None:
    """Pick the run's folder: the first version that is free or was trained with this config."""
    table, row = run.name.split("/", 1)
    keep = ("train", "ckpt_path") if run.kind == "eval" else ()
    # A row whose training it names itself (no other row trains it) is evaluated beside it.
    suffix = "-eval" if run.kind == "eval" and run.training is not None and run.training.name == run.name else ""
    for version in range(1, 100):
        folder = root / table / _folder_name(row, run.seed, version, suffix)
        saved = _saved_key(folder, keep) if folder.is_dir() else None
        diff = differences(saved, run.key) if saved is not None else []
        if diff:
            if on_stale == "stop":
                stale_errors.append(f"{folder} was run with another config ({'; '.join(diff[:8])}"
                                    f"{'; ...' if len(diff) > 8 else ''})")
                run.folder = folder
                return
            run.stale.append(f"{folder.name}: {'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}")
            continue
        run.folder = folder
        summary = read_summary(folder) if folder.is_dir() else None
        done = saved is not None and summary is not None and summary.get("status") == "finished"
        if done and run.kind == "eval":  # an evaluation older than its training's last result is stale
            trained = run.training.folder / SUMMARY_FILE if run.training else None
            done = trained is None or not trained.is_file() or (folder / SUMMARY_FILE).stat().st_mtime >= trained.stat().st_mtime
        run.action = "reuse" if done and not force else "run"
        return
    raise UserError(f"{run.name}: 99 stale versions of its run folder in {root / table}; clean them up")


def build_plan(
    compose: Callable[[list[str]], DictConfig],
    tables: Sequence[str],
    scale: str,
    runs_dir: str | Path,
    *,
    base: Sequence[str] = (),
    extra: Sequence[str] = (),
    rows: Sequence[str] | None = None,
    seeds: int | Sequence[int] = 1,
    on_stale: str = "retrain",
    force: bool = False,
    sweeps_dir: str | Path | None = None,
) -> Plan:
    """The plan of ``tables`` (their ``rows`` only, if given: ``id`` or ``table/id``) at ``scale``.

    ``compose(overrides)`` returns the training config for a list of overrides; ``base`` is the
    scale's recipe, ``extra`` the user's overrides for every run (applied after the row's).
    """
    if scale not in SCALES:
        raise ConfigError(f"scale={scale}: must be one of {', '.join(SCALES)}")
    if on_stale not in ON_STALE:
        raise ConfigError(f"on_stale={on_stale}: must be one of {', '.join(ON_STALE)}")
    sweeps_dir = Path(sweeps_dir) if sweeps_dir else None
    seeds = seed_list(seeds)
    root = (Path(runs_dir).expanduser() / scale).resolve()
    specs: dict[str, TableSpec] = {name: load_table(name, sweeps_dir) for name in list_tables(sweeps_dir)}
    chosen = resolve_tables(list(tables), sweeps_dir)
    wanted = _wanted_rows([specs[t] for t in chosen], rows)

    # Compose every row of every table: a run is named after the first row (paper order) that trains it,
    # whichever tables are asked for now, so that every command finds the same folder.
    entries = []
    evaluated: dict[str, DictConfig] = {}  # "<table>/<row>" -> its config with its inference overrides
    for spec in specs.values():
        for row in spec.rows:
            train_overrides = [*base, *spec.row_keys(row, scale), *extra]
            try:
                cfg = compose(train_overrides)
                key = training_key(cfg)
                if row.inference:
                    evaluated[f"{spec.name}/{row.id}"] = compose([*train_overrides, *row.inference])
                full = training_key(evaluated[f"{spec.name}/{row.id}"]) if row.inference else key
            except Exception as err:  # noqa: BLE001 - a row that does not compose fails alone
                if f"{spec.name}/{row.id}" in wanted:
                    entries.append((spec, row, train_overrides, None, None, None, f"{type(err).__name__}: {err}"))
                continue
            entries.append((spec, row, train_overrides, cfg, key, full, None))

    def ident(key: dict[str, Any]) -> str:
        return json.dumps(key, sort_keys=True, default=str)

    owner_of_training: dict[str, str] = {}
    owner_of_eval: dict[str, str] = {}
    sharing: dict[str, list[str]] = {}
    for spec, row, _, _, key, full, error in entries:
        if error:
            continue
        name = f"{spec.name}/{row.id}"
        k = ident(key)
        if not row.inference:  # the training's own evaluation is this row's: it names the run first
            owner_of_training.setdefault(k, name)
        sharing.setdefault(k, []).append(name)
        if row.inference:
            owner_of_eval.setdefault(ident(full), name)
    for spec, row, _, _, key, _, error in entries:
        if not error:
            owner_of_training.setdefault(ident(key), f"{spec.name}/{row.id}")

    trainings: dict[tuple[str, int], Run] = {}
    evaluations: dict[tuple[str, int], Run] = {}
    stale_errors: list[str] = []
    plans: list[RowPlan] = []
    for spec, row, train_overrides, cfg, key, full, error in entries:
        name = f"{spec.name}/{row.id}"
        if name not in wanted:
            continue
        keys = [*spec.row_keys(row, scale), *row.inference]
        if error:
            plan_row = RowPlan(spec.name, row, keys, training=name, shares=[])
            for seed in seeds:
                failed = Run("train", name, seed, train_overrides, {}, error=error, folder=root / spec.name / _folder_name(row.id, seed, 1))
                plan_row.runs[seed] = failed
            plans.append(plan_row)
            continue
        k = ident(key)
        owner = owner_of_training[k]
        plan_row = RowPlan(spec.name, row, keys, training=owner, shares=[r for r in sharing[k] if r != name])
        for seed in seeds:
            seeded = [*train_overrides, f"seed={seed}"]
            train_run = trainings.get((k, seed))
            if train_run is None:
                train_run = Run("train", owner, seed, seeded, _with_seed(cfg, seed),
                                steps=OmegaConf.select(cfg, "trainer.max_steps"),
                                devices=_devices(cfg))
                _place(train_run, root, on_stale, force, stale_errors)
                trainings[(k, seed)] = train_run
            result = train_run
            if row.inference:
                e = ident(full)
                eval_run = evaluations.get((e, seed))
                if eval_run is None:
                    eval_owner = owner_of_eval[e]
                    ckpt = str(train_run.checkpoint)
                    eval_run = Run("eval", eval_owner, seed, [*seeded, *row.inference, "train=false", f"ckpt_path={ckpt}"],
                                   {**_with_seed(evaluated[name], seed), "train": False, "ckpt_path": ckpt}, training=train_run)
                    _place(eval_run, root, on_stale, force, stale_errors)
                    evaluations[(e, seed)] = eval_run
                result = eval_run
            plan_row.runs[seed] = result
        plans.append(plan_row)
    if stale_errors:
        raise StaleRunError(
            "on_stale=stop: finished runs were trained with another config than asked for now; "
            "run with on_stale=retrain to train them again into new folders (the old ones are kept):\n  "
            + "\n  ".join(stale_errors)
        )
    order = {f"{p.table}/{p.row.id}": i for i, p in enumerate(plans)}
    plans.sort(key=lambda p: (chosen.index(p.table), order[p.name]))
    # Seed-major order: every training once before any second seed (an interrupted multirun has
    # one seed of every row rather than every seed of the first rows).
    by_seed = lambda run: seeds.index(run.seed)  # noqa: E731
    return Plan(scale, seeds, root, plans, sorted(trainings.values(), key=by_seed), sorted(evaluations.values(), key=by_seed))


def _with_seed(cfg: DictConfig, seed: int) -> dict[str, Any]:
    """The training key of ``cfg`` run with ``seed`` (set before resolving: other keys interpolate it, e.g. data.seed)."""
    seeded = cfg.copy()
    seeded.seed = seed
    return training_key(seeded)


def _devices(cfg: DictConfig) -> Any:
    devices = OmegaConf.select(cfg, "trainer.devices")
    nodes = OmegaConf.select(cfg, "trainer.num_nodes") or 1
    return devices * nodes if isinstance(devices, int) else devices


def _wanted_rows(specs: list[TableSpec], rows: Sequence[str] | None) -> list[str]:
    every = [f"{s.name}/{r.id}" for s in specs for r in s.rows]
    if not rows:
        return every
    wanted = []
    for item in rows:
        item = str(item)
        matches = [n for n in every if n == item or n.split("/", 1)[1] == item]
        if not matches:
            raise ConfigError(f"rows: no row {item!r} in {', '.join(s.name for s in specs)}; rows: {', '.join(every)}")
        wanted += [m for m in matches if m not in wanted]
    return wanted


def describe(plan: Plan) -> str:
    """The dry run: per row its keys over the base recipe, run folder, shared training and cost."""
    lines = [f"Plan at scale={plan.scale}, seeds {plan.seeds}, runs under {plan.root}:"]
    for r in plan.rows:
        first = r.runs[plan.seeds[0]]
        lines.append(f"- {r.name}: {r.row.label}")
        lines.append(f"    sets: {' '.join(r.keys) or '(nothing: the base recipe)'}")
        folders = ", ".join(str(run.folder.relative_to(plan.root)) if run.folder else "?" for run in r.runs.values())
        lines.append(f"    run folder: {folders}")
        lines.append(f"    shares its training with: {', '.join(r.shares) or 'no other row'}")
        if first.error:
            lines.append(f"    cannot run: {first.error}")
            continue
        training = first.training or first
        if training.name == r.name:
            cost = f"{training.steps} steps x {training.devices} devices"
            if len(plan.seeds) > 1:
                cost += f" x {len(plan.seeds)} seeds"
        else:
            cost = f"0 (trained by {training.name})"
        if first.kind == "eval":
            cost += "; evaluated with its inference overrides"
        lines.append(f"    cost: {cost}")
        states = sorted({run.action for run in r.runs.values()} | {(run.training.action if run.training else run.action) for run in r.runs.values()})
        lines.append(f"    state: {'finished, reused' if states == ['reuse'] else 'to run'}")
        for run in r.runs.values():
            for old in run.stale + (run.training.stale if run.training else []):
                lines.append(f"    kept, trained otherwise: {old}")
    todo = sum(run.action == "run" for run in plan.trainings)
    lines.append(f"{todo} of the {len(plan.trainings)} training runs to run, "
                 f"{sum(run.action == 'run' for run in plan.evaluations)} of {len(plan.evaluations)} evaluations")
    lines.append(f"plan: {len(plan.rows)} rows, {len(plan.trainings)} training runs")
    return "\n".join(lines)


def write_plan(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan.to_json(), indent=2))
    tmp.replace(path)
    return path
