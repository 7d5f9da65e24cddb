"""Collect a table's runs: read each row's ``<run_dir>/run_summary.json`` into a `RowResult`.

The training entry point writes ``run_summary.json`` in every run directory::

    {"status": "running" | "finished" | "failed", "error": str | None,
     "metrics": {"bbox": {"AP": 0.41, ...}, "segm": {...}},      # fractions in [0, 1]
     "wandb": {"run_id": ..., "project": ..., ...} | None,
     "overrides": [...], "run_dir": str, "steps": int}

A row whose folder has no summary is ``missing`` (never launched, or lost); a summary that still
says ``running`` is ``running`` (in flight, or killed before it could say otherwise). Only
``finished`` rows carry our numbers, converted to percent like the paper's.
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
