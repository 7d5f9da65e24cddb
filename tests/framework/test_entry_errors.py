"""Each entry point, run as a user runs it, ends a user's mistake with a short message naming the
culprit and the fix, exit status 2 and no traceback (HYDRA_FULL_ERROR=1 brings the traceback back)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src"


def run_entry(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "TENSORMASK_OUTPUT_DIR": str(cwd / "outputs"), "WANDB_MODE": "disabled", **(env or {})}
    environ.pop("HYDRA_FULL_ERROR", None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=timeout)


# (entry point, arguments, what the message must name); each runs as a subprocess, as a user runs it
CASES = [
    ("tensormask.train", ["trainer.max_steps=abc"], ["trainer.max_steps='abc'", "must be an integer"]),
    ("tensormask.evaluate", ["ckpt_path=nope.ckpt"], ["ckpt_path=nope.ckpt", "no such checkpoint"]),
    ("tensormask.predict", ["ckpt_path=nope.ckpt", "input=x.png"], ["ckpt_path=nope.ckpt"]),
]
if not torch.cuda.is_available():
    CASES.append(("tensormask.train", ["trainer=gpu"], ["trainer.accelerator=gpu", "no usable CUDA GPU", "trainer=cpu"]))

# the same, in this process (faster): the other mistakes of docs/framework.md#errors
IN_PROCESS = [
    ("tensormask.train", ["ckpt_path=no/such/run"], ["ckpt_path=no/such/run", "no such checkpoint"]),
    ("tensormask.train", ["model.mask_hed=3"], ["unknown config key 'model.mask_hed'", "did you mean 'model.mask_head'"]),
    ("tensormask.train", ["+model.mask_hed=3"], ["model.mask_hed", "takes no argument 'mask_hed'", "mask_head"]),
    ("tensormask.train", ["trainer=gpux"], ["trainer=gpux", "did you mean trainer=gpu", "cpu, ddp"]),
    ("tensormask.train", ["traine=gpu"], ["unknown config key 'traine'", "'trainer'"]),
    ("tensormask.train", ["model.backbone.depth=42"], ["model.backbone", "18, 34, 50, 101"]),
    ("tensormask.train", ["trainer.precision=17"], ["trainer.precision=17", "bf16-mixed", "16-mixed"]),
    ("tensormask.evaluate", [], ["ckpt_path is required", "ckpt_path=..."]),
    ("tensormask.export", ["ckpt_path=nope.ckpt"], ["ckpt_path=nope.ckpt", "no such checkpoint"]),
]


def _ids(cases):
    return [" ".join([c[0].split(".")[1], *c[1]]) for c in cases]


def _check_message(stderr: str, module: str, named: list[str]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and 1 <= len(lines) <= 3, stderr
    assert lines[0].startswith(f"tensormask-{module.split('.')[1].replace('evaluate', 'eval')}: error: ")
    for text in named:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("module, args, named", CASES, ids=_ids(CASES))
def test_a_mistake_ends_in_a_short_message(tmp_path, module, args, named):
    done = run_entry(module, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    _check_message(done.stderr, module, named)
    assert not (tmp_path / "outputs" / "train" / "latest").exists()  # it failed before starting a run


@pytest.mark.parametrize("module, args, named", IN_PROCESS, ids=_ids(IN_PROCESS))
def test_a_mistake_ends_in_a_short_message_in_process(tmp_path, monkeypatch, capsys, module, args, named):
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    entry = importlib.import_module(module)
    monkeypatch.setenv("TENSORMASK_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", [module, *args])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as info:
        entry.main()
    GlobalHydra.instance().clear()
    assert info.value.code == 2
    assert "HYDRA_FULL_ERROR" not in os.environ  # set only while Hydra runs
    _check_message(capsys.readouterr().err, module, named)


def test_hydra_full_error_shows_the_traceback(tmp_path):
    done = run_entry("tensormask.train", "trainer.max_steps=abc", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_reproduce_names_an_unknown_key(tmp_path):
    done = run_entry("tensormask.reproduce", "table=table4", "scal=mini", cwd=tmp_path)
    assert done.returncode == 2 and "did you mean 'scale'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("module, own, foreign", [
    ("tensormask.train", ["schedule", "hydra/launcher", "experiment", "debug"], []),
    ("tensormask.predict", ["trainer"], ["schedule", "module", "callbacks", "data"]),
])
def test_help_lists_the_entry_points_own_groups_and_examples(tmp_path, module, own, foreign):
    done = run_entry(module, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    groups = done.stdout.split("config groups", 1)[1].split("\n\n", 1)[0]
    names = {line.split()[0] for line in groups.splitlines()[1:] if line.strip()}
    assert set(own) <= names and not set(foreign) & names, groups
    prog = f"tensormask-{module.split('.')[1]}"
    examples = [line for line in done.stdout.splitlines() if line.strip().startswith(prog + " ")]
    assert 3 <= len(examples) <= 5, done.stdout


def test_reproduce_help_shows_examples(capsys):
    from tensormask.reproduce import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert 3 <= sum(line.strip().startswith("tensormask-reproduce table=") for line in out.splitlines()) <= 5


def test_a_users_mistake_raised_in_a_loader_worker_is_one_line():
    # a DataLoader worker's error comes back as its type with the worker's whole traceback as the
    # message ("Caught CocoFormatError in DataLoader worker process 1. Original Traceback ..."):
    # the short message is the original one, naming the file
    from torch._utils import ExceptionWrapper

    from tensormask.data.coco import CocoFormatError
    from tensormask.framework.entry import user_error_message

    try:
        try:
            raise CocoFormatError("cannot decode image /d/train/a.png (image id 7 in /d/train.json): truncated")
        except CocoFormatError:
            ExceptionWrapper(where="in DataLoader worker process 1").reraise()
    except CocoFormatError as err:
        assert "Traceback" in str(err)
        assert user_error_message(err) == "cannot decode image /d/train/a.png (image id 7 in /d/train.json): truncated"


def test_help_lists_every_top_level_key_lists_too():
    """--help names each settable top-level key, list-valued ones included (export's example_size)."""
    from tensormask.framework.entry import help_text

    keys = help_text("tensormask-export", "export", None).split("top-level keys: ", 1)[1].split("\n", 1)[0]
    assert {"ckpt_path", "example_size", "max_size", "aoti", "device"} <= set(keys.split(", ")), keys
    keys = help_text("tensormask-train", "train", None).split("top-level keys: ", 1)[1].split("\n", 1)[0]
    assert "tags" in keys.split(", ") and "data" not in keys.split(", "), keys


@pytest.mark.parametrize("value", ["outputs/train/runs/a+b_1c9e2f", "/home/josé/données/val", "/data/my set/val",
                                   "/d/it's/x", "/d/a,b=[c]/x"])
def test_a_printed_override_parses_back_to_the_path_as_pasted_into_a_shell(value):
    # the commands tensormask-train prints at the end ("next: ... ckpt_path=<run> input=<images>")
    # must run as pasted, also for paths Hydra's grammar does not take bare (non-ASCII, spaces, quotes)
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tensormask.framework.entry import override_arg

    (arg,) = shlex.split(override_arg("input", value))
    override = OverridesParser.create().parse_override(arg)
    assert override.key_or_group == "input" and override.value() == value
    if value.isascii() and value.replace("/", "").replace("+", "").replace("_", "").isalnum():
        assert override_arg("input", value) == f"input={value}"  # plain paths stay as they are


def test_an_unparsable_override_says_how_to_quote_it(tmp_path, monkeypatch, capsys):
    import tensormask.train as entry
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("TENSORMASK_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["tensormask-train", "data=coco", "data.root=/home/josé/data"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit):
        entry.main()
    GlobalHydra.instance().clear()
    err = capsys.readouterr().err
    assert "data.root=/home/josé/data" in err and """data.root="'/home/josé/data'\"""" in err
