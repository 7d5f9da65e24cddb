"""Time the README's smoke run: `tensormask-train debug=fast_dev_run` (one training step and one
evaluation batch of the main job), as a user runs it, in a fresh folder with a fresh dataset cache.

    python bench/bench_smoke.py              # 1 run
    python bench/bench_smoke.py --repeats 3  # 3 runs, each in a fresh folder; prints each and the median

Prints the wall-clock seconds of each run (process start to exit, imports included) and the load
average beside them: timings on a shared machine move with its load (docs/framework.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMAND = [sys.executable, "-m", "tensormask.train", "debug=fast_dev_run"]


def one_run() -> float:
    with tempfile.TemporaryDirectory(prefix="tensormask-smoke-") as work:
        env = {**os.environ, "TENSORMASK_CACHE": str(Path(work) / "cache"),
               "TENSORMASK_OUTPUT_DIR": str(Path(work) / "outputs"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
               "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        t0 = time.perf_counter()
        done = subprocess.run(COMMAND, cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"the smoke run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        if "segm" not in done.stdout:
            sys.exit(f"the smoke run printed no AP table:\n{done.stdout[-3000:]}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"smoke run: tensormask-train debug=fast_dev_run (fresh folder and dataset cache), {os.cpu_count()} CPUs")
    times = []
    for i in range(args.repeats):
        load = os.getloadavg()[0]
        times.append(one_run())
        print(f"run {i + 1}: {times[-1]:.1f} s  (load average before: {load:.2f})", flush=True)
    print(f"smoke run median: {statistics.median(times):.1f} s over {len(times)} run(s); target < 60 s")


if __name__ == "__main__":
    main()
