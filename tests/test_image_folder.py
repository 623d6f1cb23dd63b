"""Image folders streamed from disk (``data.folder``), on real images: Fashion-MNIST written as
64x64 RGB PNG files, 3 classes x 20 training and 3 x 5 test images."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clicktrain_deploy import parse_recipe, train
from clicktrain_deploy.data import FolderBatches, load_data
from clicktrain_deploy.data.folder import eval_transform, random_resized_crop_box
from clicktrain_deploy.errors import DataError, RecipeError

CLASSES = 3


def _write_split(folder, split, per_class: int) -> None:
    for label in range(CLASSES):
        target = folder / f"class{label}"
        target.mkdir(parents=True)
        index = torch.nonzero(split.labels == label).flatten()[:per_class].tolist()
        for k, i in enumerate(index):
            gray = Image.fromarray(split.images[i, 0].numpy()).resize((64, 64), Image.BILINEAR)
            # Tint per class so the three planes differ (real RGB, not three equal planes).
            planes = [gray.point(lambda v, s=s: int(v * s)) for s in (1.0, 0.8, 0.6)[label:] + (1.0, 0.8, 0.6)[:label]]
            Image.merge("RGB", planes).save(target / f"{k:03d}.png")


@pytest.fixture(scope="module")
def folder(fmnist, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_split(root / "train", fmnist.train, 20)
    _write_split(root / "test", fmnist.test, 5)
    return root


def _batches(data, split="train", *, seed=0, workers=None, batch=12, **kw):
    s = getattr(data, split)
    if workers is not None:
        s.workers = workers
    return FolderBatches(s, batch, data.mean, data.std, train=split == "train", seed=seed,
                         flip=True, **kw)


def test_layout_shapes_and_normalised_range(folder):
    data = load_data("image_folder", str(folder), image_size=32, workers=2)
    assert data.classes == ["class0", "class1", "class2"]
    assert len(data.train) == 60 and len(data.test) == 15
    assert data.input_shape == (3, 32, 32) and data.streamed
    assert len(data.mean) == len(data.std) == 3
    assert all(0.0 < m < 1.0 for m in data.mean) and all(0.0 < s < 1.0 for s in data.std)
    batches = _batches(data)
    assert len(batches) == 5  # drop_last
    seen = list(batches.epoch(0))
    assert len(seen) == 5
    mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    for inputs, labels in seen:
        assert inputs.shape == (12, 3, 32, 32) and inputs.dtype == torch.float32
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
        pixels = inputs * std + mean
        assert float(pixels.min()) > -1e-5 and float(pixels.max()) < 1 + 1e-5
    everything = torch.cat([x for x, _ in seen])
    assert abs(float(everything.mean())) < 0.5  # roughly centred by the sampled statistics
    # The recipe's normalisation replaces the sampled one (and is checked against the planes).
    given = load_data("image_folder", str(folder), image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    assert given.mean == [0.5] * 3 and given.std == [0.25] * 3
    with pytest.raises(DataError, match="3-plane"):
        load_data("image_folder", str(folder), image_size=32, mean=[0.5], std=[0.25])
    gray = load_data("image_folder", str(folder), image_size=24, channels=1, workers=0)
    x, _ = next(iter(_batches(gray, "test").epoch(0)))
    assert x.shape == (12, 1, 24, 24)


def test_augmentation_depends_only_on_seed_and_epoch(folder):
    data = load_data("image_folder", str(folder), image_size=32, mean=[0.3] * 3, std=[0.3] * 3)
    first = [x for x, _ in _batches(data, seed=5, workers=2).epoch(3)]
    # Another iterator, another worker count: same batches.
    again = [x for x, _ in _batches(data, seed=5, workers=0).epoch(3)]
    assert len(first) == len(again) == 5
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_epoch = [x for x, _ in _batches(data, seed=5, workers=0).epoch(4)]
    assert not torch.equal(first[0], other_epoch[0])
    other_seed = next(iter(_batches(data, seed=6, workers=0).epoch(3)))[0]
    assert not torch.equal(first[0], other_seed)
    # limit: the first batches of the same pass.
    limited = [x for x, _ in _batches(data, seed=5, workers=2).epoch(3, limit=2)]
    assert len(limited) == 2 and all(torch.equal(a, b) for a, b in zip(first, limited))


def test_eval_transform_is_deterministic_and_torchvision_like(folder):
    data = load_data("image_folder", str(folder), image_size=48, mean=[0.0] * 3, std=[1.0] * 3,
                     workers=2)
    batches = _batches(data, "test", batch=15)
    one, two = (torch.cat([x for x, _ in batches.epoch(e)]) for e in (0, 7))
    assert torch.equal(one, two)
    # Resize the shorter side to int(48 / 0.875) = 54, center-crop 48.
    with Image.open(data.test.path(4)) as img:
        expected = np.array(eval_transform(img.convert("RGB"), 48))
    assert torch.equal(torch.round(one[4] * 255).to(torch.uint8), torch.from_numpy(expected).permute(2, 0, 1))
    wide = eval_transform(Image.new("RGB", (300, 200)), 224)
    assert wide.size == (224, 224)


def test_random_resized_crop_box_follows_torchvision():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(64, 48, rng)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        # The 10 tries keep area within scale (0.08, 1) and the ratio within (3/4, 4/3) up to rounding.
        assert 0.08 * 64 * 48 * 0.8 <= h * w <= 64 * 48
        assert 0.75 * 0.85 <= w / h <= 4 / 3 / 0.85
    # Fallback (no try fits in a 1000x10 strip): the central crop at the widest allowed ratio.
    top, left, h, w = random_resized_crop_box(1000, 10, np.random.default_rng(0), scale=(0.9, 1.0))
    assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2 and top == 0


def test_ranks_get_disjoint_shards_that_cover_the_batches(folder):
    data = load_data("image_folder", str(folder), image_size=32, mean=[0.3] * 3, std=[0.3] * 3,
                     workers=0)
    full = list(_batches(data, seed=2).epoch(1))
    shards = [list(_batches(data, seed=2, rank=r, world_size=2).epoch(1)) for r in (0, 1)]
    for step, (inputs, labels) in enumerate(full):
        for r in (0, 1):  # DistributedSampler's interleave of the same (seed, epoch) batch
            assert torch.equal(shards[r][step][0], inputs[r::2])
            assert torch.equal(shards[r][step][1], labels[r::2])
    positions = [np.concatenate(list(_batches(data, seed=2, rank=r, world_size=2).sampler.batches(1)))
                 for r in (0, 1)]
    assert not set(positions[0]) & set(positions[1])
    assert len(positions[0]) + len(positions[1]) == 60  # 5 batches of 12: all 60 images
    # Evaluation keeps every image once, a short last batch included.
    test = [np.concatenate(list(_batches(data, "test", batch=4, rank=r, world_size=3).sampler.batches(0)))
            for r in range(3)]
    assert sorted(np.concatenate(test).tolist()) == list(range(15))


def test_corrupt_file_is_named_or_skipped_and_counted(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    good = (root / "test" / "class1" / "000.png").read_bytes()
    broken = root / "test" / "class1" / "002.png"
    broken.write_bytes(good[: len(good) // 2])  # a truncated PNG
    data = load_data("image_folder", str(root), image_size=32, mean=[0.3] * 3, std=[0.3] * 3,
                     workers=2)
    with pytest.raises(DataError, match=r"class1/002\.png: not a readable image.*skip_corrupt"):
        list(_batches(data, "test", batch=5).epoch(0))
    data = load_data("image_folder", str(root), image_size=32, mean=[0.3] * 3, std=[0.3] * 3,
                     workers=2, skip_corrupt=True)
    batches = _batches(data, "test", batch=5)
    seen = list(batches.epoch(0))
    assert [len(y) for _, y in seen] == [5, 4, 5]
    assert batches.skipped.count == 1 and batches.skipped.files == [str(broken)]
    list(batches.epoch(0))
    assert batches.skipped.count == 1  # counted per pass


def test_recipe_image_size_defaults_to_the_model(folder):
    recipe = {"data": {"name": "image_folder", "root": str(folder)}}
    assert parse_recipe(recipe).data.image_size == 32  # resnet20's input size
    assert parse_recipe({**recipe, "model": {"name": "resnet18"}}).data.image_size == 224
    assert parse_recipe({"data": {"name": "image_folder", "root": "x", "image_size": 64},
                         "model": {"name": "resnet18"}}).data.image_size == 64
    with pytest.raises(RecipeError, match="both data.mean and data.std"):
        parse_recipe({"data": {"mean": [0.5]}})
    with pytest.raises(RecipeError, match="data.std values must be > 0"):
        parse_recipe({"data": {"mean": [0.5], "std": [0.0]}})


def test_short_training_run_on_the_folder(folder, tmp_path):
    import shutil

    from clicktrain_deploy.export.onnx_export import reference_batches
    from clicktrain_deploy.train import load_checkpoint

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    (root / "test" / "class2" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    raw = {
        "output_dir": str(out), "seed": 1, "keep_checkpoints": 5,
        "model": {"name": "resnet20"},
        "data": {"name": "image_folder", "root": str(root), "image_size": 32, "channels": 3,
                 "batch_size": 12, "test_batch_size": 8, "workers": 2, "skip_corrupt": True},
        "schedule": {"epochs": 2, "lr": 0.05, "threads": 1, "bn_recalibration_batches": 2},
        "pruning": {"method": "dense"},
    }
    result = train(parse_recipe(raw), progress=False)
    row = result.metrics[-1]
    assert row["skipped_test_images"] == 1 and row["skipped_train_images"] == 0
    assert row["images_per_second"] > 0 and math.isfinite(row["train_loss"])
    info = json.loads((out / "data.json").read_text())
    assert info["input_shape"] == [3, 32, 32] and len(info["mean"]) == 3
    saved = load_checkpoint(result.checkpoint)
    assert saved["data"]["mean"] == info["mean"]  # what export writes into clicktrain.model_info
    # Export / validation read the first test images, normalised with the recorded numbers.
    inputs, labels = next(iter(reference_batches(saved, 6).epoch(0)))
    assert inputs.shape == (6, 3, 32, 32) and labels.tolist() == [0] * 5 + [1]
    # Resuming after epoch 0 (other worker count) trains epoch 1 on the same batches.
    other = tmp_path / "resumed"
    shutil.copytree(out, other)
    (other / "checkpoints" / "epoch-0001.pt").unlink()
    resumed = train(parse_recipe({**raw, "output_dir": str(other),
                                  "data": {**raw["data"], "workers": 1}}), resume=True, progress=False)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
