"""The learning-rate recipe: linear scaling with the global batch, linear warm-up, step decay."""

from __future__ import annotations

from collections.abc import Sequence


def scaled_lr(base_lr: float, global_batch_size: int, base_batch_size: int = 16) -> float:
    """The linear scaling rule: `base_lr` is for `base_batch_size` images per step (0.02 for 16)."""
    return base_lr * global_batch_size / base_batch_size


class WarmupMultiStep:
    """lr factor at step t: linear warm-up from `warmup_factor` over `warmup_steps`, then times
    `gamma` at each step in `milestones`. A plain callable object, so `LambdaLR` can pickle it."""

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1, warmup_steps: int = 1000,
                 warmup_factor: float = 0.001) -> None:
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step: int) -> float:
        decay = self.gamma ** sum(step >= m for m in self.milestones)
        if step >= self.warmup_steps:
            return decay
        alpha = step / self.warmup_steps
        return decay * (self.warmup_factor * (1 - alpha) + alpha)
