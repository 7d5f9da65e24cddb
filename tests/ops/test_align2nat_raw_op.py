"""The registered ops `torch.ops.tensormask.*`, called directly, check their arguments like the Python
wrappers do: a wrong out_size / in_size, units that are too far apart or a float8 tensor give a named
error, never a crash. Every call runs in a child process, so a crash (SIGFPE, SIGSEGV, abort) fails
the test instead of killing pytest."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from align2nat_helpers import require_extension
from tensormask.ops import align2nat
from tensormask.ops.geometry import MAX_EXTENT, make_geometry

# The child: runs each call, prints one JSON line per call: ["ok", shape] or [error type, message].
CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import tensormask.ops
    F, B = torch.ops.tensormask.align2nat, torch.ops.tensormask.align2nat_backward
    for call in json.loads(sys.stdin.read()):
        kind, shape, dtype, cells_in, cells_out, size, units, mode = call
        t = torch.randn(shape).to(getattr(torch, dtype))
        try:
            if kind == "forward":
                out = F(t, cells_in, cells_out, size, *units, -6.0, mode)
            else:
                out = B(t, cells_in, cells_out, size, *units, mode)
            result = ["ok", list(out.shape)]
        except Exception as error:
            result = [type(error).__name__, str(error).splitlines()[0]]
        print(json.dumps(result), flush=True)
    """
)


def run_calls(calls):
    """The results of the calls, run in a child process; fails the test if the child dies."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], input=json.dumps(calls), capture_output=True, text=True, env=env, timeout=300
    )
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        crashed = calls[len(lines)] if len(lines) < len(calls) else None
        pytest.fail(f"the child process died (return code {proc.returncode}) at call {crashed}: {proc.stderr[-2000:]}")
    return [json.loads(line) for line in lines]


SWAP2 = [2.0, 1.0, 1.0, 2.0]  # swap_align2nat with lambda 2 as units (unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu)


def test_inconsistent_sizes_are_named_errors():
    require_extension()
    calls, fits = [], []

    def add(call, ok=False):
        calls.append(call)
        fits.append(ok)

    for dtype in ("float32", "float64"):
        for mode in ("bilinear", "nearest"):
            # x (1, 4, 5, 6) with lambda 2 gives (3, 3); anything else is inconsistent.
            for size in ([3, 3], [100, 100], [1, 1], [0, 3], [3, 7], [2**40, 1]):
                add(["forward", [1, 4, 5, 6], dtype, [2, 2], [4, 4], size, SWAP2, mode], ok=size == [3, 3])
            # grad_out (1, 16, 3, 3) fits inputs of 5 or 6 rows / columns.
            for size in ([5, 6], [6, 5], [100, 100], [1, 1], [0, 0], [7, 6], [2**40, 6]):
                add(["backward", [1, 16, 3, 3], dtype, [2, 2], [4, 4], size, SWAP2, mode], ok=size in ([5, 6], [6, 5]))
            add(["backward", [1, 16, 0, 3], dtype, [2, 2], [4, 4], [5, 6], SWAP2, mode])
            add(["forward", [1, 4, 0, 6], dtype, [2, 2], [4, 4], [1, 3], SWAP2, mode])
            add(["forward", [1, 4, 0, 6], dtype, [2, 2], [4, 4], [0, 3], SWAP2, mode], ok=True)
            add(["backward", [1, 16, 0, 3], dtype, [2, 2], [4, 4], [0, 6], SWAP2, mode], ok=True)
            # lambda 1 (the shift path) and a general geometry
            add(["forward", [1, 9, 4, 4], dtype, [3, 3], [3, 3], [9, 9], [1.0] * 4, mode])
            add(["backward", [1, 9, 4, 4], dtype, [3, 3], [3, 3], [2, 2], [1.0] * 4, mode])
            add(["forward", [1, 6, 9, 8], dtype, [2, 3], [5, 7], [2, 2], [1.5, 0.75, 1.0, 2.0], mode])
            add(["forward", [1, 6, 9, 8], dtype, [2, 3], [5, 7], [6, 6], [1.5, 0.75, 1.0, 2.0], mode], ok=True)
    results = run_calls(calls)
    assert len(results) == len(calls)
    for call, ok, (kind, message) in zip(calls, fits, results):
        if ok:
            assert kind == "ok", (call, message)
        else:
            assert kind == "ValueError", (call, kind, message)
            assert ("out_size must be ceil((Hin, Win) * aligned_unit_hw / unit_hw)" in message
                    or "does not fit in_size" in message), message
    assert results[1][1] == (
        "align2nat: out_size must be ceil((Hin, Win) * aligned_unit_hw / unit_hw) = (3, 3) for x of shape "
        "[1, 4, 5, 6], got [100, 100]"
    )
    assert results[8][1].startswith(
        "align2nat_backward: grad_out of spatial size (3, 3) does not fit in_size [100, 100]: the forward of an "
        "input of that size gives (50, 50)"
    )


UNITS_TOO_FAR_APART = [
    [1e-300, 1.0, 1.0, 1.0],  # output of 1e300 x 1e300 cells
    [1.0, 1.0, 1e-300, 1.0],  # r_hw = 1e300: positions past int64
    [1e300, 1.0, 1e-300, 1.0],  # r_hw overflows to inf
    [1.0, 1e-300, 1e300, 1.0],  # r_off underflows to 0
    [1.0, 1e300, 1e-300, 1.0],  # r_off = inf
    [1.0, 1.0, 1.0, 1e-300],  # q_vu underflows
    [1.0, 2.0**61, 1.0, 2.0**61],  # positions 2^61 cells away
    [2.0**40 / 1e-9, 1.0, 1.0, 1.0],  # an integer stride of 1e21 (was SIGFPE in the separable path)
]


def test_units_too_far_apart_are_named_errors():
    require_extension()
    calls = []
    for units in UNITS_TOO_FAR_APART:
        for dtype in ("float32", "float64"):
            for mode in ("bilinear", "nearest"):
                for size in ([1, 1], [0, 0], [3, 3]):
                    calls.append(["forward", [1, 4, 3, 3], dtype, [2, 2], [4, 4], size, units, mode])
                    calls.append(["backward", [1, 16] + size, dtype, [2, 2], [4, 4], [3, 3], units, mode])
    results = run_calls(calls)
    assert len(results) == len(calls)
    for call, (kind, message) in zip(calls, results):
        assert kind == "ValueError", (call, kind, message)
        assert "unit" in message, message
    for units in UNITS_TOO_FAR_APART:
        # The Python wrapper refuses them too, before any tensor is made.
        with pytest.raises(ValueError, match="units are too far apart|must be positive finite numbers"):
            make_geometry((2, 2), (4, 4), *units).output_size((3, 3))


def test_tiny_units_through_the_wrapper():
    """Used to be `Expected a value of type 'List[int]' for argument 'out_size'`."""
    with pytest.raises(ValueError, match=r"gives an output of size 3e\+300 .*unit_hw=1e-300.*too far apart"):
        align2nat(torch.zeros(1, 4, 3, 3), in_cells=2, out_cells=2, unit_hw=1e-300, unit_vu=1.0,
                  aligned_unit_hw=1.0, aligned_unit_vu=1.0)
    assert MAX_EXTENT == 2.0**40


def test_a_fuzz_of_odd_arguments_never_crashes():
    require_extension()
    values = [1e-300, 1e-9, 0.5, 1.0, 3.0, 2.0**40, 2.0**61, 1e300]
    calls, k = [], 0
    for unit_hw in values:
        for aligned_unit_hw in values:
            k += 1
            units = [unit_hw, values[k % 8], aligned_unit_hw, values[(3 * k) % 8]]
            dtype = "float32" if k % 2 else "float64"
            size = [[0, 0], [1, 1], [2, 2], [40, 40]][k % 4]
            calls.append(["forward", [1, 4, 3, 3], dtype, [2, 2], [4, 4], size, units, "bilinear"])
            calls.append(["backward", [1, 16] + size, dtype, [2, 2], [4, 4], [3, 3], units, "nearest"])
    for call, (kind, message) in zip(calls, run_calls(calls)):
        assert kind in ("ok", "ValueError"), (call, kind, message)


def test_float8_is_refused_by_name():
    require_extension()
    types = [name for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, name)]
    calls = [["forward", [1, 4, 5, 6], name, [2, 2], [4, 4], [3, 3], SWAP2, "bilinear"] for name in types]
    calls += [["backward", [1, 16, 3, 3], name, [2, 2], [4, 4], [5, 6], SWAP2, "bilinear"] for name in types]
    for call, (kind, message) in zip(calls, run_calls(calls)):
        assert kind == "TypeError", (call, kind, message)
        assert "must be float32, float64, float16 or bfloat16 (float8 types have no align2nat kernel)" in message
