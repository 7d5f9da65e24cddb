#!/usr/bin/env python
"""Acceptance check of the main job: `tensormask-train` with no arguments (the README's command).

Runs it exactly as a user would, in a fresh folder and (by default) with a fresh dataset cache, so
the dataset generation counts too; then checks the two targets of the quickstart:

    wall time <= 8 min on this machine, and segm AP >= 0.55 on the synthetic validation set (issue 16;
    the README's first promise was 15 min and 0.50).

    .venv/bin/python scripts/acceptance.py            # exit status 0 = pass
    .venv/bin/python scripts/acceptance.py --keep     # keep the run folder
    .venv/bin/python scripts/acceptance.py --max-minutes 15 --min-segm-ap 0.5 --json result.json  # the first targets

Prints the run's own output (progress bar, AP table) as it goes, then a verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_command() -> list[str]:
    exe = Path(sys.executable).with_name("tensormask-train")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", "tensormask.train"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-minutes", type=float, default=8.0)
    parser.add_argument("--min-segm-ap", type=float, default=0.55)
    parser.add_argument("--reuse-cache", action="store_true", help="use the normal dataset cache (skip generation if present)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (not part of the acceptance proper)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tensormask-acceptance-"))
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")  # never contact the network from a check
    if not args.reuse_cache:
        env["TENSORMASK_CACHE"] = str(work / "cache")
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    command = train_command() + args.overrides
    print(f"[acceptance] {' '.join(command)}  (in {work})", flush=True)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=work, env=env)
    seconds = time.monotonic() - t0

    summaries = list((work / "outputs").glob("train/runs/*/run_summary.json"))
    summary = json.loads(summaries[0].read_text()) if len(summaries) == 1 else {}
    metrics = summary.get("metrics") or {}
    segm_ap = (metrics.get("segm") or {}).get("AP")
    bbox_ap = (metrics.get("bbox") or {}).get("AP")
    checks = {
        "exit status 0": proc.returncode == 0,
        "run finished": summary.get("status") == "finished",
        f"time <= {args.max_minutes:g} min": seconds <= 60 * args.max_minutes,
        f"segm AP >= {args.min_segm_ap:.2f}": segm_ap is not None and segm_ap >= args.min_segm_ap,
    }
    result = {
        "passed": all(checks.values()),
        "checks": checks,
        "seconds": round(seconds, 1),
        "segm_AP": segm_ap,
        "bbox_AP": bbox_ap,
        "steps": summary.get("steps"),
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1_5_15_before": load_before,
                    "load_avg_1_5_15_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print("\n[acceptance] " + ("PASS" if result["passed"] else "FAIL")
          + f": {seconds / 60:.1f} min, segm AP {segm_ap if segm_ap is None else round(segm_ap, 3)}, "
          + f"bbox AP {bbox_ap if bbox_ap is None else round(bbox_ap, 3)}")
    for name, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {name}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.keep:
        print(f"[acceptance] run folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
