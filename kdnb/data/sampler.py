"""The training data order: a pure function of ``(seed, step)``, sharded over DDP ranks.

A run resumed at step k draws exactly the batches an uninterrupted run would have drawn
from step k on, so resume is exact; every augmentation is seeded per sample
(:class:`kdnb.data.transforms.Augmented`).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from .base import IGNORE_INDEX


class StepSampler(Sampler):
    """Batches of ``(index, epoch)`` keys for steps ``start..steps-1``, a function of the seed.

    Epoch ``e`` is a permutation drawn from ``seed + e``; a global batch is the next
    ``batch_size`` keys (an epoch's remainder is dropped), and DDP rank ``r`` of ``world``
    takes keys ``r::world`` of it. Resuming at step k therefore reproduces exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, steps: int, *, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ValueError(f"the training set has {n} samples, fewer than one batch of "
                             f"{batch_size}: lower --batch-size or add data")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed
        self.start, self.rank, self.world = start, rank, world
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, None
        for step in range(self.start, self.steps):
            e, b = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            keys = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            yield [(i, e) for i in keys[self.rank::self.world]]


def collate(batch):
    """Stacks ``(image, mask[, index])`` samples into batch tensors."""
    return tuple(torch.stack(x) if isinstance(x[0], torch.Tensor) else torch.tensor(x)
                 for x in zip(*batch))


class CheckedCollate:
    """:func:`collate`, then a check that every mask label is a class or ``ignore_index``.

    It runs where the batch is made, on CPU tensors, so it costs no host-device sync: in
    the loader's workers when there are some, else in the training loop, where it costs
    about what :func:`collate` itself does (a few comparisons per pixel). Without it a bad
    label fails far from its cause: on a GPU as a device-side assertion inside the loss,
    with no value named.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __call__(self, batch):
        out = collate(batch)
        masks = out[1]
        bad = (masks != self.ignore_index) & ((masks < 0) | (masks >= self.num_classes))
        if bad.any():
            found = torch.unique(masks[bad])[:8].tolist()
            raise ValueError(
                f"masks hold labels {found} outside [0, {self.num_classes}) that are not "
                f"{self.ignore_index} (ignore): the model has {self.num_classes} classes. Map "
                f"the dataset's labels to 0..{self.num_classes - 1} (and void to "
                f"{self.ignore_index}), or train a model with as many classes as the data has")
        return out


class Indexed(Dataset):
    """Adds each sample's dataset index, so per-sample caches can be looked up."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index = key if isinstance(key, int) else key[0]
        return (*self.dataset[key], index)
