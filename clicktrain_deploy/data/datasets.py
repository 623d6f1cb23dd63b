"""Dataset loaders: Fashion-MNIST (Debian IDX files), CIFAR-10 python batches, image folders.

Each loader returns an ``ImageData``: train and test splits, class names and the per-channel
mean/std used to normalise. Fashion-MNIST and CIFAR-10 are small and held in memory (``Split``:
uint8 images (N, C, H, W), int64 labels (N,)); image folders are streamed from disk
(``folder.FolderSplit``: file lists only, decoded in DataLoader workers). Nothing is downloaded;
a missing or malformed file raises ``DataError`` naming the path and what was expected.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..registry import Registry
from .folder import FolderSplit, channel_stats, list_folder

DATASETS: Registry = Registry("dataset")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
STATS_IMAGES = 500  # image folders: training images sampled for mean/std when the recipe gives none


@dataclass
class Split:
    """One split: images uint8 (N, C, H, W) and labels int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index) -> "Split":
        """The split restricted to ``index`` (a tensor or array of positions)."""
        index = torch.as_tensor(index)
        return Split(self.images[index], self.labels[index])


@dataclass
class ImageData:
    """Train and test splits plus what a model needs to know about them."""

    train: Split | FolderSplit
    test: Split | FolderSplit
    classes: list[str]
    mean: list[float]
    std: list[float]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image (as batches deliver it: after the folder's crop)."""
        if isinstance(self.train, FolderSplit):
            return (self.train.channels, self.train.image_size, self.train.image_size)
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def streamed(self) -> bool:
        """Whether images are decoded from disk batch by batch (an image folder)."""
        return isinstance(self.train, FolderSplit)


class FolderData(ImageData):
    """An image folder's ``ImageData``: when no mean/std were given, they are computed on first
    use from ``STATS_IMAGES`` training images (a fixed sample of the whole train folder, so
    subsets and seeds do not change it), with the evaluation transform."""

    def __init__(self, train: FolderSplit, test: FolderSplit, classes: list[str],
                 mean: list[float] | None, std: list[float] | None,
                 stats_images: int = STATS_IMAGES) -> None:
        self._full_train = train
        self._stats_images = stats_images
        super().__init__(train, test, classes, mean, std)  # type: ignore[arg-type]

    def _stats(self) -> None:
        if self._mean is None or self._std is None:
            mean, std = channel_stats(self._full_train, self._stats_images)
            self._mean = self._mean if self._mean is not None else mean
            self._std = self._std if self._std is not None else std

    @property  # type: ignore[override]
    def mean(self) -> list[float]:
        self._stats()
        return self._mean

    @mean.setter
    def mean(self, value: list[float] | None) -> None:
        self._mean = value

    @property  # type: ignore[override]
    def std(self) -> list[float]:
        self._stats()
        return self._std

    @std.setter
    def std(self, value: list[float] | None) -> None:
        self._std = value


def load_data(name: str, root: str | None = None, train_subset: int | None = None,
              seed: int = 0, test_subset: int | None = None, mean: list[float] | None = None,
              std: list[float] | None = None, **options) -> ImageData:
    """Load dataset ``name`` from ``root`` (its default when None).

    ``train_subset`` keeps a class-balanced random subset of that many training images, drawn with
    ``seed``, for short runs; ``test_subset`` does the same for the test split. ``mean``/``std``
    (per channel, in [0, 1] units) replace the dataset's own normalisation.
    """
    if (mean is None) != (std is None):
        raise DataError(f"{name}: give both mean and std, or neither")
    if mean is not None and name == "image_folder":
        options = {**options, "mean": mean, "std": std}
    data = DATASETS.get(name)(root, **options) if root else DATASETS.get(name)(**options)
    if mean is not None:
        planes = data.input_shape[0]
        if len(mean) != planes or len(std) != planes:
            raise DataError(f"{name}: data.mean/data.std have {len(mean)}/{len(std)} values for "
                            f"{planes}-plane images")
        data.mean, data.std = list(mean), list(std)
    if train_subset is not None and train_subset < len(data.train):
        data.train = _balanced_subset(data.train, train_subset, len(data.classes), seed)
    if test_subset is not None and test_subset < len(data.test):
        data.test = _balanced_subset(data.test, test_subset, len(data.classes), seed)
    return data


def _balanced_subset(split: Split, size: int, num_classes: int, seed: int) -> Split:
    rng = np.random.RandomState(seed)
    labels = split.labels.numpy()
    per_class = size // num_classes
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    return split.take(np.sort(np.concatenate(picked)))


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a gzip'd IDX file; "
                        "install Debian's dataset-fashion-mnist or set data.root)")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file with magic {magic:#010x}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path}: holds {len(raw) - header} bytes of data, header says {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: str = FASHION_MNIST_ROOT) -> ImageData:
    """Fashion-MNIST: 60k/10k 1x28x28 images in 10 classes, from the four IDX .gz files."""
    base = Path(root)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(base / f"{prefix}-images-idx3-ubyte.gz", 0x00000803, 3)
        labels = _read_idx(base / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801, 1)
        if len(images) != len(labels):
            raise DataError(f"{base}: {prefix} has {len(images)} images but {len(labels)} labels")
        splits[split] = Split(torch.from_numpy(images.copy())[:, None],
                              torch.from_numpy(labels.astype(np.int64)))
    return ImageData(splits["train"], splits["test"], FASHION_MNIST_CLASSES, [0.2860], [0.3530])


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected CIFAR-10's python batches folder "
                        "'cifar-10-batches-py' with data_batch_1..5 and test_batch)")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # pickle raises many types on a corrupt file
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if len(data) != len(labels):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


@DATASETS.register("cifar10")
def cifar10(root: str = "cifar-10-batches-py") -> ImageData:
    """CIFAR-10 from its standard python-batches folder (3x32x32, 50k/10k images)."""
    base = Path(root)
    parts = [_read_cifar_batch(base / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(base / "test_batch")
    train = Split(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                  torch.from_numpy(np.concatenate([p[1] for p in parts])))
    return ImageData(train, Split(torch.from_numpy(test_x), torch.from_numpy(test_y)),
                     CIFAR10_CLASSES, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])


@DATASETS.register("image_folder")
def image_folder(root: str, image_size: int = 32, channels: int = 3, workers: int | None = None,
                 skip_corrupt: bool = False, mean: list[float] | None = None,
                 std: list[float] | None = None, stats_images: int = STATS_IMAGES) -> FolderData:
    """Users' images: ``root/train/<class>/*.png`` and ``root/test/<class>/*`` (or ``val``),
    the ImageNet layout; streamed from disk (see ``data.folder``), never decoded whole.

    Images are converted to ``channels`` planes (1 or 3), cropped to image_size x image_size
    (random-resized crops for training, resize + center crop for evaluation) and decoded by
    ``workers`` DataLoader processes (None: min(4, cores)). Class names come from the train
    sub-folders, sorted; test must have the same classes. ``mean``/``std``: the normalisation,
    computed on ``stats_images`` training images when not given. Unreadable files raise
    ``DataError`` naming them when batches reach them, or are skipped and counted with
    ``skip_corrupt``.
    """
    if channels not in (1, 3):
        raise DataError(f"{root}: channels must be 1 or 3, got {channels}")
    base = Path(root)
    train_dir = base / "train"
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{base}: expected sub-folders 'train' and 'test' (or 'val'), "
                        "each with one folder per class")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders found")
    if test_classes != classes:
        raise DataError(f"{test_dir}: classes {test_classes} differ from {train_dir}'s {classes}")
    splits = []
    for folder in (train_dir, test_dir):
        files, labels = list_folder(folder, classes)
        splits.append(FolderSplit(folder, files, labels, image_size, channels, workers, skip_corrupt))
    return FolderData(splits[0], splits[1], classes, mean, std, stats_images)
