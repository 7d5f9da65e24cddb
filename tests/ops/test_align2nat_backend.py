"""Backend selection by TENSORMASK_OPS_BACKEND, checked in fresh interpreters."""

import os
import subprocess
import sys

from tensormask.ops import backend

CHECK = """
import sys, warnings
{prelude}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, tensormask.ops as ops
    y = ops.swap_align2nat(torch.zeros(1, 9, 4, 4), 2)
    y = ops.swap_align2nat(torch.zeros(1, 9, 4, 4), 2)
print("SUMMARY", ops.backend_summary())
print("LOADED", "tensormask._C" in sys.modules and sys.modules["tensormask._C"] is not None)
print("WARNINGS", sum("tensormask" in str(w.message) for w in caught))
"""


def _run(choice, prelude=""):
    env = dict(os.environ, TENSORMASK_OPS_BACKEND=choice)
    return subprocess.run([sys.executable, "-c", CHECK.format(prelude=prelude)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_reference_never_loads_the_extension():
    result = _run("reference")
    assert result.returncode == 0, result.stderr
    assert "SUMMARY tensormask.ops backend: reference" in result.stdout
    assert "LOADED False" in result.stdout
    assert "WARNINGS 0" in result.stdout


# Make `from tensormask import _C` fail as if the extension had never been built.
MISSING = "sys.modules['tensormask._C'] = None"


def test_auto_without_extension_warns_once():
    result = _run("auto", MISSING)
    assert result.returncode == 0, result.stderr
    assert "SUMMARY tensormask.ops backend: reference" in result.stdout
    assert "WARNINGS 1" in result.stdout


def test_extension_required_but_missing_is_an_error():
    result = _run("extension", MISSING)
    assert result.returncode != 0
    assert "TENSORMASK_OPS_BACKEND=extension but the compiled extension tensormask._C is not importable" in result.stderr


def test_unknown_choice_is_an_error():
    result = _run("fast")
    assert result.returncode != 0
    assert "TENSORMASK_OPS_BACKEND='fast': expected one of ('auto', 'extension', 'reference')" in result.stderr


def test_summary_of_this_process():
    summary = backend.backend_summary()
    if backend.EXTENSION is None:
        assert "reference" in summary
    else:
        assert "extension tensormask._C (CPU kernels yes" in summary
