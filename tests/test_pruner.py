import pytest
import torch
from torch import nn

from clicktrain_deploy.errors import PruningError
from clicktrain_deploy.models import create_model
from clicktrain_deploy.pruning.clicktrain import ClickTrainPruner, resolve_layers
from clicktrain_deploy.pruning.config import PruningConfig


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def test_default_selection_skips_stem_and_1x1_shortcuts():
    model = create_model("resnet20", 10, 1)
    layers = resolve_layers(model, PruningConfig())
    names = [l.name for l in layers]
    assert "conv1" not in names and len(names) == 18
    assert not any("shortcut" in n for n in names)
    assert {l.block_size for l in layers} == {16}


def test_layer_overrides_by_glob():
    model = create_model("resnet20", 10, 1)
    config = PruningConfig(layer_ratios={"layers.2.*": 0.8}, layer_block_sizes={"layers.0.*": 4},
                           block_size=8)
    by_name = {l.name: l for l in resolve_layers(model, config)}
    assert by_name["layers.2.0.conv1"].ratio == 0.8 and by_name["layers.1.0.conv1"].ratio == 0.72
    assert by_name["layers.0.1.conv2"].block_size == 4 and by_name["layers.1.0.conv2"].block_size == 8


def test_auto_block_size_falls_back_to_a_divisor():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 24, 3), nn.Conv2d(24, 12, 3))
    sizes = [l.block_size for l in resolve_layers(model, PruningConfig())]
    assert sizes == [8, 4]  # 24 -> 8, 12 -> 4


def test_errors_name_the_layer_or_glob():
    model = create_model("resnet20", 10, 1)
    with pytest.raises(PruningError, match="layers.1.0.shortcut.0.*only 3x3"):
        resolve_layers(model, PruningConfig(include=["layers.1.0.shortcut.0"]))
    with pytest.raises(PruningError, match="pruning.include: 'features.*' selects no"):
        resolve_layers(model, PruningConfig(include=["features.*"]))
    with pytest.raises(PruningError, match="pruning.layer_ratios"):
        resolve_layers(model, PruningConfig(layer_ratios={"nope*": 0.5}))


@pytest.mark.parametrize("block", [1, 16])
def test_pruned_weights_stay_zero_through_sgd_with_momentum_and_weight_decay(block):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    pruner = ClickTrainPruner(model, PruningConfig(block_size=block))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = _batches(4)
    # momentum built up before hardening must not revive pruned weights afterwards
    for x, y in batches[:2]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    pruner.select(model, batches[:1], nn.functional.cross_entropy)
    pruner.harden(optimizer)
    for x, y in batches * 2:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for layer in pruner.layers:
            removed = pruner._mask_tensors[layer.name] == 0
            assert (layer.module.weight.grad[removed] == 0).all()
        optimizer.step()
        # no enforce() call: gradient masks and zeroed momentum alone must keep zeros at zero
        for layer in pruner.layers:
            removed = pruner._mask_tensors[layer.name] == 0
            assert (layer.module.weight[removed] == 0).all(), layer.name
            assert (layer.module.weight[~removed] != 0).all(), layer.name


def test_penalty_pulls_only_the_weights_to_be_removed():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    pruner = ClickTrainPruner(model, PruningConfig(block_size=4))
    pruner.select(model, _batches(1), nn.functional.cross_entropy)
    model.zero_grad()
    pruner.penalty().backward()
    for layer in pruner.layers:
        kept = pruner._mask_tensors[layer.name] == 1
        grad = layer.module.weight.grad
        assert (grad[kept] == 0).all() and (grad[~kept] != 0).any()


def test_state_dict_round_trip_gives_identical_masks():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    pruner = ClickTrainPruner(model, PruningConfig())
    pruner.select(model, _batches(1), nn.functional.cross_entropy)
    other = ClickTrainPruner(model, PruningConfig())
    other.load_state_dict(pruner.state_dict())
    assert torch.equal(other.library, pruner.library)
    for name, mask in pruner.masks.items():
        assert torch.equal(other.masks[name].pattern_ids, mask.pattern_ids)
    with pytest.raises(PruningError, match="do not match"):
        ClickTrainPruner(model, PruningConfig(block_size=4)).load_state_dict(pruner.state_dict())
