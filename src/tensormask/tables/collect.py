"""Collect a table's runs: read each row's ``<run_dir>/run_summary.json`` into a `RowResult`.

The training entry point writes ``run_summary.json`` in every run directory::

    {"status": "running" | "finished" | "failed", "error": str | None,
     "metrics": {"bbox": {"AP": 0.41, ...}, "segm": {...}},      # fractions in [0, 1]
     "wandb": {"run_id": ..., "project": ..., ...} | None,
     "overrides": [...], "run_dir": str, "steps": int}

A row whose folder has no summary is ``missing`` (never launched, or lost); a summary that still
says ``running`` is ``running`` (in flight, or killed before it could say otherwise). Only
``finished`` rows carry our numbers, converted to percent like the paper's.

With several seeds (`collect_seeds`), a row's numbers are the mean over its finished seeds, with
their sample standard deviation; `compare` checks the orders the paper draws between rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensormask.tables.spec import Column, RowSpec, TableSpec

SUMMARY_FILE = "run_summary.json"
STATUSES = ("finished", "failed", "running", "missing")


@dataclass
class RowResult:
    """One row of a collected table: the paper's numbers beside ours (both percent; None = none)."""

    row: RowSpec
    status: str
    run_dir: Path
    ours: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    wandb_run_id: str | None = None
    steps: int | None = None
    std: dict[str, float | None] = field(default_factory=dict)  # sample std over the finished seeds
    seeds: int = 1  # seeds asked for
    seeds_finished: int | None = None  # seeds whose run finished (None: one run, no seeds)
    per_seed: dict[int, dict[str, float | None]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's summary, or None when there is none yet. An unreadable file is reported as a failure."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {"status": "failed", "error": f"unreadable {SUMMARY_FILE}: {err}"}
    if not isinstance(summary, dict) or summary.get("status") not in ("running", "finished", "failed"):
        return {"status": "failed", "error": f"{SUMMARY_FILE} without a valid status: {str(summary)[:200]}"}
    return summary


def _percent(metrics: dict[str, Any], column: Column) -> float | None:
    value = (metrics.get(column.task) or {}).get(column.metric)
    if value is None:
        return None
    value = float(value)
    if math.isnan(value) or value < 0:  # COCOeval writes -1 where a size range has no objects
        return None
    return 100.0 * value


def collect_row(table: TableSpec, row: RowSpec, run_dir: str | Path) -> RowResult:
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is None:
        return RowResult(row=row, status="missing", run_dir=run_dir, error=f"no {SUMMARY_FILE} in {run_dir}")
    status = summary["status"]
    wandb_info = summary.get("wandb") or {}
    result = RowResult(
        row=row,
        status=status,
        run_dir=run_dir,
        error=summary.get("error") if status != "finished" else None,
        wandb_run_id=wandb_info.get("run_id"),
        steps=summary.get("steps"),
    )
    if status == "running":
        result.error = result.error or "the run has not written its final status (still running, or killed)"
    if status == "failed":
        result.error = result.error or "failed without an error message"
    if status == "finished":
        metrics = summary.get("metrics") or {}
        result.ours = {c.key: _percent(metrics, c) for c in table.columns}
    return result


def collect_table(table: TableSpec, sweep_dir: str | Path) -> list[RowResult]:
    """Every row of ``table`` from ``<sweep_dir>/<row id>/run_summary.json``, in the table's order."""
    sweep_dir = Path(sweep_dir)
    return [collect_row(table, row, sweep_dir / row.id) for row in table.rows]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def collect_seeds(table: TableSpec, row: RowSpec, folders: dict[int, Path], errors: dict[int, str | None] | None = None) -> RowResult:
    """One row over several seeds (seed -> run folder): mean +- sample std of every column over the
    finished seeds. The row is ``finished`` when every seed finished; otherwise it takes the status
    of its first unfinished seed (failed before running before missing), with that seed's reason,
    and still shows the mean of the seeds that finished."""
    errors = errors or {}
    per = {}
    for seed, folder in folders.items():
        result = collect_row(table, row, folder)
        if result.status == "missing" and errors.get(seed):
            result.status, result.error = "failed", errors[seed]
        per[seed] = result
    done = {s: r for s, r in per.items() if r.finished}
    unfinished = [r for r in per.values() if not r.finished]
    rank = {"failed": 0, "running": 1, "missing": 2}
    first = min(unfinished, key=lambda r: rank[r.status]) if unfinished else None
    seed_of = {id(r): s for s, r in per.items()}
    out = RowResult(
        row=row,
        status=first.status if first else "finished",
        run_dir=next(iter(folders.values())),
        error=None if first is None else (f"seed {seed_of[id(first)]}: " if len(folders) > 1 else "") + (first.error or ""),
        seeds=len(folders),
        seeds_finished=len(done),
        per_seed={s: r.ours for s, r in done.items()},
    )
    ids = [r.wandb_run_id for r in per.values() if r.wandb_run_id]
    out.wandb_run_id = ",".join(ids) or None
    steps = {r.steps for r in done.values()}
    out.steps = steps.pop() if len(steps) == 1 else None
    for column in table.columns:
        values = [r.ours[column.key] for r in done.values() if r.ours.get(column.key) is not None]
        out.ours[column.key], out.std[column.key] = _mean_std(values)
        if not values and done:
            out.ours[column.key] = None
    if not done:
        out.ours = {}
    return out


@dataclass
class ComparisonResult:
    """The paper's order between two rows in one column, checked on ours (numbers in percent)."""

    label: str
    column: Column
    paper_gap: float | None  # paper(first) - paper(second)
    our_gap: float | None  # mean(first) - mean(second)
    spread: float | None  # std(first) + std(second) over seeds; None with fewer than 2 seeds per row
    agrees: bool | None  # same sign as the paper's gap; None: a number is missing, or a gap is 0
    exceeds: bool | None  # |our gap| > spread; None: no spread
    # first - second seed by seed, over the seeds both rows finished: the rows of one seed see the same
    # images in the same order (data.seed is the run's seed), so a seed's effect common to both rows,
    # which the spread counts twice, cancels here
    seed_gaps: dict[int, float] = field(default_factory=dict)

    @property
    def seeds_in_order(self) -> int | None:
        """How many seeds' gaps have the paper's sign (None: no paper order, or no per-seed gap)."""
        if not self.seed_gaps or not self.paper_gap:
            return None
        return sum((g > 0) == (self.paper_gap > 0) for g in self.seed_gaps.values() if g != 0)

    @property
    def per_seed(self) -> str:
        """e.g. "+5.4 / +6.4 / +3.8 (3/3 in the paper's order)"; "-" with fewer than two seeds."""
        if len(self.seed_gaps) < 2:
            return "-"
        gaps = " / ".join(f"{self.seed_gaps[s]:+.1f}" for s in sorted(self.seed_gaps))
        n = self.seeds_in_order
        return gaps if n is None else f"{gaps} ({n}/{len(self.seed_gaps)} in the paper's order)"

    @property
    def verdict(self) -> str:
        if self.agrees is None:
            return "tie (no order)" if self.our_gap == 0 and self.paper_gap else "n/a"
        order = "agrees" if self.agrees else "disagrees"
        if self.exceeds is None:
            return f"{order}, spread unknown (1 seed)"
        return f"{order}, {'gap > spread' if self.exceeds else 'within the seed spread'}"


def compare(table: TableSpec, results: list[RowResult]) -> list[ComparisonResult]:
    """Every comparison of the table's sweep file (``comparisons:``) on the collected rows.

    Our gap "exceeds the seed spread" when |mean(a) - mean(b)| > std(a) + std(b), the sample
    standard deviations over each row's finished seeds (docs/reproduce.md).
    """
    by_id = {r.row.id: r for r in results}
    out = []
    for c in table.comparisons:
        a, b = by_id.get(c.first), by_id.get(c.second)
        pa, pb = (a.row.paper_value(c.column) if a else None), (b.row.paper_value(c.column) if b else None)
        paper_gap = None if pa is None or pb is None else pa - pb
        oa, ob = (a.ours.get(c.column.key) if a else None), (b.ours.get(c.column.key) if b else None)
        our_gap = None if oa is None or ob is None else oa - ob
        sa, sb = (a.std.get(c.column.key) if a else None), (b.std.get(c.column.key) if b else None)
        spread = None if sa is None or sb is None else sa + sb
        agrees = None
        if paper_gap is not None and our_gap is not None and paper_gap != 0 and our_gap != 0:
            agrees = (paper_gap > 0) == (our_gap > 0)
        exceeds = None if spread is None or our_gap is None else abs(our_gap) > spread
        seed_gaps = {}
        if a and b:
            for seed in sorted(set(a.per_seed) & set(b.per_seed)):
                va, vb = a.per_seed[seed].get(c.column.key), b.per_seed[seed].get(c.column.key)
                if va is not None and vb is not None:
                    seed_gaps[seed] = va - vb
        out.append(ComparisonResult(c.label, c.column, paper_gap, our_gap, spread, agrees, exceeds, seed_gaps))
    return out
