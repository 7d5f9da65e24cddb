"""The collector and the formatter on run_summary.json files written here: finished, failed, missing rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tensormask.tables import collect_table, load_table, markdown, write_csv, write_markdown
from tensormask.tables.collect import collect_seeds, compare
from tensormask.tables.collect import SUMMARY_FILE


def write_summary(run_dir: Path, status: str, *, metrics=None, error=None, run_id=None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "status": status,
        "error": error,
        "metrics": metrics or {},
        "wandb": None if run_id is None else {"run_id": run_id, "project": "tensormask", "group": "table5", "tags": [], "mode": "offline"},
        "overrides": ["mode=full"],
        "run_dir": str(run_dir),
        "steps": 7,
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))


METRICS = {
    "segm": {"AP": 0.123, "AP50": 0.456, "AP75": 0.1, "APs": -1.0, "APm": 0.2, "APl": 0.3},
    "bbox": {"AP": 0.2, "AP50": 0.5, "AP75": 0.25, "APs": 0.1, "APm": 0.2, "APl": 0.3},
}


@pytest.fixture
def table5():
    return load_table("table5")


def test_finished_failed_and_missing_rows(tmp_path, table5):
    finished, failed, missing = [row.id for row in table5.rows]
    write_summary(tmp_path / finished, "finished", metrics=METRICS, run_id="abc123")
    write_summary(tmp_path / failed, "failed", error="RuntimeError: loss is NaN at step 3")
    results = collect_table(table5, tmp_path)

    assert [r.row.id for r in results] == [finished, failed, missing]
    assert [r.status for r in results] == ["finished", "failed", "missing"]
    ok = results[0]
    assert ok.ours["segm.AP"] == pytest.approx(12.3)
    assert ok.ours["bbox.AP75"] == pytest.approx(25.0)
    assert ok.wandb_run_id == "abc123" and ok.error is None and ok.steps == 7
    assert results[1].error == "RuntimeError: loss is NaN at step 3" and results[1].ours == {}
    assert SUMMARY_FILE in results[2].error
    # The paper's numbers ride along whatever our status.
    assert [r.row.paper_value(table5.columns[0]) for r in results] == [35.2, 34.9, 34.8]


def test_running_unreadable_and_statusless_summaries_are_not_finished(tmp_path, table5):
    a, b, c = [row.id for row in table5.rows]
    write_summary(tmp_path / a, "running")
    (tmp_path / b).mkdir()
    (tmp_path / b / SUMMARY_FILE).write_text("{not json")
    (tmp_path / c).mkdir()
    (tmp_path / c / SUMMARY_FILE).write_text(json.dumps({"metrics": {}}))
    results = collect_table(table5, tmp_path)
    assert [r.status for r in results] == ["running", "failed", "failed"]
    assert "unreadable" in results[1].error
    assert "valid status" in results[2].error


def test_negative_coco_values_are_not_numbers(tmp_path):
    table = load_table("table2c")
    write_summary(tmp_path / table.rows[0].id, "finished", metrics=METRICS)
    first = collect_table(table, tmp_path)[0]
    assert first.ours["segm.APs"] is None  # COCOeval's -1: no object in that size range
    assert first.ours["segm.APl"] == pytest.approx(30.0)


def test_markdown_and_csv_show_every_row_with_its_reason(tmp_path, table5):
    finished, failed, _ = [row.id for row in table5.rows]
    runs = tmp_path / "runs"
    write_summary(runs / finished, "finished", metrics=METRICS, run_id="abc123")
    write_summary(runs / failed, "failed", error="ValueError: a | pipe\nand a second line")
    results = collect_table(table5, runs)

    md_path = write_markdown(tmp_path / "results" / "table5.md", table5, results, "mini", sweep_dir=runs)
    md = md_path.read_text()
    table_lines = [line for line in md.split("## The paper's comparisons")[0].splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(table5.rows)  # header + one line per paper row
    assert "| APbb ours | APbb paper |" in table_lines[0] and "| AP ours | AP paper |" in table_lines[0]
    row1, row2, row3 = table_lines[1:]
    assert "| 12.3 | 35.2 |" in row1 and "abc123" in row1 and "finished" in row1
    assert "failed: ValueError: a \\| pipe and a second line" in row2 and "| - | 34.9 |" in row2
    assert "missing" in row3 and "| - | 34.8 |" in row3
    assert "1 finished, 1 failed, 1 missing" in md
    assert [l for l in markdown(table5, results, "mini", runs).split("## The paper's comparisons")[0].splitlines()
            if l.startswith("| ")] == table_lines

    csv_path = write_csv(tmp_path / "results" / "table5.csv", table5, results, "mini")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == [row.id for row in table5.rows]
    assert [r["status"] for r in rows] == ["finished", "failed", "missing"]
    assert rows[0]["segm.AP ours"] == "12.30" and rows[0]["segm.AP paper"] == "35.2"
    assert rows[0]["bbox.AP50 ours"] == "50.00" and rows[0]["bbox.AP50 paper"] == "60.8"
    assert rows[0]["wandb_run_id"] == "abc123" and rows[0]["run_dir"] == str(runs / finished)
    assert rows[1]["segm.AP ours"] == "" and rows[1]["error"].startswith("ValueError: a | pipe")
    assert rows[2]["error"]


def test_wandb_table_has_the_csv_columns(tmp_path, table5):
    from tensormask.tables import csv_columns, wandb_table

    write_summary(tmp_path / table5.rows[0].id, "finished", metrics=METRICS)
    results = collect_table(table5, tmp_path)
    table = wandb_table(table5, results, "mini")
    assert table.columns == csv_columns(table5)
    assert len(table.data) == len(table5.rows)
    assert table.data[0][table.columns.index("segm.AP ours")] == pytest.approx(12.3)
    assert table.data[1][table.columns.index("segm.AP ours")] is None


def seeded(tmp_path: Path, row: str, aps: list[float | None]) -> dict[int, Path]:
    """One folder per seed with the given mask AP (fraction); None: the seed failed."""
    folders = {}
    for seed, ap in enumerate(aps):
        folder = tmp_path / f"{row}-seed{seed}"
        if ap is None:
            write_summary(folder, "failed", error="RuntimeError: boom")
        else:
            write_summary(folder, "finished", metrics={"segm": {"AP": ap}, "bbox": {"AP": ap}})
        folders[seed] = folder
    return folders


def test_seeds_aggregate_to_mean_and_sample_std(tmp_path):
    table = load_table("table1")
    natural, aligned = table.rows
    # by hand: 20, 22, 27 -> mean 23, deviations -3, -1, 4 -> sum of squares 26 / 2 = 13 -> std sqrt(13) = 3.6056
    r = collect_seeds(table, natural, seeded(tmp_path, "natural", [0.20, 0.22, 0.27]))
    assert r.status == "finished" and r.seeds == 3 and r.seeds_finished == 3
    assert r.ours["segm.AP"] == pytest.approx(23.0) and r.std["segm.AP"] == pytest.approx(13 ** 0.5)
    assert r.per_seed[2]["segm.AP"] == pytest.approx(27.0)
    # a failed seed: the row is failed (with that seed's reason) but keeps the mean of the seeds that finished
    partial = collect_seeds(table, aligned, seeded(tmp_path, "aligned", [0.30, None, 0.34]))
    assert partial.status == "failed" and partial.error == "seed 1: RuntimeError: boom"
    assert partial.ours["segm.AP"] == pytest.approx(32.0) and partial.seeds_finished == 2
    assert partial.std["segm.AP"] == pytest.approx(2 ** 0.5 * 2)  # 30, 34: deviations +-2 -> sqrt(8 / 1)
    single = collect_seeds(table, natural, seeded(tmp_path / "one", "natural", [0.25]))
    assert single.ours["segm.AP"] == pytest.approx(25.0) and single.std["segm.AP"] is None


@pytest.mark.parametrize(
    "natural,aligned,agrees,exceeds,verdict",
    [
        # paper: aligned 28.9 > natural 28.5. ours 23 +- 3.61 vs 32 +- 2.83: gap 9 > 6.43
        ([0.20, 0.22, 0.27], [0.30, 0.30, 0.36], True, True, "agrees, gap > spread"),
        # gap 1 (23 vs 24), spread 3.61 + 1 = 4.61: the order agrees, the gap is noise
        ([0.20, 0.22, 0.27], [0.23, 0.24, 0.25], True, False, "agrees, within the seed spread"),
        # the other order, larger than the spread: ours disagrees
        ([0.30, 0.30, 0.36], [0.20, 0.22, 0.27], False, True, "disagrees, gap > spread"),
        # one seed each: no spread to judge by
        ([0.20], [0.30], True, None, "agrees, spread unknown (1 seed)"),
        # equal numbers: no order to agree or disagree with
        ([0.20, 0.20, 0.20], [0.20, 0.20, 0.20], None, False, "tie (no order)"),
    ],
)
def test_comparisons_say_whether_our_order_agrees_and_exceeds_the_spread(tmp_path, natural, aligned, agrees, exceeds, verdict):
    table = load_table("table1")
    results = [collect_seeds(table, table.rows[0], seeded(tmp_path, "natural", natural)),
               collect_seeds(table, table.rows[1], seeded(tmp_path, "aligned", aligned))]
    (c,) = compare(table, results)
    assert c.label == "aligned vs natural" and c.column.key == "segm.AP"
    assert c.paper_gap == pytest.approx(0.4)
    assert (c.agrees, c.exceeds, c.verdict) == (agrees, exceeds, verdict)
    if len(natural) == 3:
        mean = lambda v: 100 * sum(v) / len(v)  # noqa: E731
        assert c.our_gap == pytest.approx(mean(aligned) - mean(natural))
        assert c.spread == pytest.approx(results[0].std["segm.AP"] + results[1].std["segm.AP"])
    md = markdown(table, results, "mini")
    assert f"| aligned vs natural | AP | 0.4 |" in md and verdict in md


def test_comparisons_give_the_gap_of_each_seed(tmp_path):
    """The rows of a seed share its images and their order: the gap seed by seed, by hand."""
    table = load_table("table1")
    # a common seed effect (seed 2 high for both rows): unpaired, the gap (4) is within the spread
    # (natural 20, 22, 30: std 5.29; aligned 23, 25, 36: std 7.00); paired it is +3, +3, +6
    natural = collect_seeds(table, table.rows[0], seeded(tmp_path, "natural", [0.20, 0.22, 0.30]))
    aligned = collect_seeds(table, table.rows[1], seeded(tmp_path, "aligned", [0.23, 0.25, 0.36]))
    (c,) = compare(table, [natural, aligned])
    assert c.verdict == "agrees, within the seed spread"
    assert c.seed_gaps == pytest.approx({0: 3.0, 1: 3.0, 2: 6.0})
    assert c.seeds_in_order == 3 and c.per_seed == "+3.0 / +3.0 / +6.0 (3/3 in the paper's order)"
    md = markdown(table, [natural, aligned], "mini")
    assert "| agrees, within the seed spread | +3.0 / +3.0 / +6.0 (3/3 in the paper's order) |" in md
    # a seed that failed in one row is left out; a seed against the paper's order is counted out
    partial = collect_seeds(table, table.rows[1], seeded(tmp_path / "p", "aligned", [0.19, None, 0.36]))
    (c,) = compare(table, [natural, partial])
    assert c.seed_gaps == pytest.approx({0: -1.0, 2: 6.0}) and c.seeds_in_order == 1
    assert c.per_seed == "-1.0 / +6.0 (1/2 in the paper's order)"
    # one seed: nothing per seed
    (c,) = compare(table, [collect_seeds(table, table.rows[0], seeded(tmp_path / "o", "natural", [0.2])),
                           collect_seeds(table, table.rows[1], seeded(tmp_path / "o", "aligned", [0.3]))])
    assert c.per_seed == "-"


def test_wandb_gets_the_comparisons(tmp_path):
    from tensormask.tables.format import comparison_columns, wandb_comparisons

    table = load_table("table1")
    results = [collect_seeds(table, table.rows[0], seeded(tmp_path, "natural", [0.20, 0.22, 0.27])),
               collect_seeds(table, table.rows[1], seeded(tmp_path, "aligned", [0.30, 0.30, 0.36]))]
    logged = wandb_comparisons(table, results)
    assert logged.columns == comparison_columns()
    (row,) = logged.data
    assert row[0] == "aligned vs natural" and row[1] == "segm.AP" and row[2] == pytest.approx(0.4)
    assert row[3] == pytest.approx(9.0) and row[5] is True and row[6] is True and row[7] == "agrees, gap > spread"
    assert row[8] == "+10.0 / +8.0 / +9.0 (3/3 in the paper's order)" and row[9] == 3
