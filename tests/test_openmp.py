"""The OpenMP waiting policy the entry points set before torch loads (src/tensormask/openmp.py), in fresh interpreters."""

import json
import os
import subprocess
import sys

import pytest

# Import an entry module; at the moment it first imports torch, record the OpenMP variables and stop there.
PROBE = r"""
import importlib, json, os, sys

class AtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(json.dumps({k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}))
            raise SystemExit(0)
        return None

sys.meta_path.insert(0, AtTorch())
importlib.import_module(sys.argv[1])
raise SystemExit("torch was never imported")
"""


def _at_torch_import(module: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE, module], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["tensormask.train", "tensormask.evaluate", "tensormask.predict"])
def test_entry_points_bound_the_spin_before_torch_loads(module):
    assert _at_torch_import(module) == {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": None}


def test_the_users_setting_wins():
    assert _at_torch_import("tensormask.train", GOMP_SPINCOUNT="5") == {"GOMP_SPINCOUNT": "5", "OMP_WAIT_POLICY": None}
    assert _at_torch_import("tensormask.train", OMP_WAIT_POLICY="PASSIVE") == {
        "GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"}


def test_the_library_leaves_openmp_alone():
    """`import tensormask` (library use) changes nothing: only the entry points choose for the process."""
    assert _at_torch_import("tensormask.ops") == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None}
