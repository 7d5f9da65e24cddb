"""The paper's tables: their numbers as data (`spec`), collecting our runs (`collect`), writing them (`format`).

    from tensormask.tables import load_table, collect_table, write_markdown, write_csv
    spec = load_table("table4")                       # sweeps/table4.yaml: rows, overrides, paper numbers
    rows = collect_table(spec, "outputs/reproduce/mini/table4")
    write_markdown("results/table4.md", spec, rows, scale="mini")
"""

from tensormask.tables.collect import RowResult, collect_row, collect_table, read_summary
from tensormask.tables.format import csv_columns, markdown, wandb_table, write_csv, write_markdown
from tensormask.tables.spec import (
    SCALES,
    TABLES,
    Column,
    RowSpec,
    TableSpec,
    default_sweeps_dir,
    list_tables,
    load_table,
)

__all__ = [
    "SCALES",
    "TABLES",
    "Column",
    "RowResult",
    "RowSpec",
    "TableSpec",
    "collect_row",
    "collect_table",
    "csv_columns",
    "default_sweeps_dir",
    "list_tables",
    "load_table",
    "markdown",
    "read_summary",
    "wandb_table",
    "write_csv",
    "write_markdown",
]
