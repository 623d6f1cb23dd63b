"""Image folders streamed from disk: Pillow decoding in DataLoader workers, bounded memory.

Only the file lists live in memory (one numpy array of relative paths per split, which forked
workers share without copying: no per-file Python objects whose reference counts would dirty
the pages); each worker decodes the images of one batch at a time and at most
``PREFETCH_BATCHES`` batches per worker wait in the queue, so resident memory does not grow with
the folder's size.

Transforms (torchvision's definitions, on Pillow images):
- training: ``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` (bilinear) and a
  horizontal flip with probability 1/2 (``data.flip``);
- evaluation: resize the shorter side to ``int(image_size / 0.875)`` (256 for 224), then
  center-crop ``image_size``.

Determinism: the augmentation of image ``i`` in epoch ``e`` is drawn from a generator seeded by
``(seed, e, i)`` inside the worker, and the order of epoch ``e`` is the in-memory
``BatchIterator``'s permutation for ``(seed, e)``, so the batches depend only on
(seed, epoch), never on the number of workers or on which worker decodes what: a resumed run
sees exactly the batches it would have seen. Under torch.distributed rank ``r`` of ``W`` decodes
only samples ``r, r + W, ...`` of every global batch, the interleave ``distributed.ShardedBatches``
takes from an in-memory batch (same images, same augmentation).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EVAL_CROP_FRACTION = 0.875
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
PREFETCH_BATCHES = 2  # per worker
STATS_SEED = 0


def default_workers() -> int:
    """DataLoader worker processes when the recipe gives none: min(4, usable cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass
class FolderSplit:
    """One split of an image folder: file paths (relative to ``root``, ``class/file``) and labels.

    ``images`` is an alias of ``files`` so that code slicing an in-memory ``Split``
    (``split.images[:n]``) slices the file list here.
    """

    root: Path
    files: np.ndarray            # bytes paths relative to root, dtype S
    labels: Tensor               # int64 (N,)
    image_size: int
    channels: int = 3
    workers: int | None = None   # None: default_workers()
    skip_corrupt: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> np.ndarray:
        return self.files

    @images.setter
    def images(self, value: np.ndarray) -> None:
        self.files = value

    def take(self, index) -> "FolderSplit":
        """The split restricted to ``index`` (a tensor or array of positions)."""
        index = np.asarray(index)
        return FolderSplit(self.root, self.files[index], self.labels[torch.from_numpy(index)],
                           self.image_size, self.channels, self.workers, self.skip_corrupt)

    def path(self, position: int) -> Path:
        return self.root / os.fsdecode(self.files[position])

    @property
    def num_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers


def list_folder(base: Path, classes: list[str]) -> tuple[np.ndarray, Tensor]:
    """Relative paths (sorted per class, classes in order) and labels of the images under base."""
    names: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = base / name
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            files = sorted(e.name for e in entries
                           if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and not e.name.startswith("."))
        names += [os.fsencode(f"{name}/{f}") for f in files]
        labels += [label] * len(files)
    if not names:
        raise DataError(f"{base}: no images found (expected {', '.join(sorted(IMAGE_SUFFIXES))} "
                        "files in one sub-folder per class)")
    return np.array(names, dtype=np.bytes_), torch.tensor(labels, dtype=torch.int64)


# ---- transforms (torchvision's definitions) -------------------------------------------------

def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's ``RandomResizedCrop.get_params``: 10 tries at a random
    area share in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the central crop
    at the nearest allowed ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img, size: int, flip: bool, rng: np.random.Generator):
    """RandomResizedCrop(size) then, with ``flip``, a horizontal flip with probability 1/2."""
    from PIL import Image

    top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def eval_transform(img, size: int):
    """Resize the shorter side to int(size / 0.875), then center-crop size x size."""
    from PIL import Image

    short = int(size / EVAL_CROP_FRACTION)
    width, height = img.size
    if width <= height:
        new = (short, int(short * height / width))
    else:
        new = (int(short * width / height), short)
    if new != (width, height):
        img = img.resize(new, Image.BILINEAR)
    top = int(round((new[1] - size) / 2.0))
    left = int(round((new[0] - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


# ---- dataset, sampler, batches --------------------------------------------------------------

class FolderDataset(torch.utils.data.Dataset):
    """Decodes one image per key ``(epoch, position)``; runs in the DataLoader's workers.

    Returns ``(position, pixels uint8 (H, W, C) or None, error or None)``: a file that cannot be
    decoded comes back as its error message, and the main process raises or skips it.
    """

    def __init__(self, split: FolderSplit, *, train: bool, seed: int, flip: bool) -> None:
        self.root = str(split.root)
        self.files = split.files
        self.size = split.image_size
        self.mode = {1: "L", 3: "RGB"}[split.channels]
        self.train = train
        self.seed = seed
        self.flip = flip

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, position: int, epoch: int) -> np.ndarray:
        from PIL import Image

        path = os.path.join(self.root, os.fsdecode(self.files[position]))
        with Image.open(path) as img:
            img = img.convert(self.mode)  # loads the whole file: truncation fails here
        if self.train:
            rng = np.random.default_rng([self.seed % 2**63, epoch, position])
            img = train_transform(img, self.size, self.flip, rng)
        else:
            img = eval_transform(img, self.size)
        return np.asarray(img, dtype=np.uint8).reshape(self.size, self.size, -1)

    def __getitem__(self, key: tuple[int, int]):
        epoch, position = key
        try:
            return position, self.decode(position, epoch), None
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
            return position, None, f"{type(exc).__name__}: {exc}"


def collate(items: list) -> tuple[np.ndarray, Tensor, list[tuple[int, str]]]:
    """(positions int64, pixels uint8 (B, C, H, W) as a tensor or None, [(position, error)])."""
    good = [(p, a) for p, a, e in items if e is None]
    errors = [(p, e) for p, _, e in items if e is not None]
    positions = np.array([p for p, _ in good], dtype=np.int64)
    pixels = torch.from_numpy(np.stack([a for _, a in good]).transpose(0, 3, 1, 2).copy()) if good else None
    return positions, pixels, errors


class FolderSampler:
    """Batch sampler: the keys ``(epoch, position)`` of this rank's part of each batch.

    ``epoch`` and ``limit`` are set before each pass (the DataLoader calls ``iter`` on it in the
    main process), so one persistent DataLoader serves every epoch.
    """

    def __init__(self, size: int, batch_size: int, *, train: bool, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.size = size
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.limit: int | None = None

    def steps(self) -> int:
        """Global batches per epoch: drop_last when training, the last short one kept otherwise."""
        return self.size // self.batch_size if self.train else -(-self.size // self.batch_size)

    def batches(self, epoch: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Positions of this rank's share of each batch of ``epoch`` (at most ``limit``)."""
        if self.train:  # the in-memory BatchIterator's permutation for (seed, epoch)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=generator).numpy()
        else:
            order = np.arange(self.size)
        steps = self.steps() if limit is None else min(limit, self.steps())
        for step in range(steps):
            part = order[step * self.batch_size:(step + 1) * self.batch_size][self.rank::self.world_size]
            if len(part):
                yield part

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for part in self.batches(self.epoch, self.limit):
            yield [(self.epoch, int(p)) for p in part]

    def __len__(self) -> int:
        return self.steps() if self.limit is None else min(self.limit, self.steps())


@dataclass
class SkipLog:
    """Files skipped as unreadable in the last pass (``data.skip_corrupt``)."""

    count: int = 0
    files: list[str] = field(default_factory=list)  # the first few, for messages

    def add(self, path: str) -> None:
        self.count += 1
        if len(self.files) < 10:
            self.files.append(path)


class FolderBatches:
    """``BatchIterator``'s interface over a ``FolderSplit``: (inputs float (b, C, H, W)
    normalised, labels int64 (b,)) per batch, decoded by a persistent DataLoader.

    ``rank``/``world_size`` pick this process's share of every global batch (see
    ``FolderSampler``) and ``device`` is where batches are delivered; ``skipped`` describes the
    unreadable files skipped in the latest pass (always empty without ``skip_corrupt``: the first
    one raises ``DataError`` naming it).
    """

    def __init__(self, split: FolderSplit, batch_size: int, mean: list[float], std: list[float], *,
                 train: bool, seed: int = 0, crop_padding: int = 0, flip: bool = False,
                 rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        del crop_padding  # folders use RandomResizedCrop instead of padded crops
        if len(mean) != split.channels or len(std) != split.channels:
            raise DataError(f"{split.root}: normalisation has {len(mean)} mean and {len(std)} std "
                            f"values for {split.channels}-plane images")
        self.split = split
        self.batch_size = batch_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.train = train
        self.device = device or torch.device("cpu")
        self.sampler = FolderSampler(len(split), batch_size, train=train, seed=seed, rank=rank,
                                     world_size=world_size)
        self.dataset = FolderDataset(split, train=train, seed=seed, flip=flip)
        self.skipped = SkipLog()
        self._loader: torch.utils.data.DataLoader | None = None
        self._pass = 0

    def __len__(self) -> int:
        return self.sampler.steps()

    @property
    def loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            workers = self.split.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
                persistent_workers=workers > 0, prefetch_factor=PREFETCH_BATCHES if workers else None)
        return self._loader

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is garbage collected)."""
        self._loader = None

    def epoch(self, epoch: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``epoch`` (at most ``limit`` of them); see the class docstring."""
        self._pass += 1
        current = self._pass
        self.skipped = SkipLog()
        self.sampler.epoch, self.sampler.limit = epoch, limit
        for positions, pixels, errors in self.loader:
            if current != self._pass:
                raise RuntimeError("FolderBatches: an earlier epoch() pass was resumed after a newer "
                                   "one started; passes over one iterator cannot interleave")
            for position, message in errors:
                path = str(self.split.path(position))
                if not self.split.skip_corrupt:
                    raise DataError(f"{path}: not a readable image ({message}); fix or remove it, "
                                    "or set data.skip_corrupt = true to skip unreadable files")
                self.skipped.add(path)
            if pixels is None:
                continue  # every image of this share was skipped
            inputs = (pixels.float() / 255.0 - self.mean) / self.std
            labels = self.split.labels[torch.from_numpy(positions)]
            yield inputs.to(self.device), labels.to(self.device)


def channel_stats(split: FolderSplit, images: int, seed: int = STATS_SEED) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``images`` training images drawn with ``seed`` (all of them
    when fewer), decoded with the evaluation transform, in [0, 1]."""
    rng = np.random.RandomState(seed)
    picked = np.sort(rng.permutation(len(split))[:images])
    sample = split.take(picked)
    batches = FolderBatches(sample, 50, [0.0] * split.channels, [1.0] * split.channels, train=False)
    total = torch.zeros(split.channels, dtype=torch.float64)
    squares = torch.zeros(split.channels, dtype=torch.float64)
    pixels = 0
    for inputs, _ in batches.epoch(0):
        x = inputs.double()
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    batches.close()
    if pixels == 0:
        raise DataError(f"{split.root}: none of the {len(sample)} sampled images could be read")
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
