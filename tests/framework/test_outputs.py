"""Where outputs land (docs/framework.md#where-outputs-land): files with the process umask, strict
JSON, short run-folder names with a `latest` link, one eval folder per checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from framework_helpers import TINY_DATA, TINY_MODEL, TINY_RUN
from tensormask.framework.checkpoint_io import atomic_write_bytes, atomic_write_json
from tensormask.framework.resolvers import checkpoint_name

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.bin", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_json_is_strict(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"AP": math.nan, "x": [1.0, math.inf], "n": 2})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {
        "AP": None, "x": [1.0, None], "n": 2}


def test_checkpoint_names_differ_per_checkpoint_and_are_shell_safe(tmp_path):
    run = tmp_path / "runs" / "mask_head-natural_1a2b3c"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "step0000100.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"x")
    last, step = checkpoint_name(run / "checkpoints" / "last.ckpt"), checkpoint_name(run / "checkpoints" / "step0000100.ckpt")
    assert last != step and last.startswith("mask_head-natural_1a2b3c-last_")
    assert checkpoint_name(run) == last  # a run folder stands for its last.ckpt
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in (last, step))


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("TENSORMASK_OUTPUT_DIR", None)  # the default place, ./outputs, is what these tests check
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_run_gets_a_short_name_a_latest_link_and_eval_keeps_one_folder_per_checkpoint(tmp_path):
    # a tiny training run, as a user runs it
    run_args = [o for o in TINY_RUN if "every_n_train_steps" not in o]
    done = _run("tensormask.train", *TINY_MODEL, *TINY_DATA, *run_args, "callbacks.model_checkpoint.every_n_train_steps=1",
                "callbacks.model_checkpoint.save_top_k=-1", cwd=tmp_path)
    latest = tmp_path / "outputs" / "train" / "latest"
    run = latest.resolve()
    assert latest.is_symlink() and run.parent == (tmp_path / "outputs" / "train" / "runs").resolve()
    assert re.fullmatch(r"[A-Za-z0-9._+-]{1,70}", run.name)
    assert "trainer.max_steps=2" in (run / ".hydra" / "overrides.yaml").read_text().replace("- ", "")
    # the report ends with the AP table, after the commands to evaluate and run the checkpoint
    tail = done.stdout.strip().splitlines()
    commands = [line.strip() for line in tail if "ckpt_path=" in line]
    assert any("tensormask.evaluate ckpt_path=" in c for c in commands)
    assert any("tensormask.predict ckpt_path=" in c and "input=" in c for c in commands)
    assert tail[-1].startswith("=") and "segm AP" in tail[-2]
    # the printed eval command runs as pasted (the run folder stands for its last.ckpt)
    eval_args = next(c for c in commands if "tensormask.evaluate" in c).split(" -m tensormask.evaluate ")[1].split()
    _run("tensormask.evaluate", *eval_args, "data.max_val_images=2", cwd=tmp_path)
    _run("tensormask.evaluate", f"ckpt_path={run}/checkpoints/step0000001.ckpt", "data.max_val_images=2", cwd=tmp_path)
    metrics = sorted((tmp_path / "outputs" / "eval").glob("*/*/metrics.json"))
    assert len(metrics) == 2, metrics  # two checkpoints, two folders: neither overwrote the other
    checkpoints = {json.loads(m.read_text())["checkpoint"] for m in metrics}
    assert checkpoints == {str(run / "checkpoints" / "last.ckpt"), str(run / "checkpoints" / "step0000001.ckpt")}
    for path in [*metrics, run / "run_summary.json", run / "checkpoints" / "last.ckpt", run / "checkpoints" / "config.yaml"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path
    assert (tmp_path / "outputs" / "eval" / "latest").resolve() == metrics[-1].parent or \
        (tmp_path / "outputs" / "eval" / "latest").resolve() in {m.parent for m in metrics}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
