"""The step-based sample stream, the learning-rate recipe and the run-folder names."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from tensormask.framework.resolvers import run_name
from tensormask.framework.sampling import SeededDataset, ShardSampler, StreamSampler
from tensormask.framework.schedule import WarmupMultiStep, scaled_lr


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_stream_same_global_batch_for_any_world_size():
    one = _take(StreamSampler(10, global_batch_size=4, rank=0, world_size=1, seed=3), 4 * 7)
    r0 = _take(StreamSampler(10, global_batch_size=4, rank=0, world_size=2, seed=3), 2 * 7)
    r1 = _take(StreamSampler(10, global_batch_size=4, rank=1, world_size=2, seed=3), 2 * 7)
    for step in range(7):
        assert one[4 * step:4 * step + 4] == r0[2 * step:2 * step + 2] + r1[2 * step:2 * step + 2]


def test_stream_resumes_at_step_and_covers_each_epoch():
    full = _take(StreamSampler(10, global_batch_size=4, rank=0, world_size=1, seed=0), 40)
    resumed = _take(StreamSampler(10, global_batch_size=4, rank=0, world_size=1, seed=0, start_step=3), 28)
    assert resumed == full[12:]
    indices = [i for i, _ in full]
    for epoch in range(4):
        assert sorted(indices[10 * epoch:10 * epoch + 10]) == list(range(10))
    assert indices[:10] != indices[10:20]  # a new permutation each epoch
    assert len({s for _, s in full}) == 40  # one augmentation seed per position


def test_stream_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        StreamSampler(10, global_batch_size=3, rank=0, world_size=2, seed=0)


def test_shards_partition_the_evaluation_set():
    shards = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_seeded_dataset_repeats_augmentations_and_keeps_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(2) + i

    ds = SeededDataset(Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = ds[(1, 123)], ds[(1, 123)]
    assert torch.equal(a, b) and not torch.equal(a, ds[(1, 124)])
    assert torch.equal(torch.get_rng_state(), before)


def test_warmup_multistep():
    f = WarmupMultiStep([10, 20], gamma=0.1, warmup_steps=5, warmup_factor=0.001)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == 1.0 and f(9) == 1.0
    assert f(10) == pytest.approx(0.1) and f(25) == pytest.approx(0.01)
    assert 0.001 < f(2) < 1.0
    assert scaled_lr(0.02, 16) == pytest.approx(0.02)
    assert scaled_lr(0.02, 64) == pytest.approx(0.08)
    assert scaled_lr(0.02, 2, base_batch_size=16) == pytest.approx(0.0025)


def test_run_names_are_short_shell_safe_and_stable():
    assert run_name([]) == "default"
    name = run_name(["seed=1", "model/mask_head=natural", "module.milestones=[340,380]", "logger=csv"], ["logger"])
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name) and name.startswith("mask_head-natural+milestones-340-380+seed-1_")
    assert name == run_name(["logger=csv", "module.milestones=[340,380]", "model/mask_head=natural", "seed=1"],
                            ["logger"])  # the order of the overrides does not matter; excluded keys do not count
    assert name != run_name(["seed=2", "model/mask_head=natural", "module.milestones=[340,380]"])
    long = run_name(["data.root=" + "a" * 300])
    assert len(long) <= 70 and long != run_name(["data.root=" + "a" * 299])
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", run_name(["data.root='/my data/coco'", "tags=[a,b]"]))