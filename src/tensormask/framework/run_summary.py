"""`<run_dir>/run_summary.json`: the status and final metrics of a training run, written atomically.

    {"status": "running" | "finished" | "failed", "error": str | None,
     "metrics": {"bbox": {...}, "segm": {...}}, "wandb": {"run_id", "project", "group", "tags", "mode"} | None,
     "overrides": [...], "run_dir": str, "steps": int}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tensormask.framework.checkpoint_io import atomic_write_json

SUMMARY_FILE = "run_summary.json"


class RunSummary:
    def __init__(self, run_dir: str | Path, overrides: list[str], enabled: bool = True) -> None:
        self.path = Path(run_dir) / SUMMARY_FILE
        self.enabled = enabled
        self.data: dict[str, Any] = {
            "status": "running", "error": None, "metrics": {}, "wandb": None,
            "overrides": list(overrides), "run_dir": str(run_dir), "steps": 0,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0,
        }
        self._t0 = time.monotonic()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["seconds"] = round(time.monotonic() - self._t0, 1)
        if self.enabled:
            atomic_write_json(self.path, self.data)
