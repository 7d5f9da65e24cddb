"""A plain (non-editable) `pip install .` ships conf/ and sweeps/ inside the package: the entry
points compose their configs from any folder, outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (the build writes build/ and *.egg-info beside its
    sources), without the compiled extension (TENSORMASK_NO_EXTENSION=1: the configs are what is tested)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "build")
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, source / name)
    for name in ("src", "conf", "sweeps"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    env = {**os.environ, "TENSORMASK_NO_EXTENSION": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(work / "dist"), str(source)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = (work / "dist").glob("tensormask-*.whl")
    return built


def test_the_wheel_holds_every_config_and_sweep(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("conf", "sweeps"):
        expected = {f"tensormask/{folder}/{p.relative_to(REPO / folder).as_posix()}"
                    for p in (REPO / folder).rglob("*.yaml")}
        assert expected and expected <= names, sorted(expected - names)[:5]


def test_the_installed_entry_points_compose_from_another_folder(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORMASK_")}
    env["PYTHONPATH"] = str(target)
    script = ("import tensormask, tensormask.resources as r, tensormask.tables as t; "
              "print(tensormask.__file__); print(r.config_dir()); print(r.sweeps_dir()); print(len(t.list_tables()))")
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, conf, sweeps, tables = done.stdout.split()
    for path in (module, conf, sweeps):
        assert Path(path).resolve().is_relative_to(target.resolve()), path  # the installed copy, not the checkout
    assert int(tables) >= 4
    done = subprocess.run([sys.executable, "-m", "tensormask.train", "--cfg", "job", "trainer.max_steps=3"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max_steps: 3" in done.stdout and "_target_: tensormask.modeling.TensorMask" in done.stdout
