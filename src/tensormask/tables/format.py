"""Write a collected table: ``results/<table>.md`` (to read) and ``.csv`` (to load), and a wandb Table.

One row per paper row, in the paper's order: our number beside the paper's for every column,
the row's status (a failed row keeps its reason), its run directory and its wandb run id.
"""

from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path
from typing import Any

from tensormask.tables.collect import RowResult
from tensormask.tables.spec import TableSpec

SCALE_NOTES = {
    "mini": (
        "scale=mini: synthetic shapes and a short CPU training run per row (a small from-scratch "
        "network, a few hundred steps). Our numbers show that each row learns, not the paper's "
        "setting: compare rows only loosely."
    ),
    "paper": "scale=paper: COCO and the paper's schedules (our numbers on val2017).",
}


def csv_columns(table: TableSpec) -> list[str]:
    cols = ["table", "scale", "row", "label", "status"]
    for column in table.columns:
        cols += [f"{column.key} ours", f"{column.key} paper"]
    return cols + ["paper source", "run_dir", "wandb_run_id", "steps", "error"]


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_rows(table: TableSpec, results: list[RowResult], scale: str) -> list[list[Any]]:
    out = []
    for r in results:
        cells: list[Any] = [table.name, scale, r.row.id, r.row.label, r.status]
        for column in table.columns:
            cells += [_number(r.ours.get(column.key), 2), _number(r.row.paper_value(column), 1)]
        cells += [r.row.source, str(r.run_dir), r.wandb_run_id or "", "" if r.steps is None else r.steps, r.error or ""]
        out.append(cells)
    return out


def write_csv(path: str | Path, table: TableSpec, results: list[RowResult], scale: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns(table))
        writer.writerows(csv_rows(table, results, scale))
    return path


def _cell(text: str, limit: int | None = None) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    if limit and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def markdown(table: TableSpec, results: list[RowResult], scale: str, sweep_dir: str | Path | None = None) -> str:
    """The collected table as Markdown: ours beside the paper's, then failures, sources and notes."""
    header = ["row"]
    for column in table.columns:
        header += [f"{column.header} ours", f"{column.header} paper"]
    header += ["status", "run dir", "wandb run"]
    lines = [f"# {table.title}", ""]
    if table.description:
        lines += [f"The paper's setting: {table.description}", ""]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = f" from `{sweep_dir}`" if sweep_dir else ""
    lines += [f"{SCALE_NOTES.get(scale, f'scale={scale}')} Collected {stamp}{where}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (2 * len(table.columns)) + ["---"] * 3) + "|"]
    for r in results:
        cells = [_cell(r.row.label)]
        for column in table.columns:
            cells += [_number(r.ours.get(column.key), 1) or "-", _number(r.row.paper_value(column), 1) or "n/r"]
        status = r.status if r.finished else f"{r.status}: {_cell(r.error or '', 80)}"
        cells += [status, f"`{r.run_dir}`", r.wandb_run_id or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(r.status == s for r in results) for s in ("finished", "failed", "running", "missing")}
    lines += ["", "Rows: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". `n/r`: the paper reports no number."]
    unfinished = [r for r in results if not r.finished]
    if unfinished:
        lines += ["", "## Rows not finished", ""]
        lines += [f"- **{r.row.id}** ({r.status}): {_cell(r.error or 'no reason recorded')}" for r in unfinished]
    lines += ["", "## The paper's numbers", ""]
    lines += [f"- {r.row.label}: {r.row.source}" + (f". {r.row.note}" if r.row.note else "") for r in results]
    if table.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in table.notes]
    if table.path is not None:
        lines += ["", f"Sweep definition: `{table.path.name}`."]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, table: TableSpec, results: list[RowResult], scale: str, sweep_dir=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(table, results, scale, sweep_dir))
    return path


def wandb_table(table: TableSpec, results: list[RowResult], scale: str):
    """The collected table as a ``wandb.Table`` (same columns as the CSV)."""
    import wandb

    rows = csv_rows(table, results, scale)
    numeric = {i for i, name in enumerate(csv_columns(table)) if name.endswith((" ours", " paper")) or name == "steps"}
    data = [[(None if v == "" else float(v)) if i in numeric else v for i, v in enumerate(row)] for row in rows]
    return wandb.Table(columns=csv_columns(table), data=data, allow_mixed_types=True)
