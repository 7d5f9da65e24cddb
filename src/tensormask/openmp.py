"""How long idle OpenMP threads spin before they sleep (set by the entry points before torch loads OpenMP).

PyTorch's CPU kernels run their parallel regions on GNU OpenMP (libgomp) threads. Between regions an idle
thread spins for GOMP_SPINCOUNT iterations, then sleeps on a futex. libgomp's default, 300,000 spins, is
slow on a CPU shared with other work: a thread spins through the time slice of the thread it waits for.
Sleeping at once (OMP_WAIT_POLICY=PASSIVE, the entry points' setting until 2026-11-30) pays a wake-up at
each of the thousands of parallel regions of a training step instead. A short spin keeps both costs small.
Measured on the quickstart's training step, 2 threads on the 2-core machine (docs/framework.md "CPU
threads"): idle, 150 ms with a spin of 2,000-300,000 against 195 ms passive; beside two busy processes,
346 ms with 10,000 against 437 ms passive and 553 ms with the default.

``configure()`` sets GOMP_SPINCOUNT=10000 unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set already (the
user's choice wins). It acts only before torch is imported; the entry points call it first thing.
"""

from __future__ import annotations

import os

SPINCOUNT = "10000"


def configure() -> None:
    """Bound idle OpenMP threads' spinning, unless the environment already says how they wait."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
