"""Users' own models (model.factory / model.file), pretrained weights (model.weights), the
pruner's conv report, and ClickTrain / ADMM started at epoch 0 from trained weights.

Tiny models on 600 real Fashion-MNIST images, one thread, one or two epochs each.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from clicktrain_deploy import load_checkpoint, parse_recipe, train
from clicktrain_deploy.config import load_recipe
from clicktrain_deploy.errors import ModelError, RecipeError
from clicktrain_deploy.models import build_model
from clicktrain_deploy.pruning.clicktrain import conv_selection
from clicktrain_deploy.pruning.config import PruningConfig
from clicktrain_deploy.train import restore_model
from clicktrain_deploy.train.weights import load_weights

from .conftest import small_recipe

NET = '''
from torch import nn
from tiny_helpers import activation  # a module beside this file


class Net(nn.Module):
    """Stem, a plain 3x3, depthwise 3x3, 1x1, dilated 3x3, grouped 3x3, strided 3x3, classifier."""

    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        w = width
        def block(cin, cout, k=3, stride=1, padding=1, **kw):
            return [nn.Conv2d(cin, cout, k, stride, padding, bias=False, **kw), nn.BatchNorm2d(cout),
                    activation()]
        self.stem = nn.Sequential(*block(in_channels, w, stride=2))
        self.body = nn.Sequential(
            *block(w, w),                                # body.0: taken
            *block(w, w, groups=w),                      # body.3: depthwise
            *block(w, 2 * w, k=1, padding=0),            # body.6: 1x1
            *block(2 * w, 2 * w, padding=2, dilation=2), # body.9: dilated
            *block(2 * w, 2 * w, groups=2),              # body.12: grouped
            *block(2 * w, 2 * w, stride=2))              # body.15: taken
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def make_net(num_classes, in_channels, width=4):
    return Net(num_classes, in_channels, width)


def not_a_model(num_classes):
    return 42
'''


def make_tiny(width: int = 4) -> nn.Module:
    """A factory without num_classes/in_channels parameters: fixed for 1x28x28, 10 classes."""
    return nn.Sequential(nn.Conv2d(1, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1),
                         nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def make_tiny_classes(num_classes: int, in_channels: int, width: int = 4) -> nn.Module:
    model = make_tiny(width)
    model[0] = nn.Conv2d(in_channels, width, 3, 2, 1)
    model[-1] = nn.Linear(width, num_classes)
    return model


@pytest.fixture()
def net_file(tmp_path):
    folder = tmp_path / "user code"
    folder.mkdir()
    (folder / "tiny_helpers.py").write_text("from torch import nn\n\ndef activation():\n    return nn.ReLU6()\n")
    (folder / "net.py").write_text(NET)
    return folder / "net.py"


def _recipe(out: Path, net: Path | None = None, **overrides) -> dict:
    """conftest's small recipe for 1 epoch, of the file model ``net`` (else of ResNet-20)."""
    model = {"file": f"{net}:make_net", "kwargs": {"width": 4}} if net else {}
    model |= overrides.pop("model", {})
    if not {"file", "factory"} & set(model):
        model["name"] = "resnet20"
    base = {"schedule": {"epochs": 1, "bn_recalibration_batches": 2}, "data": {"test_subset": 200}}
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values}
    recipe = small_recipe(out, **base)
    recipe["model"] = model
    return recipe


# ---------------------------------------------------------------- any model

def test_model_file_outside_the_package_with_kwargs(net_file):
    before = list(sys.path)
    model = build_model(file=f"{net_file}:make_net", kwargs={"width": 6}, num_classes=7, in_channels=1)
    assert sys.path == before  # the file's folder was on sys.path only while it ran
    assert model.stem[0].out_channels == 6 and model.head.out_features == 7
    assert isinstance(model.stem[2], nn.ReLU6)  # imported from the module beside the file
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_factory_gets_data_arguments_only_where_its_signature_names_them():
    tiny = build_model(factory="tests.test_user_model:make_tiny", kwargs={"width": 3},
                       num_classes=10, in_channels=1)
    assert tiny[0].out_channels == 3
    sized = build_model(factory="tests.test_user_model:make_tiny_classes", num_classes=5, in_channels=3)
    assert (sized[0].in_channels, sized[-1].out_features) == (3, 5)
    given = build_model(factory="tests.test_user_model:make_tiny_classes",
                        kwargs={"num_classes": 4}, num_classes=5, in_channels=3)
    assert given[-1].out_features == 4  # kwargs win


def test_model_errors_name_the_file_or_callable(net_file, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n    pass\n")
    with pytest.raises(ModelError, match=rf"{re.escape(str(broken))}: syntax error at line 1"):
        build_model(file=f"{broken}:f", num_classes=10, in_channels=1)
    missing_import = tmp_path / "needs.py"
    missing_import.write_text("import no_such_module_here\n")
    before = list(sys.path)
    with pytest.raises(ModelError, match=rf"{re.escape(str(missing_import))}: import failed.*no_such_module_here"):
        build_model(file=f"{missing_import}:f", num_classes=10, in_channels=1)
    assert sys.path == before
    with pytest.raises(ModelError, match=r"nope\.py: file not found"):
        build_model(file=f"{tmp_path}/nope.py:f", num_classes=10, in_channels=1)
    with pytest.raises(ModelError, match=r"net\.py:missing.*no attribute 'missing'"):
        build_model(file=f"{net_file}:missing", num_classes=10, in_channels=1)
    with pytest.raises(ModelError, match=r"net\.py:not_a_model: returned a int, not a torch.nn.Module"):
        build_model(file=f"{net_file}:not_a_model", num_classes=10, in_channels=1)
    with pytest.raises(ModelError, match=r"make_tiny'.*raised TypeError"):
        build_model(factory="tests.test_user_model:make_tiny", kwargs={"depth": 3}, num_classes=10,
                    in_channels=1)
    with pytest.raises(ModelError, match=r"'no_such_pkg.mod:f': cannot import 'no_such_pkg.mod'"):
        build_model(factory="no_such_pkg.mod:f", num_classes=10, in_channels=1)


@pytest.mark.parametrize(("model", "message"), [
    ({"name": "resnet20", "file": "n.py:f"}, "model: give exactly one of model.name, model.factory, "
                                             "model.file (got name, file)"),
    ({"factory": "pkg.mod:f", "file": "n.py:f"}, "model: give exactly one of model.name, model.factory, "
                                                  "model.file (got factory, file)"),
    ({"factory": "pkg.mod"}, "model.factory: 'pkg.mod' must be 'package.module:callable'"),
    ({"file": "net.txt:f"}, "model.file: 'net.txt:f' must be 'path/to/net.py:callable'"),
    ({"name": "resnet20", "kwargs": {"width": 2}}, "model: model.kwargs is for model.factory or model.file"),
    ({"name": "alexnet"}, "model: unknown model 'alexnet'"),
])
def test_model_section_errors_name_the_field(model, message):
    with pytest.raises(RecipeError, match=re.escape(f"r.toml: {message}")):
        parse_recipe({"model": model}, "r.toml")
    assert parse_recipe({}).model.name == "resnet20"  # none given: the registry default


def test_paths_are_relative_to_the_recipe_file(tmp_path, net_file):
    (tmp_path / "w.pt").write_bytes(b"")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nfile = "user code/net.py:make_net"\nkwargs = { width = 2 }\n'
                      'weights = "w.pt"\n[pruning]\nmethod = "dense"\n')
    loaded = load_recipe(recipe)
    assert loaded.model.file == f"{net_file.resolve()}:make_net"
    assert loaded.model.weights == str((tmp_path / "w.pt").resolve())


@pytest.mark.parametrize(("pruning", "message"), [
    ({"select_epoch": 0, "hard_prune_epoch": 1}, "select_epoch = 0 with method 'clicktrain'.*model.weights"),
    ({"method": "admm", "select_epoch": 0, "hard_prune_epoch": 1}, "ADMM after training needs a trained model"),
])
def test_select_epoch_0_needs_weights(pruning, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"schedule": {"epochs": 2}, "pruning": pruning})
    parse_recipe({"schedule": {"epochs": 2}, "pruning": pruning, "model": {"weights": "w.pt"}})


def test_logits_that_do_not_fit_the_data_are_refused(tmp_path, fmnist):
    raw = _recipe(tmp_path / "run", model={"factory": "tests.test_user_model:make_tiny_classes",
                                          "kwargs": {"num_classes": 3}}, pruning={"method": "dense"})
    with pytest.raises(ModelError, match=r"returns \(1, 3\).*10 classes"):
        train(parse_recipe(raw), progress=False)


# ---------------------------------------------------------------- conv report

def test_conv_report_names_every_conv_taken_or_left_with_its_reason(net_file):
    model = build_model(file=f"{net_file}:make_net", num_classes=10, in_channels=1)
    by_name = {c.name: c for c in conv_selection(model, PruningConfig(block_size=4))}
    assert list(by_name) == ["stem.0", "body.0", "body.3", "body.6", "body.9", "body.12", "body.15"]
    assert [n for n, c in by_name.items() if c.taken] == ["body.0", "body.15"]
    assert by_name["stem.0"].reason == "stem (first conv) skipped: pruning.skip_first_conv"
    assert by_name["body.3"].reason == "depthwise (groups = C_in = 4)"
    assert by_name["body.6"].reason == "1x1"
    assert by_name["body.9"].reason == "dilated (dilation 2x2)"
    assert by_name["body.12"].reason == "grouped (groups = 2)"
    assert by_name["body.12"].shape == (8, 4, 3, 3)
    assert by_name["body.0"].reason == "3x3, block 4, ratio 0.72"
    excluded = conv_selection(model, PruningConfig(exclude=["body.1*"]))
    assert {c.name: c.reason for c in excluded}["body.15"] == "excluded by pruning.exclude 'body.1*'"


def test_run_prints_and_records_the_conv_report(tmp_path, net_file, fmnist):
    weights = tmp_path / "w.pt"
    torch.save(build_model(file=f"{net_file}:make_net", kwargs={"width": 4}, num_classes=10,
                           in_channels=1).state_dict(), weights)
    console = Console(record=True, width=200)
    raw = _recipe(tmp_path / "run", net_file, model={"weights": str(weights)},
                  pruning={"select_epoch": 0, "hard_prune_epoch": 0})
    result = train(parse_recipe(raw), progress=True, console=console)
    shown = console.export_text()
    assert "pattern pruning takes 2 of 7 convs" in shown
    assert "body.9" in shown and "dilated (dilation 2x2)" in shown
    recorded = json.loads((result.output_dir / "conv_selection.json").read_text())
    assert {r["name"]: (r["taken"], r["reason"]) for r in recorded}["body.3"] == (
        False, "depthwise (groups = C_in = 4)")
    assert {r["name"] for r in recorded if r["taken"]} == set(result.pruner.masks)


# ---------------------------------------------------------------- weights

def test_strict_loading_names_missing_unexpected_and_mismatched_keys(tmp_path, net_file):
    model = build_model(file=f"{net_file}:make_net", num_classes=10, in_channels=1)
    state = model.state_dict()
    state.pop("body.0.weight")
    state["extra.bias"] = torch.zeros(3)
    state["head.weight"] = torch.zeros(5, 8)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as caught:
        load_weights(model, path)
    message = str(caught.value)
    assert str(path) in message
    assert "missing keys (1): body.0.weight" in message
    assert "unexpected keys (1): extra.bias" in message
    assert "shape mismatches (1): head.weight (file (5, 8), model (10, 8))" in message
    torch.save({"not": "tensors"}, path)
    with pytest.raises(ModelError, match=rf"{re.escape(str(path))}: holds a dict that is neither a state_dict"):
        load_weights(model, path)
    path.write_bytes(b"garbage")
    with pytest.raises(ModelError, match=rf"{re.escape(str(path))}: not a readable state_dict or checkpoint"):
        load_weights(model, path)
    with pytest.raises(ModelError, match=r"nothing\.pt: file not found"):
        load_weights(model, tmp_path / "nothing.pt")


@pytest.fixture()
def trained(tmp_path, net_file, fmnist):
    """A dense run of the file model (1 epoch) and its weights as a plain state_dict."""
    run = train(parse_recipe(_recipe(tmp_path / "dense", net_file, pruning={"method": "dense"})),
                progress=False)
    weights = tmp_path / "dense.pt"
    torch.save(run.model.state_dict(), weights)
    return run, weights


def test_clicktrain_selects_at_epoch_0_from_trained_weights(tmp_path, net_file, trained):
    dense, weights = trained
    raw = _recipe(tmp_path / "ct", net_file, model={"weights": str(weights)},
                  schedule={"epochs": 2}, pruning={"select_epoch": 0, "hard_prune_epoch": 1})
    run = train(parse_recipe(raw), progress=False)
    assert [m["phase"] for m in run.metrics] == ["regularize", "hard"]
    assert set(run.pruner.masks) == {"body.0", "body.15"}
    weight = run.model.body[0].weight.detach()
    mask = run.pruner.masks["body.0"].dense(run.pruner.library)
    assert (weight[mask == 0] == 0).all() and run.metrics[-1]["pruned_layer_compression"] > 2
    # the weights were the trained ones: the first epoch starts where the dense run ended
    assert run.metrics[0]["train_loss"] < dense.metrics[0]["train_loss"]


def test_admm_from_weights_skips_its_dense_phase(tmp_path, net_file, trained):
    _, weights = trained
    raw = _recipe(tmp_path / "admm", net_file, model={"weights": str(weights)}, schedule={"epochs": 2},
                  pruning={"method": "admm", "select_epoch": 0, "hard_prune_epoch": 1,
                           "admm": {"update_interval": 4}})
    run = train(parse_recipe(raw), progress=False)
    phases = [m["phase"] for m in run.metrics]
    assert phases == ["admm", "hard"] and "dense" not in phases
    assert run.metrics[0]["lasso_penalty"] > 0  # the ADMM term from the first step
    assert run.metrics[-1]["pruned_layer_compression"] > 2


def test_our_checkpoint_as_weights_and_resume_without_the_file(tmp_path, net_file, trained):
    dense, _ = trained
    checkpoint = dense.checkpoint
    raw = _recipe(tmp_path / "from_ckpt", net_file, model={"weights": str(checkpoint)},
                  pruning={"method": "dense"})
    run = train(parse_recipe(raw), progress=False)
    assert run.metrics[0]["train_loss"] < dense.metrics[0]["train_loss"]
    model, _ = restore_model(load_checkpoint(run.output_dir))
    for key, value in run.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_prunetrain_checkpoint_as_weights_shrinks_first(tmp_path, fmnist):
    tiny = {"train_subset": 100, "test_subset": 100}
    raw = _recipe(tmp_path / "pt", data=tiny, pruning={"method": "prunetrain"})
    run = train(parse_recipe(raw), progress=False)
    saved = load_checkpoint(run.output_dir)
    model, method = restore_model(saved)
    with torch.no_grad():  # kill channels 0-3 of the first stage's first conv: the method removes them
        model.layers[0][0].conv1.weight[:4] = 0
        model.layers[0][0].bn1.weight[:4] = 0
        model.layers[0][0].conv2.weight[:, :4] = 0
    assert method.reconfigure() >= 4
    saved["model"], saved["pruner"] = model.state_dict(), method.state_dict()
    shrunk = tmp_path / "shrunk.pt"
    torch.save({k: v for k, v in saved.items() if k != "path"}, shrunk)
    width = model.layers[0][0].conv1.out_channels
    assert width <= 12

    raw = _recipe(tmp_path / "from_pt", data=tiny, model={"weights": str(shrunk)},
                  pruning={"method": "dense"})
    result = train(parse_recipe(raw), progress=False)
    assert result.model.layers[0][0].conv1.out_channels == width
    shrunk.unlink()  # export, report and resume need only the run's own checkpoint
    restored, _ = restore_model(load_checkpoint(result.output_dir))
    assert restored.layers[0][0].conv1.out_channels == width
    # that run's checkpoint as weights: the recorded shrink comes with it
    fresh = parse_recipe(raw).model.build(10, 1)
    load_weights(fresh, result.checkpoint)
    assert fresh.layers[0][0].conv1.out_channels == width
    # a full-width state_dict does not fit a shrunk model: strict loading says which keys
    plain = tmp_path / "plain.pt"
    torch.save(restored.state_dict(), plain)
    fresh = parse_recipe(raw).model.build(10, 1)
    with pytest.raises(ModelError, match=r"layers\.0\.0\.conv1\.weight \(file \(\d+, 16, 3, 3\), model "
                                         r"\(16, 16, 3, 3\)\)"):
        load_weights(fresh, plain)
