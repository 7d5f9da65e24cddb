"""The benchmark scripts in bench/ run end to end on tiny inputs and print complete tables."""

import ctypes.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script, *args, timeout=600):
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _table_rows(out, first_cell="("):
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| " + first_cell)]


def test_bench_ops_prints_a_row_per_shape_with_both_ratios():
    out = _run("bench_ops.py", "--shapes", "1,3,8,8,2", "1,3,9,7,1", "--rounds", "2", "--repeats", "2",
               "--threads", "1", "--clock", "cpu", "--skip-default-process")
    rows = _table_rows(out)
    assert [row[:3] for row in rows] == [["(1, 9, 8, 8)", "2", "(1, 36, 4, 4)"], ["(1, 9, 9, 7)", "1", "(1, 9, 9, 7)"]]
    for row in rows:
        assert len(row) == 12
        times = [float(cell) for cell in row[3:10]]  # ext fwd, bwd, fwd+bwd, copy, ref fwd, bwd, fwd+bwd
        assert all(t >= 0 for t in times) and times[2] > 0  # (the tiny copy floor may print 0.00)
        copy_ratio, ref_ratio = re.fullmatch(r"([\d.]+)x", row[10]), re.fullmatch(r"(\d+)x", row[11])
        assert copy_ratio and ref_ratio and float(copy_ratio.group(1)) > 0
    if ctypes.util.find_library("c"):
        assert "glibc malloc: mmap threshold 1 GiB, no heap trimming" in out.splitlines()[0]
    assert "plain process" not in out


def test_bench_ops_keeps_the_allocator_defaults_when_asked_and_compares_both_in_plain_processes():
    out = _run("bench_ops.py", "--shapes", "1,3,8,8,2", "--rounds", "1", "--repeats", "1", "--skip-reference",
               "--malloc-defaults", "--threads", "1", "--default-process-shape", "1,4,12,10,2")
    assert "glibc malloc defaults (TENSORMASK_MALLOC=0)" in out.splitlines()[0]
    (first,) = _table_rows(out)
    plain = _table_rows(out, "glibc")
    assert first[7:10] == ["-", "-", "-"] and first[11] == "-"
    # the second table: one row per allocator setting, each measured in a fresh plain process
    assert [row[0] for row in plain] == ["glibc malloc: mmap threshold 1 GiB, no heap trimming",
                                         "glibc malloc defaults (TENSORMASK_MALLOC=0)"]
    for row in plain:
        assert row[1:5] == ["(1, 16, 12, 10)", "2", "(1, 64, 6, 5)", "2"]
        both, copy, faults = float(row[5]), float(row[6]), float(row[8])
        assert both > 0 and copy >= 0 and faults >= 0 and re.fullmatch(r"[\d.]+x", row[7])


@pytest.mark.slow
def test_bench_model_prints_timings_and_memory():
    out = _run("bench_model.py", "--size", "96", "--repeats", "1", "--threads", "1")
    for label in ("infer default (s)", "infer 100 dets (s)", "train (s)"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        tm, mrcnn, ratio = (float(v) for v in line[len(label):].split())
        assert tm > 0 and mrcnn > 0 and ratio == pytest.approx(tm / mrcnn, rel=0.02, abs=0.01)
    assert re.search(r"infer\s+TensorMask\s+\d+ ->\s+\d+\s+Mask R-CNN\s+\d+ ->\s+\d+\s+peak ratio [\d.]+", out)


@pytest.mark.slow
def test_bench_export_times_eager_and_the_program():
    out = _run("bench_export.py", "--sizes", "160", "--no-aoti", "--repeats", "1", "--threads", "1")
    assert "load (s): program" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| 160x160 |")]
    eager, program, ratio, dets = (cell.strip() for cell in row.strip().strip("|").split("|")[1:])
    assert float(eager) > 0 and float(program) > 0 and int(dets) >= 0
    assert float(ratio) == pytest.approx(float(program) / float(eager), rel=0.02, abs=0.01)


@pytest.mark.slow
def test_bench_step_breakdown_prints_every_part():
    out = _run("bench_step_breakdown.py", "--size", "96", "--repeats", "1")
    for which in ("tensormask", "maskrcnn"):
        line = next(line for line in out.splitlines() if line.startswith(f"== {which}, 96x96"))
        step, both, fwd = (float(v) for v in re.findall(r"([\d.]+) (?:s CPU|GFLOP)", line))
        assert step > 0 and both > fwd > 0
    for part in ("class tower + predictor", "mask head", "RPN", "RoI heads", "losses (assignment"):
        assert re.search(re.escape(part) + r".*\d", out), part


@pytest.mark.slow
def test_bench_smoke_times_the_readme_smoke_run():
    out = _run("bench_smoke.py", "--repeats", "1")
    assert re.search(r"^run 1: [\d.]+ s  \(load average before: [\d.]+\)$", out, re.M), out
    assert re.search(r"smoke run median: [\d.]+ s over 1 run\(s\)", out), out


def test_bench_main_step_times_each_variant(tmp_path):
    """Two variants of the main job (on a tiny synthetic set): a row each, ratios to the first."""
    tiny = "data.synthetic.num_train=8 data.synthetic.num_val=2"
    done = subprocess.run([sys.executable, str(BENCH / "bench_main_step.py"), "--rounds", "2", "--steps", "1",
                           "--warmup", "1", tiny, tiny + " data.max_size=64 data.min_size=64"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TENSORMASK_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(None, 5)[5]: line.split(None, 5)[:5] for line in done.stdout.splitlines()[2:]}
    assert list(rows) == [tiny, tiny + " data.max_size=64 data.min_size=64"]
    first, small = ([float(v) for v in row] for row in rows.values())
    assert first[1] == 1.0 and first[3] == 1.0 and first[0] > 0 and first[2] > 0
    # a quarter of the pixels: less CPU time per step than the 128 px images
    assert small[0] < first[0] and small[1] == pytest.approx(small[0] / first[0], abs=2e-3)
