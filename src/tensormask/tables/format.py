"""Write a collected table: ``results/<table>.md`` (to read) and ``.csv`` (to load), and a wandb Table.

One row per paper row, in the paper's order: our number beside the paper's for every column,
the row's status (a failed row keeps its reason), its run directory and its wandb run id. With
several seeds, our number is the mean +- the sample std over the seeds, and a section below the
table checks every order the paper draws between two rows (`tensormask.tables.collect.compare`).
"""

from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path
from typing import Any

from tensormask.tables.collect import ComparisonResult, RowResult, compare
from tensormask.tables.spec import TableSpec

SCALE_NOTES = {
    "mini": (
        "scale=mini: synthetic shapes and a short CPU training run per row (a small from-scratch "
        "network, a few hundred steps). Our numbers show that each row learns, not the paper's "
        "setting: read a gap between two rows against the seed spread below."
    ),
    "paper": "scale=paper: COCO and the paper's schedules (our numbers on val2017).",
}


def csv_columns(table: TableSpec) -> list[str]:
    cols = ["table", "scale", "row", "label", "status"]
    for column in table.columns:
        cols += [f"{column.key} ours", f"{column.key} paper", f"{column.key} ours std"]
    return cols + ["seeds", "seeds finished", "paper source", "run_dir", "wandb_run_id", "steps", "error"]


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_rows(table: TableSpec, results: list[RowResult], scale: str) -> list[list[Any]]:
    out = []
    for r in results:
        cells: list[Any] = [table.name, scale, r.row.id, r.row.label, r.status]
        for column in table.columns:
            cells += [_number(r.ours.get(column.key), 2), _number(r.row.paper_value(column), 1), _number(r.std.get(column.key), 2)]
        done = r.seeds_finished if r.seeds_finished is not None else int(r.finished)
        cells += [r.seeds, done, r.row.source, str(r.run_dir), r.wandb_run_id or "", "" if r.steps is None else r.steps, r.error or ""]
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
            cells += [_ours(r, column.key), _number(r.row.paper_value(column), 1) or "n/r"]
        status = r.status if r.finished else f"{r.status}: {_cell(r.error or '', 80)}"
        if r.seeds > 1:
            status += f" ({r.seeds_finished or 0}/{r.seeds} seeds)"
        cells += [status, f"`{r.run_dir}`", r.wandb_run_id or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(r.status == s for r in results) for s in ("finished", "failed", "running", "missing")}
    lines += ["", "Rows: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". `n/r`: the paper reports no number."]
    seeds = max((r.seeds for r in results), default=1)
    if seeds > 1:
        lines += [f"Ours: mean +- sample standard deviation over {seeds} seeds (seed 0 ... {seeds - 1}, one training each)."]
    comparisons = compare(table, results)
    if comparisons:
        lines += ["", "## The paper's comparisons", "",
                  "Gap: first row minus second row. Spread: the sum of the two rows' seed standard deviations; "
                  "a gap within it is not separated from run-to-run noise. Per seed: the gap of each seed "
                  "(the rows of a seed see the same images in the same order, so a seed's common effect cancels).", "",
                  "| comparison | column | paper gap | our gap | spread | our order | per seed |", "|---|---|---:|---:|---:|---|---|"]
        for c in comparisons:
            lines.append(f"| {c.label} | {c.column.header} | {_number(c.paper_gap, 1) or 'n/r'} | {_number(c.our_gap, 1) or '-'} "
                         f"| {_number(c.spread, 1) or '-'} | {c.verdict} | {c.per_seed} |")
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


def _ours(r: RowResult, key: str) -> str:
    value = _number(r.ours.get(key), 1)
    if not value:
        return "-"
    std = r.std.get(key)
    return f"{value} ± {std:.1f}" if std is not None else value


def comparison_columns() -> list[str]:
    return ["comparison", "column", "paper gap", "our gap", "spread", "agrees", "gap > spread", "verdict", "gap per seed",
            "seeds in the paper's order"]


def comparison_rows(comparisons: list[ComparisonResult]) -> list[list[Any]]:
    return [[c.label, c.column.key, c.paper_gap, c.our_gap, c.spread, c.agrees, c.exceeds, c.verdict, c.per_seed, c.seeds_in_order]
            for c in comparisons]


def write_markdown(path: str | Path, table: TableSpec, results: list[RowResult], scale: str, sweep_dir=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(table, results, scale, sweep_dir))
    return path


def wandb_table(table: TableSpec, results: list[RowResult], scale: str):
    """The collected table as a ``wandb.Table`` (same columns as the CSV)."""
    import wandb

    rows = csv_rows(table, results, scale)
    numeric = {i for i, name in enumerate(csv_columns(table))
               if name.endswith((" ours", " paper", " std")) or name in ("steps", "seeds", "seeds finished")}
    data = [[(None if v == "" else float(v)) if i in numeric else v for i, v in enumerate(row)] for row in rows]
    return wandb.Table(columns=csv_columns(table), data=data, allow_mixed_types=True)


def wandb_comparisons(table: TableSpec, results: list[RowResult]):
    """The paper's comparisons on our rows as a ``wandb.Table`` (the Markdown's comparison section)."""
    import wandb

    return wandb.Table(columns=comparison_columns(), data=comparison_rows(compare(table, results)), allow_mixed_types=True)
