"""Iteration-based sampling that resumes exactly.

Training is counted in steps (as in the paper's recipe: 90k iterations of 16 images), not epochs.
The training loader reads an endless stream of sample positions 0, 1, 2, ...; position p is image
``perm_e[p % n]`` of a permutation drawn for "epoch" e = p // n from the seed. A step t of a run with
global batch G on W processes gives process r the positions t*G + r*(G/W) ... t*G + (r+1)*(G/W) - 1,
so the global batch of a step is the same images whatever the number of processes, and a run
resumed at step s continues with exactly the images (and, through `SeededDataset`, exactly the
random augmentations) an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def _sample_seed(seed: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class StreamSampler(Sampler):
    """Endless stream of (dataset index, augmentation seed) for one process, from step `start_step` on.

    It has no length, so the Trainer's training "epoch" is endless and `max_steps` ends training.
    """

    def __init__(self, dataset_size: int, *, global_batch_size: int, rank: int, world_size: int,
                 seed: int, start_step: int = 0) -> None:
        if dataset_size < 1:
            raise ValueError("the training set is empty")
        if global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the {world_size} processes")
        self.n = dataset_size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm[position % self.n]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            first = step * self.global_batch_size + self.rank * self.local_batch_size
            for position in range(first, first + self.local_batch_size):
                yield self._index(position), _sample_seed(self.seed, position)
            step += 1


class ShardSampler(Sampler):
    """Evaluation order: process r of W gets images r, r + W, r + 2W, ... (no padding, no repeats)."""

    def __init__(self, dataset_size: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, dataset_size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededDataset(Dataset):
    """Wraps a dataset so that item (index, seed) draws its random augmentations from `seed`.

    The global RNG state is restored afterwards, so reading data never perturbs the model's RNG.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            py_state = random.getstate()
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    random.seed(seed)
                    return self.dataset[index]
            finally:
                random.setstate(py_state)
        return self.dataset[key]
