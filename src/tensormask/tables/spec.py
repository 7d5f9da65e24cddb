"""The paper's tables as data: one sweep file per table in ``sweeps/``, loaded into `TableSpec`.

A sweep file names the table's rows. Each row is one training run (a job of the table's Hydra
multirun) and keeps the paper's numbers for that row, with where they come from::

    table: table1
    title: ...
    columns: [segm.AP]                 # what the table compares: <task>.<metric>
    overrides:                         # for every row; `all` first, then the chosen scale's
      all: [...]
      mini: [...]
      paper: [...]
    rows:
      - id: natural                    # the run's folder name and the row's key
        label: simple natural head     # the paper's wording
        overrides: {all: [...], mini: [...], paper: [...]}
        inference: [model.nms_boxes=mask-bb]   # optional: evaluation-only overrides (no effect on training)
        paper: {segm: {AP: 28.5}}      # percent, as printed; null where the paper has none
        source: paper Table 1 (2nd)
    comparisons:                       # the orders the paper draws, checked on our numbers
      - rows: [aligned, natural]       # the two rows compared (the paper's order comes from its numbers)
        column: segm.AP                # optional: the table's first column

The training of a row is the override list ``scale base + table all + table scale + row all + row
scale`` applied to the training config (``conf/train.yaml``); its evaluation adds the row's
``inference`` overrides. Rows whose composed training configs are equal share one training run
(`tensormask.tables.plan`). Rows are an explicit job list rather than a
Cartesian product because most tables are not products (Table 4 mixes detectors, schedules and
modes), and one row per job keeps the paper's numbers next to the run that reproduces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

TASKS = ("segm", "bbox")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SCALES = ("mini", "paper")
TABLES = ("table1", "table2a", "table2b", "table2c", "table2d", "table3", "table4", "table5")


def default_sweeps_dir() -> Path:
    """``$TENSORMASK_SWEEPS`` if set, else the installed package's ``sweeps/``, else the checkout's."""
    from tensormask.resources import sweeps_dir

    return sweeps_dir()


@dataclass(frozen=True)
class Column:
    """One compared quantity, ``<task>.<metric>``, e.g. ``segm.AP`` (mask AP) or ``bbox.AP75``."""

    task: str
    metric: str

    @staticmethod
    def parse(text: str) -> "Column":
        task, _, metric = str(text).partition(".")
        if task not in TASKS or metric not in METRICS:
            raise ValueError(f"column {text!r}: expected <task>.<metric> with task in {TASKS}, metric in {METRICS}")
        return Column(task, metric)

    @property
    def key(self) -> str:
        return f"{self.task}.{self.metric}"

    @property
    def header(self) -> str:
        """The paper's name: mask AP is plain ``AP``, box AP carries ``bb`` (``APbb``, ``APbb50``)."""
        return self.metric if self.task == "segm" else self.metric.replace("AP", "APbb", 1)


@dataclass(frozen=True)
class RowSpec:
    """One paper row: its training run's overrides and the paper's numbers (percent, None = not reported)."""

    id: str
    label: str
    overrides: dict[str, list[str]]
    paper: dict[str, float | None]
    source: str
    note: str = ""
    inference: list[str] = field(default_factory=list)

    def paper_value(self, column: Column) -> float | None:
        return self.paper.get(column.key)


@dataclass(frozen=True)
class Comparison:
    """An order the paper draws between two rows of a table, in one column (e.g. aligned > natural)."""

    first: str
    second: str
    column: Column

    @property
    def label(self) -> str:
        return f"{self.first} vs {self.second}"


@dataclass(frozen=True)
class TableSpec:
    """A paper table: its columns, the overrides shared by its rows, and its rows."""

    name: str
    title: str
    columns: list[Column]
    overrides: dict[str, list[str]]
    rows: list[RowSpec]
    description: str = ""
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
    comparisons: list[Comparison] = field(default_factory=list)

    def row(self, row_id: str) -> RowSpec:
        for row in self.rows:
            if row.id == row_id:
                return row
        raise KeyError(f"{self.name} has no row {row_id!r}; rows: {[r.id for r in self.rows]}")

    def job_overrides(self, row: RowSpec, scale: str, base: list[str] | None = None) -> list[str]:
        """The training overrides of one row at one scale: base, table (all, scale), row (all, scale)."""
        return [*(base or []), *self.row_keys(row, scale)]

    def row_keys(self, row: RowSpec, scale: str) -> list[str]:
        """What the row sets over the scale's base recipe: table (all, scale), row (all, scale)."""
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        return [
            *self.overrides.get("all", []),
            *self.overrides.get(scale, []),
            *row.overrides.get("all", []),
            *row.overrides.get(scale, []),
        ]

    def jobs(self, scale: str, base: list[str] | None = None) -> dict[str, list[str]]:
        """Row id -> training overrides, in the table's row order: the table's multirun."""
        return {row.id: self.job_overrides(row, scale, base) for row in self.rows}


def _override_sets(node: Any, where: str) -> dict[str, list[str]]:
    if node is None:
        return {}
    if isinstance(node, (list, ListConfig)):  # a plain list applies at every scale
        node = {"all": node}
    sets = OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node)
    unknown = set(sets) - {"all", *SCALES}
    if unknown:
        raise ValueError(f"{where}: override sets must be among all/{'/'.join(SCALES)}, got {sorted(unknown)}")
    out = {}
    for key, values in sets.items():
        values = values or []
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}.{key}: overrides must be strings, got {values!r}")
        out[key] = list(values)
    return out


def _paper_numbers(node: Any, columns: list[Column], where: str) -> dict[str, float | None]:
    numbers = OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node or {})
    flat: dict[str, float | None] = {}
    for task, metrics in numbers.items():
        for metric, value in (metrics or {}).items():
            key = Column.parse(f"{task}.{metric}").key
            flat[key] = None if value is None else float(value)
    missing = [c.key for c in columns if c.key not in flat]
    if missing:
        raise ValueError(f"{where}: paper numbers missing for {missing} (write null where the paper has none)")
    return flat


def load_table(name: str, sweeps_dir: str | Path | None = None) -> TableSpec:
    """Read ``<sweeps_dir>/<name>.yaml`` and check it: every row has an id, overrides and paper numbers."""
    sweeps_dir = Path(sweeps_dir) if sweeps_dir else default_sweeps_dir()
    path = sweeps_dir / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(list_tables(sweeps_dir)) or "none"
        raise FileNotFoundError(f"no sweep file {path} (tables: {available})")
    cfg = OmegaConf.load(path)
    if cfg.get("table") != name:
        raise ValueError(f"{path}: `table:` is {cfg.get('table')!r}, expected {name!r}")
    columns = [Column.parse(c) for c in cfg.columns]
    rows = []
    for i, row in enumerate(cfg.rows):
        where = f"{path.name} rows[{i}]"
        if not row.get("id"):
            raise ValueError(f"{where}: a row needs an id")
        rows.append(
            RowSpec(
                id=str(row.id),
                label=str(row.get("label") or row.id),
                overrides=_override_sets(row.get("overrides"), where),
                paper=_paper_numbers(row.get("paper"), columns, where),
                source=str(row.get("source") or ""),
                note=str(row.get("note") or ""),
                inference=_override_sets(row.get("inference"), f"{where}.inference").get("all", []),
            )
        )
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: row ids must be unique, got {ids}")
    comparisons = []
    for i, item in enumerate(cfg.get("comparisons") or []):
        pair = list(item.get("rows") or [])
        if len(pair) != 2 or not set(pair) <= set(ids) or pair[0] == pair[1]:
            raise ValueError(f"{path.name} comparisons[{i}]: rows must name two different rows of the table, got {pair}")
        column = Column.parse(item.get("column") or columns[0].key)
        if column not in columns:
            raise ValueError(f"{path.name} comparisons[{i}]: column {column.key} is not one of the table's columns")
        comparisons.append(Comparison(first=str(pair[0]), second=str(pair[1]), column=column))
    return TableSpec(
        name=name,
        title=str(cfg.get("title") or name),
        columns=columns,
        overrides=_override_sets(cfg.get("overrides"), path.name),
        rows=rows,
        description=str(cfg.get("description") or "").strip(),
        notes=[str(n) for n in (cfg.get("notes") or [])],
        path=path,
        comparisons=comparisons,
    )


def list_tables(sweeps_dir: str | Path | None = None) -> list[str]:
    """The tables with a sweep file, paper order first."""
    sweeps_dir = Path(sweeps_dir) if sweeps_dir else default_sweeps_dir()
    found = {p.stem for p in sweeps_dir.glob("*.yaml")} if sweeps_dir.is_dir() else set()
    return [t for t in TABLES if t in found] + sorted(found - set(TABLES))
