"""The notebooks are stored without outputs and executed here (kernel python3 of this venv), so they can't rot.

Notebooks 1 and 2 need only the ops and the assignment rule. Notebooks 3 and 4 read runs and
collected tables: a session fixture reproduces Table 1 at mini scale, shrunk to a few steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))

# Table 1 at mini scale, each row trained for 2 steps on 2 images and evaluated on 4.
TINY_TRAINING = [
    "trainer.max_steps=2",
    "module.warmup_steps=1",
    "module.milestones=[1]",
    "data.global_batch_size=2",
    "data.max_val_images=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def execute(name: str, timeout: int = 240) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))


def images_in(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))


@pytest.fixture(autouse=True)
def _notebook_env(monkeypatch):
    # The kernel inherits the environment: headless plots, offline wandb, the package importable.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("WANDB_MODE", "offline")
    src = str(Path(__file__).resolve().parents[2] / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))


def test_notebooks_are_stored_without_outputs():
    assert ALL == ["01_align2nat_explained.ipynb", "02_assignment_and_targets.ipynb", "03_results.ipynb",
                   "04_paper_tables.ipynb"]
    for name in ALL:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} is stored with outputs"


def test_01_align2nat_explained():
    nb = execute("01_align2nat_explained.ipynb")
    text = outputs_text(nb)
    assert "max |align2nat(aligned) - natural| = 0.0" in text
    assert "k=2: aligned" in text
    assert images_in(nb) >= 4


def test_02_assignment_and_targets():
    nb = execute("02_assignment_and_targets.ipynb")
    text = outputs_text(nb)
    assert "positives:" in text and "(a) contain" in text
    assert images_in(nb) >= 2


@pytest.fixture(scope="session")
def mini_table1(tmp_path_factory):
    """Table 1 reproduced at mini scale (tiny), its runs and its collected table."""
    from tensormask import reproduce as rp

    root = tmp_path_factory.mktemp("notebook_runs")
    quoted = ",".join(f"'{o}'" for o in TINY_TRAINING)
    cfg = rp.compose(["table=table1", "scale=mini", f"runs_dir={root / 'reproduce'}", f"results_dir={root / 'results'}",
                      "wandb.mode=offline", f"train_overrides=[{quoted}]"])
    results = rp.reproduce(cfg)
    assert [r.status for r in results] == ["finished", "finished"], [r.error for r in results]
    return root


@pytest.mark.slow
def test_03_results(mini_table1, monkeypatch):
    monkeypatch.setenv("TENSORMASK_OUTPUT_DIR", str(mini_table1))
    monkeypatch.setenv("TENSORMASK_NUM_IMAGES", "2")
    # Two training steps score every window below the paper's 0.05: look at them anyway.
    monkeypatch.setenv("TENSORMASK_SCORE_THRESHOLD", "0.001")
    nb = execute("03_results.ipynb")
    text = outputs_text(nb)
    assert "natural: finished after 2 steps; SimpleNaturalMaskHead" in text
    assert "aligned: finished after 2 steps; SimpleAlignedMaskHead" in text
    assert images_in(nb) >= 4  # predictions, PR curves, score -> precision maps, side by side


@pytest.mark.slow
def test_04_paper_tables(mini_table1, monkeypatch):
    monkeypatch.setenv("TENSORMASK_RESULTS", str(mini_table1 / "results"))
    nb = execute("04_paper_tables.ipynb")
    text = outputs_text(nb)
    assert "1 collected table(s)" in text and "table1 (scale mini): 2 finished" in text
    assert images_in(nb) >= 2


def test_04_paper_tables_without_results(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORMASK_RESULTS", str(tmp_path))
    nb = execute("04_paper_tables.ipynb")
    assert "0 collected table(s)" in outputs_text(nb)
