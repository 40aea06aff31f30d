"""Reproducible training order and augmentation: what makes a mid-epoch ``resume=`` exact.

The training order of an epoch is a function of (seed, epoch) only, the same global order for any number of
processes (a ``DistributedSampler``, also for one process: process r of w reads positions r, r + w, ...), and
every sample is transformed under torch / random / numpy RNGs seeded from (seed, epoch, its global position),
whatever process or worker loads it. So skipping the first k batches of an epoch
(``accelerate.skip_first_batches``) reproduces the rest of it exactly, and 2 processes with batch b see the
samples and augmentations that one process with batch 2b sees.

``data.create_train_loader`` builds the loader from these pieces; ``set_loader_epoch`` starts an epoch.
"""
import random

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

__all__ = ['SeededDataset', 'SeededSampler', 'train_sampler', 'set_loader_epoch']

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): well-spread seeds from (seed, epoch, position)."""
    x = 0
    for v in values:
        x = (x + (int(v) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x


class SeededSampler(Sampler):
    """Wraps this process's index sampler; yields ``(index, sample seed)`` with the seed a function of
    (seed, epoch, global position): position p of process r of w is global position p * w + r."""

    def __init__(self, sampler, seed: int, rank: int = 0, num_replicas: int = 1):
        self.sampler, self.seed, self.rank, self.num_replicas = sampler, int(seed), int(rank), int(num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if isinstance(self.sampler, RepeatAugSampler):
            self.sampler.set_epoch(self.seed * 100003 + epoch)  # it seeds its shuffle with the epoch alone
        else:
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        key = _mix(self.seed, self.epoch)
        for p, index in enumerate(self.sampler):
            yield int(index), _mix(key, p * self.num_replicas + self.rank)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """Loads ``(index, seed)`` under torch / random / numpy RNGs seeded with ``seed`` (the caller's RNG states
    are put back when it runs in the main process)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is None:
            return self.dataset[index]
        saved = None
        if torch.utils.data.get_worker_info() is None:
            saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(seed >> 1)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])


def train_sampler(ds: Dataset, seed: int, num_replicas: int = 1, rank: int = 0, repeated_aug: int = 0,
                  drop_last: bool = False) -> SeededSampler:
    """This process's shard of one global order: a ``DistributedSampler`` (also for a single process), or
    timm's ``RepeatAugSampler`` when ``repeated_aug`` > 1 in a distributed run (DeiT's repeated augmentation);
    wrapped to yield each sample's seed with its index."""
    if num_replicas > 1 and repeated_aug and repeated_aug > 1:
        sampler = RepeatAugSampler(ds, num_replicas=num_replicas, rank=rank, num_repeats=int(repeated_aug))
    else:
        sampler = DistributedSampler(ds, num_replicas=num_replicas, rank=rank, shuffle=True,
                                     seed=int(seed) * 100003, drop_last=drop_last)
    return SeededSampler(sampler, seed, rank, num_replicas)


def set_loader_epoch(loader: DataLoader, epoch: int, rank: int = 0) -> None:
    """Make epoch ``epoch``'s sample order and augmentation a function of (seed, epoch); for a stream
    (streaming.py, no sampler) its shard order and the seeds of loader workers that start now."""
    source = loader.sampler if isinstance(loader.sampler, SeededSampler) else loader.dataset
    source.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(_mix(source.seed, epoch, rank) >> 1)
