"""The malloc settings applied at ``import tensormask`` (src/tensormask/allocator.py), checked in fresh interpreters."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
    reason="needs glibc >= 2.33 (mallopt, mallinfo2)",
)

# In a fresh process: import tensormask, then compute a fresh 64 MiB result from a 64 MiB input 16 times
# (each freed before the next, as autograd frees a call's outputs); report how much of it glibc mmap'ed and the
# page faults of the last four rounds. (The first rounds grow the heap: PyTorch's 64-byte aligned request does
# not fit the hole of the same size just freed until freed neighbours coalesce; measured: settled after 6-12.)
PROBE = r"""
import ctypes, ctypes.util, json, resource
import torch
import tensormask
from tensormask import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
x = torch.ones(16 << 20)
faults, mmapped = [], []
for _ in range(16):
    before, mmapped_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, libc.mallinfo2().hblkhd
    y = x + 1.0
    mmapped.append(libc.mallinfo2().hblkhd - mmapped_before)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del y
print(json.dumps({"state": allocator.state, "faults": faults[-4:], "mmapped": min(mmapped)}))
"""


def _probe(**env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TENSORMASK_MALLOC", "GLIBC_TUNABLES")}
    full_env.update(env, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full_env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_keeps_large_tensors_on_the_reused_heap():
    result = _probe()
    assert result["state"].startswith("glibc malloc: "), result
    assert result["mmapped"] < 64 << 20, result  # the 64 MiB result came from the heap, not from mmap
    # 64 MiB is 16384 pages of 4 KiB; reused heap memory needs none of them faulted in again
    assert max(result["faults"]) < 1000, result


def test_opt_out_keeps_glibc_defaults():
    result = _probe(TENSORMASK_MALLOC="0")
    assert result["state"] == "glibc malloc defaults (TENSORMASK_MALLOC=0)", result
    assert result["mmapped"] >= 64 << 20, result  # glibc mmaps the block afresh every time
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp_always = "[always]" in f.read()
    if not thp_always:  # (with huge pages everywhere, 64 MiB is only 32 faults)
        assert min(result["faults"]) > 10000, result
