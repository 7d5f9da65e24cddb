"""The main job's training step (tensormask-train with no arguments), timed per variant of Hydra overrides.

Builds the run of each variant from the real config (data, model, module with its optimizer and schedule;
no Lightning loop, no checkpoints, no evaluation), trains a few warm-up steps, then alternates blocks of
--steps training steps between the variants for --rounds rounds, so that a shared machine's load hits all
of them alike. Per variant: the median over the rounds of the process CPU time and of the wall-clock time
per step, their ratios to the first variant, and the page faults per step. A step is the training step of
the LightningModule: load a batch, forward, losses, backward, gradient clipping (the run's
trainer.gradient_clip_val), optimizer and scheduler step.

    PYTHONPATH=src .venv/bin/python bench/bench_main_step.py --rounds 3 --steps 8 "" "trainer.max_steps=1900"
    # the allocator settings (docs/ops.md): one fresh process per setting, alternated by the shell
    for i in 1 2 3; do PYTHONPATH=src .venv/bin/python bench/bench_main_step.py --rounds 2 --steps 10 "";
        TENSORMASK_MALLOC=0 PYTHONPATH=src .venv/bin/python bench/bench_main_step.py --rounds 2 --steps 10 ""; done

A variant is one string of space-separated overrides ("" is the main job itself). The synthetic data set is
written to $TENSORMASK_CACHE first if needed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

from tensormask import openmp  # noqa: E402

openmp.configure()  # as the entry points do, before torch loads OpenMP (docs/framework.md "CPU threads")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from tensormask import framework  # noqa: E402, F401  (the config resolvers)
from tensormask.framework.builders import build_datamodule, build_model, build_module  # noqa: E402
from tensormask.framework.data_config import prepare_data_config  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


class Variant:
    def __init__(self, overrides: str, seed: int) -> None:
        self.name = overrides or "(the main job)"
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides.split())
        with open_dict(cfg):
            cfg.paths.output_dir = "/nonexistent/bench_main_step"  # nothing is written
        prepare_data_config(cfg, splits=("train", "val"))
        torch.manual_seed(seed)
        self.model = build_model(cfg)
        datamodule = build_datamodule(cfg, self.model)
        self.module = build_module(cfg, self.model)
        datamodule.prepare_data()
        datamodule.setup("fit")
        optimizers = self.module.configure_optimizers()
        self.optimizer = optimizers["optimizer"]
        self.scheduler = optimizers["lr_scheduler"]["scheduler"]
        self.clip = cfg.trainer.get("gradient_clip_val")
        self.batches = iter(datamodule.train_dataloader())
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.faults: list[float] = []

    def step(self) -> None:
        self.model.train()
        batch = next(self.batches)
        out = self.module._forward(self.module._images(batch))
        loss = sum(self.model.losses(out, batch.targets, batch.image_sizes).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip))
        self.optimizer.step()
        self.scheduler.step()

    def timed(self, steps: int) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            self.step()
        self.cpu.append((time.process_time() - cpu) / steps)
        self.wall.append((time.perf_counter() - wall) / steps)
        self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help='one string of overrides per variant ("": the main job)')
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per variant and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = [Variant(v, args.seed) for v in args.variants]
    for v in variants:
        for _ in range(args.warmup):
            v.step()
    for _ in range(args.rounds):
        for v in variants:
            v.timed(args.steps)
    print(f"# threads={torch.get_num_threads()} torch={torch.__version__} "
          f"TENSORMASK_MALLOC={os.environ.get('TENSORMASK_MALLOC', '(unset)')} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')} load={os.getloadavg()[0]:.1f}; "
          f"medians over {args.rounds} rounds of {args.steps} steps")
    cpu0, wall0 = statistics.median(variants[0].cpu), statistics.median(variants[0].wall)
    print(f"{'CPU ms/step':>12} {'x first':>8} {'wall ms/step':>13} {'x first':>8} {'faults/step':>12}  variant")
    for v in variants:
        cpu, wall = statistics.median(v.cpu), statistics.median(v.wall)
        print(f"{1000 * cpu:12.1f} {cpu / cpu0:8.3f} {1000 * wall:13.1f} {wall / wall0:8.3f} "
              f"{statistics.median(v.faults):12.0f}  {v.name}")


if __name__ == "__main__":
    main()
