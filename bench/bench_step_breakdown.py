"""Where a training step goes: TensorMask R-50-FPN bipyramid vs torchvision Mask R-CNN R-50-FPN, per part.

For each model (bench_model.py's runners: one image, random weights, synthetic targets), in one process:
the training step's process CPU time (median of --repeats), its FLOPs forward + backward
(torch.utils.flop_counter.FlopCounterMode, total), and per part the forward time (forward hooks) and
forward FLOPs (FlopCounterMode's per-module counts of the training-mode forward; TensorMask's mask head, which
training runs inside ``model.losses`` on the levels holding positives, counted on every level); for TensorMask
also the time of ``model.losses`` without the mask head's forward (assignment, mask targets, align2nat at the
positive windows, the loss terms).

    PYTHONPATH=src .venv/bin/python bench/bench_step_breakdown.py --size 512 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import Runner  # noqa: E402


def parts_of(which: str, model) -> dict:
    if which == "tensormask":
        return {"ResNet": model.backbone.bottom_up, "ResNet + FPN": model.backbone,
                "class tower + predictor": model.class_head, "box tower + predictor": model.box_head,
                "mask head (tower, bipyramid fuse, predictors)": model.mask_head}
    return {"ResNet": model.backbone.body, "ResNet + FPN": model.backbone, "RPN": model.rpn,
            "RoI heads (box + mask)": model.roi_heads}


def breakdown(which: str, size: int, repeats: int) -> None:
    r = Runner(which, torch.device("cpu"), size)
    r.train_step()  # warm-up
    m = r.model
    parts = parts_of(which, m)
    times: dict[str, list[float]] = {k: [] for k in parts}
    starts: dict[str, float] = {}
    hooks = []
    for name, mod in parts.items():
        hooks.append(mod.register_forward_pre_hook(lambda *_, n=name: starts.__setitem__(n, time.process_time())))
        hooks.append(mod.register_forward_hook(lambda *_, n=name: times[n].append(time.process_time() - starts[n])))
    with FlopCounterMode(display=False) as step_flops:
        r.train_step()
    m.train()
    with FlopCounterMode(display=False) as fwd_flops:
        if which == "tensormask":
            # the mask head runs in model.losses, on the levels holding positives; counted here on all of them
            m.mask_head(m(r.images).features)
        else:
            m(r.images, r.targets)
    names = {mod: f"{type(m).__name__}.{n}" for n, mod in m.named_modules()}
    counts = fwd_flops.get_flop_counts()
    for v in times.values():
        v.clear()
    steps, losses = [], []
    for _ in range(repeats):
        t0 = time.process_time()
        r.train_step()
        steps.append(time.process_time() - t0)
    if which == "tensormask":
        for _ in range(repeats):
            out = m(r.images)
            out.masks = m.mask_head(out.features)  # given: the losses' time without the mask head's forward
            t0 = time.process_time()
            m.losses(out, r.targets, [(size, size)])
            losses.append(time.process_time() - t0)
    print(f"== {which}, {size}x{size}: training step {statistics.median(steps):.3f} s CPU, "
          f"{step_flops.get_total_flops() / 1e9:.1f} GFLOP forward + backward, "
          f"{fwd_flops.get_total_flops() / 1e9:.1f} GFLOP forward")
    for name, mod in parts.items():
        gflop = sum(counts.get(names[mod], {}).values()) / 1e9
        print(f"  {name:<48} forward {statistics.median(times[name]):7.3f} s {gflop:8.1f} GFLOP")
    if losses:
        print(f"  {'losses (assignment, targets, align2nat, terms)':<48} {statistics.median(losses):15.3f} s")
    for h in hooks:
        h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# threads={args.threads} torch={torch.__version__}; process CPU time, medians of {args.repeats}")
    for which in ("tensormask", "maskrcnn"):
        breakdown(which, args.size, args.repeats)


if __name__ == "__main__":
    main()
