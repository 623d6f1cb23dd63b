"""Baseline methods behind the pruning contract: PruneTrain and ADMM pruning after training.

PruneTrain's reconfiguration, resume and export run on real Fashion-MNIST images; the ADMM
projections are checked against the pattern and connectivity sets exactly.
"""
from __future__ import annotations

import typing

import onnx
import pytest
import torch

from clicktrain_deploy import distributed, export_onnx, parse_recipe, train
from clicktrain_deploy.data import BatchIterator
from clicktrain_deploy.errors import RecipeError
from clicktrain_deploy.models import create_model
from clicktrain_deploy.pruning import PRUNING_METHODS, PruningConfig, create_method
from clicktrain_deploy.pruning.admm import project_connectivity, project_patterns
from clicktrain_deploy.pruning.masks import block_sum, removal_count
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES
from clicktrain_deploy.train import load_checkpoint, restore_model
from clicktrain_deploy.train.trainer import make_scheduler

from .conftest import small_recipe, without_wall_clock

# Channels go once every weight touching them is below 0.2: with a strong lasso this removes
# channels within the first epochs of a 600-image run, which is what these tests need.
SHRINKING = {"method": "prunetrain", "prunetrain": {"penalty_ratio": 0.5, "interval": 1, "threshold": 0.2}}


def _real_images(fmnist, count: int = 64) -> torch.Tensor:
    batches = BatchIterator(fmnist.test, count, fmnist.mean, fmnist.std, train=False)
    return next(iter(batches.epoch(0)))[0]


def test_recipe_methods_and_registered_methods_are_the_same_set():
    # a recipe may name exactly what the trainer can create: nothing accepted and then missing
    accepted = set(typing.get_args(PruningConfig.model_fields["method"].annotation))
    assert accepted == set(PRUNING_METHODS.names())


@pytest.mark.parametrize("name", ["admm", "clicktrain", "dense", "prunetrain"])
def test_every_method_keeps_the_trainer_contract_and_its_state_round_trips(name):
    torch.manual_seed(0)
    config = PruningConfig(method=name)
    method = create_method(create_model("resnet20", 10, 1), config)
    for hook in ("phase", "begin_epoch", "penalty_term", "after_step", "end_epoch", "state_dict",
                 "load_state_dict", "report"):
        assert callable(getattr(method, hook)), hook
    assert method.phase(0) in {"dense", "regularize", "admm", "hard"}
    state = method.state_dict()
    fresh = create_method(create_model("resnet20", 10, 1), config)
    fresh.load_state_dict(state)
    assert distributed.digest({"state": fresh.state_dict()}) == distributed.digest({"state": state})


@torch.no_grad()
def test_reconfiguration_removing_zero_channels_keeps_outputs(fmnist):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    for module in model.modules():  # non-trivial BN so that a wrong slice would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
    method = create_method(model, PruningConfig(method="prunetrain"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():  # momentum buffers to be sliced along with the weights
        optimizer.state[param]["momentum_buffer"] = torch.randn_like(param)
    nodes = {node.name: node for node in method.nodes}
    # the stem + stage-0 residual stream (shared by 7 convs), an inner node, the stream into fc
    dead = {"conv1": [1, 5], "layers.1.1.conv1": [0, 2, 3], "layers.2": [7, 60]}
    for name, channels in dead.items():
        for conv, _ in nodes[name].producers:
            conv.weight[channels] = 0
        for reader in nodes[name].consumers:
            reader.weight[:, channels] = 0
    # dead everywhere but in one reader (the next stage's shortcut): the union keeps it
    for conv, _ in nodes["layers.1"].producers:
        conv.weight[4] = 0
    for reader in nodes["layers.1"].consumers[:-1]:
        reader.weight[:, 4] = 0
    fc_weight = nodes["layers.2"].consumers[-1].weight
    fc_momentum = optimizer.state[fc_weight]["momentum_buffer"].clone()
    images = _real_images(fmnist)
    model.eval()
    before = model(images)
    assert method.reconfigure(optimizer) == 7
    after = model(images)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert model.conv1.weight.shape == (14, 1, 3, 3) and model.bn1.num_features == 14
    assert model.layers[0][2].conv2.weight.shape[0] == 14
    assert model.layers[1][0].shortcut[0].weight.shape == (32, 14, 1, 1)
    assert model.layers[1][1].conv1.weight.shape[0] == 29 and model.layers[1][1].conv2.in_channels == 29
    assert model.fc.weight.shape == (10, 62) and model.fc.in_features == 62
    keep = [c for c in range(64) if c not in (7, 60)]
    assert torch.equal(optimizer.state[fc_weight]["momentum_buffer"], fc_momentum[:, keep])
    assert torch.equal(method.channels["layers.2"], torch.tensor(keep))
    assert method.reconfigure(optimizer) == 0  # nothing else is dead
    # the report counts against the original widths: removed channels are zeros
    full = create_model("resnet20", 10, 1)
    assert method.report(model).layers == []
    conv_weights = sum(m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Conv2d)
                       and m.kernel_size == (3, 3))
    kept = sum(int(m.weight.ne(0).sum()) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
               and m.kernel_size == (3, 3))
    assert method.report(model).compression["paper_convs"] == pytest.approx(conv_weights / kept, rel=1e-3)


def test_admm_projections_land_exactly_on_the_sets():
    torch.manual_seed(0)
    weight = torch.randn(24, 16, 3, 3)
    library = PATTERN_LIBRARIES.get("clicktrain8")()
    for block in (1, 4):
        z = project_patterns(weight, library, block)
        nonzero = z.flatten(2).ne(0)  # (24, 16, 9)
        in_library = (nonzero[:, :, None, :] == library[None, None]).all(-1).any(-1)
        assert in_library.all()  # every kernel is exactly one library pattern
        shared = nonzero.view(24 // block, block, 16, 9)
        assert (shared == shared[:, :1]).all()  # a block shares its patterns
        assert torch.equal(z[nonzero.view_as(z)], weight[nonzero.view_as(z)])  # kept taps unchanged
        torch.testing.assert_close(project_patterns(z, library, block), z, rtol=0, atol=0)
        # nearest point: no other pattern keeps more of any group's energy
        energy = block_sum(weight.double().pow(2).flatten(2), block)  # (G, 16, 9)
        best = (energy @ library.double().T).amax(-1)
        kept = block_sum(z.double().pow(2).flatten(2), block).sum(-1)
        torch.testing.assert_close(kept, best)
        y = project_connectivity(weight, block, 0.7)
        kept_kernels = y.flatten(2).ne(0).any(-1)  # (24, 16)
        groups = kept_kernels.view(24 // block, block, 16)
        assert (groups == groups[:, :1]).all()  # a block keeps or removes together
        assert int((~groups[:, 0]).sum()) == removal_count(24 // block * 16, 0.7)
        norms = block_sum(weight.pow(2).sum((2, 3)), block)
        assert norms[~groups[:, 0]].max() <= norms[groups[:, 0]].min()  # the weakest went
        assert torch.equal(y[kept_kernels], weight[kept_kernels])  # the rest is untouched
        assert torch.equal(project_connectivity(y, block, 0.7), y)


@pytest.fixture(scope="module")
def prunetrain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prunetrain")
    recipe = small_recipe(out / "run", pruning=SHRINKING, schedule={"epochs": 3})
    return train(parse_recipe(recipe), progress=False), recipe


def test_prunetrain_run_shrinks_the_model_and_learns(prunetrain_run):
    result, _ = prunetrain_run
    phases = [m["phase"] for m in result.metrics]
    assert phases == ["regularize"] * 3
    assert result.metrics[0]["lasso_penalty"] > 0
    flops = [m["train_flops"] for m in result.metrics]
    assert flops[0] > flops[1] >= flops[2]  # training gets cheaper as the model shrinks
    assert result.report.compression["paper_convs"] > 1.2
    model, method = restore_model(load_checkpoint(result.output_dir))
    assert method.masks == {}  # no patterns: exported without pattern metadata
    full = create_model("resnet20", 10, 1)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * sum(p.numel() for p in full.parameters())
    widths = create_method(full, PruningConfig(method="prunetrain")).widths
    assert sum(len(c) for c in method.channels.values()) < sum(widths.values())
    assert result.test_accuracy > 30.0  # chance is 10%


def test_prunetrain_resume_after_shrinking_matches(prunetrain_run):
    result, recipe = prunetrain_run
    checkpoints = sorted((result.output_dir / "checkpoints").iterdir())
    final = load_checkpoint(checkpoints[-1])
    widths = create_method(create_model("resnet20", 10, 1), PruningConfig(method="prunetrain")).widths
    resumed_from = load_checkpoint(checkpoints[1])["pruner"]["channels"]
    assert sum(len(c) for c in resumed_from.values()) < sum(widths.values())  # already shrunk
    checkpoints[-1].unlink()  # as if the run died after epoch 1
    resumed = train(parse_recipe(recipe), resume=True, progress=False)
    assert without_wall_clock(resumed.metrics) == without_wall_clock(result.metrics)
    again = load_checkpoint(resumed.output_dir)
    for name, channels in final["pruner"]["channels"].items():
        assert torch.equal(again["pruner"]["channels"][name], channels), name
    for key, value in final["model"].items():
        assert torch.equal(again["model"][key], value), key


def test_shrunk_model_exports_and_agrees_in_onnxruntime(prunetrain_run, tmp_path):
    result, _ = prunetrain_run
    exported = export_onnx(result.output_dir, tmp_path / "shrunk.onnx", check_images=200)
    assert exported.metadata is None
    assert exported.agreement.within(1e-4, 1e-4) and exported.agreement.images == 200
    proto = onnx.load(str(tmp_path / "shrunk.onnx"))
    shapes = [list(t.dims) for t in proto.graph.initializer if len(t.dims) == 4]
    model, _ = restore_model(load_checkpoint(result.output_dir))
    assert sorted(shapes) == sorted(list(m.weight.shape) for m in model.modules()
                                    if isinstance(m, torch.nn.Conv2d))
    assert sum(s[0] * s[1] for s in shapes) < sum(m.weight.shape[0] * m.weight.shape[1] for m in
                                                  create_model("resnet20", 10, 1).modules()
                                                  if isinstance(m, torch.nn.Conv2d))


def test_admm_run_ends_on_library_patterns_and_exports_them(tmp_path):
    recipe = small_recipe(tmp_path / "admm", schedule={"epochs": 3, "restarts": [1, 2], "restart_lr": 0.02},
                          pruning={"method": "admm", "select_epoch": 1, "hard_prune_epoch": 2,
                                   "admm": {"rho": 0.1, "update_interval": 4}})
    result = train(parse_recipe(recipe), progress=False)
    assert [m["phase"] for m in result.metrics] == ["dense", "admm", "hard"]
    assert result.metrics[1]["lasso_penalty"] > 0 and result.metrics[2]["lasso_penalty"] == 0
    assert 7.0 < result.report.compression["pruned_layers"] < 8.0  # 9/4 / 0.3 at 70% removed
    assert result.metrics[2]["train_flops"] < result.metrics[1]["train_flops"] / 3
    model, method = restore_model(load_checkpoint(result.output_dir))
    modules = dict(model.named_modules())
    for name, mask in method.masks.items():
        assert torch.equal(modules[name].weight.flatten(2).ne(0), mask.dense(method.library).flatten(2).bool())
    assert result.test_accuracy > 20.0  # chance is 10%; one short retraining epoch
    exported = export_onnx(result.output_dir, tmp_path / "admm.onnx", check_images=100)
    assert len(exported.metadata.layers) == 18


def test_lr_restarts_start_each_segment_over():
    recipe = parse_recipe({"schedule": {"epochs": 6, "lr": 0.1, "restarts": [2, 4], "restart_lr": 0.01}})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch=10)
    lrs = []
    for _ in range(60):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01) and lrs[40] == pytest.approx(0.01)
    assert lrs[19] < 0.002 and lrs[39] < 0.0002 and lrs[30] == pytest.approx(0.005)


@pytest.mark.parametrize("raw, field", [
    ({"pruning": {"method": "prunetrain", "prunetrain": {"penalty_ratio": 1.5}}},
     "pruning.prunetrain.penalty_ratio"),
    ({"pruning": {"method": "admm", "admm": {"rho": 0}}}, "pruning.admm.rho"),
    ({"pruning": {"method": "admm", "select_epoch": 2, "hard_prune_epoch": 2}}, "pruning.hard_prune_epoch"),
    ({"pruning": {"method": "admm", "admm": {"rhoo": 1}}}, "pruning.admm.rhoo"),
    ({"schedule": {"epochs": 4, "restarts": [4]}}, "schedule.restarts"),
    ({"pruning": {"method": "pruntrain"}}, "pruning.method"),
])
def test_method_fields_are_validated_by_name(raw, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        parse_recipe(raw, "r.toml")
