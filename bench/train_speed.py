"""A Lightning callback that measures training iterations per second (used by scripts/gpu_check.sh).

Add it to any tensormask-train run with Hydra overrides (bench/ on PYTHONPATH):

    PYTHONPATH=bench:src python -m tensormask.train ... \
        +callbacks.train_speed._target_=train_speed.TrainSpeed +callbacks.train_speed.out=speed.json

It times the optimisation steps after `warmup` steps (on a GPU it synchronises at each step end, so
each step is timed to its completion) and writes {"steps", "seconds", "it_per_s", "images_per_s",
"max_memory_gib"} to `out` (JSON) and to stdout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class TrainSpeed(L.Callback):
    def __init__(self, out: str | None = None, warmup: int = 5) -> None:
        self.out = out
        self.warmup = warmup
        self.times: list[float] = []
        self.images = 0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter())
        if len(self.times) > self.warmup + 1:
            targets = getattr(batch, "targets", None)
            self.images += len(targets) if targets is not None else 0

    def result(self) -> dict:
        timed = self.times[self.warmup:]
        if len(timed) < 2:
            return {"steps": 0, "seconds": 0.0, "it_per_s": None, "images_per_s": None}
        seconds = timed[-1] - timed[0]
        steps = len(timed) - 1
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        return {
            "steps": steps,
            "seconds": round(seconds, 4),
            "it_per_s": round(steps / seconds, 4),
            "images_per_s": round(self.images / seconds, 4) if self.images else None,
            "max_memory_gib": round(memory, 3) if memory is not None else None,
        }

    def on_train_end(self, trainer, pl_module) -> None:
        result = self.result()
        print(f"[train_speed] {json.dumps(result)}", flush=True)
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(result, indent=2) + "\n")
