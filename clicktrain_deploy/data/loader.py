"""Deterministic batching: the order and augmentation of epoch e depend only on (seed, e).

That makes an interrupted run resumable with exactly the batches it would have seen. In-memory
splits are batched here; an image folder's ``FolderSplit`` is streamed by ``folder.FolderBatches``
(``BatchIterator(folder_split, ...)`` returns one), with the same order and interface.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .. import distributed
from ..errors import RecipeError
from .datasets import Split
from .folder import FolderBatches, FolderSplit


def augment_batch(images: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, per image.

    images: uint8 or float (N, C, H, W); returns the same shape and dtype.
    """
    n, _, h, w = images.shape
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    return images.contiguous()


class BatchIterator:
    """Iterates (inputs float (B, C, H, W) normalised, labels int64 (B,)) over a split.

    Training iterators shuffle with a generator seeded by (seed, epoch) and augment; test
    iterators keep the order. ``drop_last`` keeps every training step the same size.
    Given a ``FolderSplit`` it returns a ``FolderBatches`` streaming the folder instead.
    """

    def __new__(cls, split, *args, **kwargs):
        if cls is BatchIterator and isinstance(split, FolderSplit):
            return FolderBatches(split, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, split: Split, batch_size: int, mean: list[float], std: list[float], *,
                 train: bool, seed: int = 0, crop_padding: int = 0, flip: bool = False) -> None:
        self.split = split
        self.batch_size = batch_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.train = train
        self.seed = seed
        self.crop_padding = crop_padding
        self.flip = flip

    def __len__(self) -> int:
        if self.train:
            return len(self.split) // self.batch_size
        return -(-len(self.split) // self.batch_size)

    def epoch(self, epoch: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``epoch`` (at most ``limit`` of them)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.split)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        steps = len(self) if limit is None else min(limit, len(self))
        for step in range(steps):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            images = self.split.images[index]
            if self.train:
                images = augment_batch(images, self.crop_padding, self.flip, generator)
            inputs = (images.float() / 255.0 - self.mean) / self.std
            yield inputs, self.split.labels[index]


def make_batches(split: Split | FolderSplit, batch_size: int, mean: list[float], std: list[float], *,
                 train: bool, seed: int = 0, crop_padding: int = 0, flip: bool = False,
                 even: bool = True):
    """This process's batches of ``split``: ``distributed.shard`` of a ``BatchIterator`` for an
    in-memory split; for a folder a ``FolderBatches`` whose sampler decodes only this rank's
    share of each global batch (the same samples ``ShardedBatches`` would slice out)."""
    if not isinstance(split, FolderSplit):
        return distributed.shard(BatchIterator(split, batch_size, mean, std, train=train, seed=seed,
                                               crop_padding=crop_padding, flip=flip), even=even)
    world = distributed.world_size()
    if even and batch_size % world:
        raise RecipeError(f"data.batch_size ({batch_size}) is the global batch and "
                          f"must split evenly over the {world} processes")
    return FolderBatches(split, batch_size, mean, std, train=train, seed=seed, flip=flip,
                         rank=distributed.rank() if distributed.is_distributed() else 0,
                         world_size=world, device=distributed.device())
