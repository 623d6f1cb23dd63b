"""Shared fixtures: real Fashion-MNIST (Debian's dataset-fashion-mnist) and small recipes."""
from __future__ import annotations

from pathlib import Path

import pytest

from clicktrain_deploy.data.datasets import FASHION_MNIST_ROOT, fashion_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fmnist():
    """The real Fashion-MNIST train/test splits (the README's setup installs them)."""
    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.fail(f"{FASHION_MNIST_ROOT} missing: apt-get install dataset-fashion-mnist")
    return fashion_mnist()


def small_recipe(output_dir: Path, **overrides) -> dict:
    """A recipe that trains ResNet-20 on 600 real images for 4 epochs (a few seconds)."""
    recipe = {
        "output_dir": str(output_dir),
        "seed": 3,
        "keep_checkpoints": 10,
        "model": {"name": "resnet20"},
        "data": {"name": "fashion_mnist", "train_subset": 600, "batch_size": 50,
                 "test_batch_size": 500},
        "schedule": {"epochs": 4, "lr": 0.05, "threads": 1},
        "pruning": {"select_epoch": 1, "hard_prune_epoch": 2, "connectivity_ratio": 0.7,
                    "block_size": 4, "importance_batches": 2, "lasso": 1e-2},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            recipe[section] = {**recipe.get(section, {}), **values}
        else:
            recipe[section] = values
    return recipe


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A ClickTrain run (B=4, 3 epochs on real images) and its ONNX export."""
    from clicktrain_deploy import export_onnx, parse_recipe, train

    out = tmp_path_factory.mktemp("export")
    run = train(parse_recipe(small_recipe(out / "run", schedule={"epochs": 3})), progress=False)
    return run, export_onnx(run.output_dir, out / "model.onnx", check_images=200)


WALL_CLOCK_METRICS = ("epoch_seconds", "images_per_second")


def without_wall_clock(metrics: list[dict]) -> list[dict]:
    """Metrics rows without what measures time (a resumed or other-rank run differs only there)."""
    return [{k: v for k, v in m.items() if k not in WALL_CLOCK_METRICS} for m in metrics]


def onnxruntime_and_torch(model, x):
    """(onnxruntime's, torch's) logits of ``model`` exported by torch.onnx (TorchScript exporter,
    opset 17) and run on ``x``: for tests that compare the two."""
    import io
    import warnings

    import onnxruntime
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        return logits, model(x).numpy()
