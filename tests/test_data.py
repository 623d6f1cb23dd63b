import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clicktrain_deploy.data import BatchIterator, augment_batch, load_data
from clicktrain_deploy.data.datasets import FASHION_MNIST_ROOT, cifar10, fashion_mnist, image_folder
from clicktrain_deploy.errors import DataError


def test_fashion_mnist_is_the_real_dataset(fmnist):
    assert fmnist.train.images.shape == (60000, 1, 28, 28)
    assert fmnist.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(fmnist.train.labels).tolist() == [6000] * 10
    assert fmnist.train.labels[:4].tolist() == [9, 0, 0, 3]  # ankle boot, T-shirt, T-shirt, dress
    mean = fmnist.train.images.float().mean() / 255
    assert abs(float(mean) - 0.2860) < 1e-3


def test_balanced_subset(fmnist):
    data = load_data("fashion_mnist", train_subset=1000, seed=1, test_subset=200)
    assert torch.bincount(data.train.labels).tolist() == [100] * 10
    assert torch.bincount(data.test.labels).tolist() == [20] * 10


def test_truncated_and_missing_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "train-images-idx3-ubyte.gz")):
        fashion_mnist(str(tmp_path))
    source = f"{FASHION_MNIST_ROOT}/train-images-idx3-ubyte.gz"
    with gzip.open(source) as f:
        head = f.read(5000)
    for name in ("train-images-idx3-ubyte.gz",):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(head)
    with pytest.raises(DataError, match="header says"):
        fashion_mnist(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip"):
        fashion_mnist(str(tmp_path))


def test_cifar10_python_batches(fmnist, tmp_path):
    # Real images (Fashion-MNIST padded to 32x32, 3 planes) written in CIFAR-10's batch format.
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    images = fmnist.test.images[:60].repeat(1, 3, 1, 1)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2)).numpy()
    labels = fmnist.test.labels[:60].tolist()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        part = slice(10 * i, 10 * i + 10)
        with open(base / name, "wb") as f:
            pickle.dump({b"data": images[part].reshape(10, -1), b"labels": labels[part]}, f)
    data = cifar10(str(base))
    assert data.train.images.shape == (50, 3, 32, 32)
    assert torch.equal(data.test.images, torch.from_numpy(images[50:60]))
    (base / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 python batch"):
        cifar10(str(base))
    with pytest.raises(DataError, match="python batches folder"):
        cifar10(str(tmp_path / "nowhere"))


def test_image_folder_reads_real_pngs(fmnist, tmp_path):
    # Streamed from disk (tests/test_image_folder.py covers transforms, determinism, shards):
    # the splits hold file lists; at image_size 28 the evaluation transform (resize the shorter
    # side to int(28 / 0.875) = 32, center-crop 28) is what batches carry.
    from clicktrain_deploy.data.folder import eval_transform

    written = {}
    for split, source in (("train", fmnist.train), ("test", fmnist.test)):
        for label in (0, 1):
            folder = tmp_path / split / f"class{label}"
            folder.mkdir(parents=True)
            index = torch.nonzero(source.labels == label).flatten()[:3]
            for k, i in enumerate(index.tolist()):
                Image.fromarray(source.images[i, 0].numpy()).save(folder / f"{k}.png")
            written[split, label] = source.images[index]
    data = image_folder(str(tmp_path), image_size=28, channels=1, workers=0)
    assert data.classes == ["class0", "class1"]
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [f.decode() for f in data.train.files] == [f"class{c}/{k}.png" for c in (0, 1) for k in range(3)]
    assert data.input_shape == (1, 28, 28)
    inputs, labels = next(iter(BatchIterator(data.test, 6, [0.0], [1.0], train=False).epoch(0)))
    originals = torch.cat([written["test", 0], written["test", 1]])
    expected = torch.stack([torch.from_numpy(np.array(eval_transform(Image.fromarray(x[0].numpy()), 28)))
                            for x in originals])[:, None]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(torch.round(inputs * 255).to(torch.uint8), expected)
    (tmp_path / "train" / "class1" / "broken.png").write_bytes(b"\x89PNG broken")
    data = image_folder(str(tmp_path), image_size=28, channels=1, workers=0)
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        list(BatchIterator(data.train, 7, [0.0], [1.0], train=False).epoch(0))


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="expected sub-folders 'train' and 'test'"):
        image_folder(str(tmp_path))


def test_augmentation_is_a_shift_or_flip_of_the_original(fmnist):
    images = fmnist.train.images[:64]
    same = augment_batch(images, 0, False, torch.Generator().manual_seed(0))
    assert torch.equal(same, images)
    out = augment_batch(images, 2, True, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for k in range(64):
        views = [padded[k, :, dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[k], v) or torch.equal(out[k], v.flip(2)) for v in views)


def test_epoch_order_depends_only_on_seed_and_epoch(fmnist):
    split = load_data("fashion_mnist", train_subset=500).train
    it = BatchIterator(split, 50, [0.286], [0.353], train=True, seed=4, crop_padding=2, flip=True)
    first = [x for x, _ in it.epoch(3)]
    again = [x for x, _ in BatchIterator(split, 50, [0.286], [0.353], train=True, seed=4,
                                         crop_padding=2, flip=True).epoch(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == 10
    other = next(iter(it.epoch(4)))[0]
    assert not torch.equal(first[0], other)
