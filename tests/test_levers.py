"""ClickTrain's accuracy levers (issue #15) on ResNet-20 and real Fashion-MNIST images: global
per-layer allocation, distillation from the dense warm-up model, re-selection during the lasso
phase, the lasso ramp, BatchNorm recalibration; their recipe fields and metrics."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clicktrain_deploy import parse_recipe, train
from clicktrain_deploy.data import BatchIterator
from clicktrain_deploy.errors import PruningError, RecipeError
from clicktrain_deploy.models import create_model
from clicktrain_deploy.pruning import ClickTrainPruner, EpochContext, PruningConfig, sparsity_report
from clicktrain_deploy.pruning.clicktrain import estimate_importance, lasso_coefficient
from clicktrain_deploy.pruning.masks import REMOVED, group_lasso, group_tap_importance
from clicktrain_deploy.train import load_checkpoint
from clicktrain_deploy.train.trainer import distillation_loss, recalibrate_batchnorm, snapshot_teacher

from .conftest import small_recipe, without_wall_clock

LOSS = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def images(fmnist):
    """Three batches of 32 real training images (normalised, not augmented)."""
    torch.set_num_threads(2)
    return list(BatchIterator(fmnist.train, 32, fmnist.mean, fmnist.std, train=False).epoch(0, limit=3))


def _context(model, optimizer, images, epoch: int, steps: int) -> EpochContext:
    return EpochContext(epoch, 4, steps, model, optimizer, lambda limit: images[:limit], LOSS)


def _allocated(config: PruningConfig, images) -> tuple[nn.Module, ClickTrainPruner, float]:
    """A fresh ResNet-20 (seed 0) pruned hard by ``config`` on its importance over ``images``:
    the model, its pruner and the conv compression the paper counts."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    pruner = ClickTrainPruner(model, config)
    pruner.select(model, images, LOSS)
    pruner.harden(torch.optim.SGD(model.parameters(), lr=0.1))
    return model, pruner, sparsity_report(model, pruner.masks, pruner.library).compression["paper_convs"]


def test_global_allocation_meets_the_target_and_ranks_groups_across_layers(images):
    config = PruningConfig(allocation="global", target_compression=8.0, min_layer_ratio=0.3,
                           max_layer_ratio=0.9, block_size=4, importance_batches=2)
    model, pruner, achieved = _allocated(config, images[:2])
    assert 8.0 <= achieved < 8.0 * 1.02
    ratios = pruner.epoch_metrics()["layer_ratios"]
    assert len(ratios) == 18 and len(set(ratios.values())) > 5
    assert all(0.3 <= r <= 0.9 for r in ratios.values())
    # one ranking: a layer not at its floor removes nothing scored above what a layer not at its
    # ceiling keeps, scores being importance relative to the layer's mean
    importance = estimate_importance(model.train(), pruner.layers, images[:2], LOSS)
    removed_max, kept_min = 0.0, float("inf")
    for layer in pruner.layers:
        group = group_tap_importance(importance[layer.name], layer.block_size).sum(-1)
        score = group / group.mean()
        gone = pruner.masks[layer.name].pattern_ids == REMOVED
        if ratios[layer.name] > 0.3 + 1 / gone.numel():
            removed_max = max(removed_max, float(score[gone].max()))
        if ratios[layer.name] < 0.9 - 1 / gone.numel():
            kept_min = min(kept_min, float(score[~gone].min()))
    assert removed_max <= kept_min
    with pytest.raises(PruningError, match="target_compression 30x is out of reach"):
        ClickTrainPruner(model, config.model_copy(update={"target_compression": 30.0})).select(
            model, images[:1], LOSS)


@pytest.mark.parametrize("block_size", [16, 1])
def test_erk_allocation_meets_the_target_and_keeps_more_of_narrow_layers(images, block_size):
    config = PruningConfig(allocation="erk", target_compression=8.0, min_layer_ratio=0.0,
                           max_layer_ratio=0.95, block_size=block_size, importance_batches=1)
    model, pruner, achieved = _allocated(config, images[:1])
    assert 8.0 <= achieved < 8.0 * 1.02
    ratios = pruner.epoch_metrics()["layer_ratios"]
    assert pruner.epoch_metrics()["target_compression"] == 8.0
    # kept share proportional to (C_in + C_out) / (C_in C_out): 64 -> 32 -> 16 channels halves
    # it twice, up to the rounding of whole kernel groups
    kept = {name: 1 - ratio for name, ratio in ratios.items()}
    for narrow, wide in [("layers.0.1.conv1", "layers.1.1.conv1"), ("layers.1.1.conv1", "layers.2.1.conv1")]:
        assert kept[narrow] / kept[wide] == pytest.approx(2.0, rel=0.15)
    assert kept["layers.1.0.conv1"] == pytest.approx(kept["layers.1.1.conv1"] * 48 / 64 * 2, rel=0.15)
    # the bounds hold, and a target the bounds cannot reach is refused with the reachable range
    bounded = config.model_copy(update={"min_layer_ratio": 0.5, "max_layer_ratio": 0.75})
    pruner = ClickTrainPruner(model, bounded)
    pruner.select(model, images[:1], LOSS)
    assert all(0.5 <= r <= 0.75 + 1 / 16 for r in pruner.epoch_metrics()["layer_ratios"].values())
    with pytest.raises(PruningError, match=r"8x is out of reach: .* allocation 'erk' gives 4\.\d\dx to (4\.9|5\.0)\dx"):
        ClickTrainPruner(model, bounded.model_copy(update={"max_layer_ratio": 0.55})).select(
            model, images[:1], LOSS)


def _unmasked_squared_gradients(model, layers, inputs, labels) -> dict[str, torch.Tensor]:
    """(dL/dw)^2 of each layer's weight on one batch in training mode, on fresh leaf tensors (no
    gradient-mask hook) and copies of the buffers (BatchNorm statistics left as they were)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = LOSS(torch.func.functional_call(model.train(), {**params, **buffers}, (inputs,)), labels)
    grads = torch.autograd.grad(loss, [params[f"{l.name}.weight"] for l in layers])
    return {l.name: g.pow(2) for l, g in zip(layers, grads)}


def test_regrowth_swaps_the_weakest_kept_groups_for_the_removed_ones_with_most_gradient(images):
    config = PruningConfig(block_size=4, importance_batches=1, regrow_every=1, regrow_fraction=0.3,
                           select_epoch=1, hard_prune_epoch=3)
    model, pruner, _ = _allocated(config, images[:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    LOSS(model(images[1][0]), images[1][1]).backward()
    optimizer.step()  # weights (and momentum) move within the masks
    pruner.enforce(optimizer)
    # the share: 0.3 * (1 + cos(pi k / K)) / 2 at the k-th of the K = 4 epochs after the hard prune
    assert [pruner.regrow_share(e, 7) for e in range(7)] == pytest.approx(
        [0, 0, 0, 0, 0.3 * 0.8535534, 0.3 * 0.5, 0.3 * 0.1464466])
    every_2 = ClickTrainPruner(model, config.model_copy(update={"regrow_every": 2}))
    assert every_2.regrow_share(4, 7) == 0 and every_2.regrow_share(5, 7) == pytest.approx(0.15)
    before = {name: m.pattern_ids.clone() for name, m in pruner.masks.items()}
    weights = {l.name: l.module.weight.detach().clone() for l in pruner.layers}
    gradients = _unmasked_squared_gradients(model, pruner.layers, *images[2])
    swapped = pruner.regrow(model, images[2:3], LOSS, 0.2, optimizer)
    expected = 0
    for layer in pruner.layers:
        old, new = before[layer.name], pruner.masks[layer.name].pattern_ids
        kept_before, kept_after = old != REMOVED, new != REMOVED
        count = int(0.2 * int(kept_before.sum()))
        expected += count
        assert int(kept_after.sum()) == int(kept_before.sum())  # compression unchanged
        dropped, grown = kept_before & ~kept_after, kept_after & ~kept_before
        assert int(dropped.sum()) == int(grown.sum()) == count
        assert torch.equal(new[kept_before & kept_after], old[kept_before & kept_after])
        # dropped: the weakest kept groups by squared weight; grown: the removed groups whose best
        # pattern holds most squared gradient, with that pattern
        magnitude = group_tap_importance(weights[layer.name].pow(2), layer.block_size).sum(-1)
        assert magnitude[dropped].max() <= magnitude[kept_after & kept_before].min()
        fit = group_tap_importance(gradients[layer.name], layer.block_size) @ pruner.library.double().T
        gain = fit.max(-1).values
        chosen = fit.gather(-1, new.clamp_min(0)[..., None])[..., 0]
        torch.testing.assert_close(chosen[grown], gain[grown])
        assert gain[grown].min() >= gain[~kept_before & ~kept_after].max() * (1 - 1e-6)
        assert gain[grown].min() > 0
        # the weights follow the new mask: dropped are zero, grown start at zero
        mask = pruner.masks[layer.name].dense(pruner.library)
        weight = layer.module.weight.detach()
        assert not weight[mask == 0].any() and not optimizer.state[layer.module.weight][
            "momentum_buffer"][mask == 0].any()
    assert swapped == expected > 0
    # gradients now flow into the grown weights and never into the dropped ones
    model.zero_grad()
    LOSS(model(images[0][0]), images[0][1]).backward()
    for layer in pruner.layers:
        mask = pruner.masks[layer.name].dense(pruner.library)
        assert not layer.module.weight.grad[mask == 0].any()
    grown_grad = sum(float(l.module.weight.grad[(pruner.masks[l.name].dense(pruner.library) > 0)
                                                & (weights[l.name] == 0)].abs().sum()) for l in pruner.layers)
    assert grown_grad > 0


def test_regrowth_trains_records_and_resumes_with_the_same_loss(tmp_path):
    def recipe():
        return parse_recipe(small_recipe(tmp_path / "run", pruning={"regrow_every": 1},
                                         data={"train_subset": 200, "test_subset": 200,
                                               "test_batch_size": 200},
                                         schedule={"epochs": 5, "bn_recalibration_batches": 2}))
    result = train(recipe(), progress=False)
    m = result.metrics
    assert [row["regrown_groups"] for row in m][:3] == [None, None, None]
    assert all(row["regrown_groups"] > 0 for row in m[3:]) and m[3]["regrown_groups"] > m[4]["regrown_groups"]
    checkpoints = sorted((result.output_dir / "checkpoints").iterdir())
    hard, last = (load_checkpoint(checkpoints[i])["pruner"]["masks"] for i in (2, 4))
    moved = 0
    for name, mask in hard.items():  # as many groups kept in every layer, some of them others
        assert int((mask["pattern_ids"] != REMOVED).sum()) == int((last[name]["pattern_ids"] != REMOVED).sum())
        moved += int((mask["pattern_ids"] != last[name]["pattern_ids"]).sum())
    assert moved >= m[3]["regrown_groups"]
    for path in checkpoints[4:]:
        path.unlink()  # as if the run died after epoch 3: resume with one regrowth to go
    resumed = train(recipe(), resume=True, progress=False)
    assert without_wall_clock(resumed.metrics) == without_wall_clock(m)


def test_distillation_term_is_zero_at_alpha_0_and_changes_the_gradient(images):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    teacher = snapshot_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    inputs, labels = images[0]
    with torch.no_grad():
        soft = teacher(inputs)  # eval-mode BN: not the train-mode student's logits

    def gradient(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        logits = model(inputs)
        loss, kl = distillation_loss(LOSS(logits, labels), logits, soft, alpha, 4.0)
        loss.backward()
        return model.layers[1][0].conv1.weight.grad.clone(), kl.detach()

    plain = gradient(0.0)[0]
    model.zero_grad()
    LOSS(model(inputs), labels).backward()
    assert torch.equal(plain, model.layers[1][0].conv1.weight.grad)
    distilled, kl = gradient(0.5)
    assert not torch.allclose(distilled, plain, rtol=1e-3, atol=0)
    with torch.no_grad():
        student = model(inputs)
        p_t = torch.softmax(soft / 4, 1)
        expected = 16 * (p_t * (p_t.log() - torch.log_softmax(student / 4, 1))).sum(1).mean()
    torch.testing.assert_close(kl, expected)
    assert float(kl) > 0
    same = distillation_loss(torch.tensor(1.0), soft, soft, 0.5, 4.0)[1]
    assert abs(float(same)) < 1e-6  # a student that matches its teacher pays nothing


def test_reselection_follows_the_weights(images):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    config = PruningConfig(block_size=4, connectivity_ratio=0.7, select_epoch=1, hard_prune_epoch=5,
                           reselect_every=2)
    pruner = ClickTrainPruner(model, config)
    assert [e for e in range(6) if pruner.reselects_at(e)] == [3]
    pruner.select(model, images[:2], LOSS)
    assert pruner.reselect(model, images[:2], LOSS) == 0  # same weights, same batches
    layer = pruner.layers[4]
    before = pruner.masks[layer.name].pattern_ids.clone()
    kept = before != REMOVED
    with torch.no_grad():  # the kept groups lose all their weight: the choice must move
        kept_kernels = pruner._mask_tensors[layer.name].sum((2, 3), keepdim=True) > 0
        layer.module.weight.mul_(~kept_kernels)
    changed = pruner.reselect(model, images[:2], LOSS)
    after = pruner.masks[layer.name].pattern_ids
    assert not (after[kept] != REMOVED).any()  # every zeroed group is now removed
    assert changed >= 2 * int(kept.sum())  # those, and as many groups brought back


def test_lasso_ramp_grows_linearly_over_the_lasso_phase(images):
    config = PruningConfig(lasso=0.02, lasso_schedule="ramp", select_epoch=1, hard_prune_epoch=3)
    values = [lasso_coefficient(config, epoch, step, 4) for epoch in (1, 2) for step in range(4)]
    assert values == pytest.approx([0.02 * k / 8 for k in range(1, 9)])
    constant = config.model_copy(update={"lasso_schedule": "constant"})
    assert {lasso_coefficient(constant, e, s, 4) for e in (1, 2) for s in range(4)} == {0.02}
    # through the trainer's hooks: each step's penalty is its coefficient times the group lasso
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1)
    pruner = ClickTrainPruner(model, config.model_copy(update={"block_size": 4, "importance_batches": 1}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    for epoch in (1, 2):
        pruner.begin_epoch(_context(model, optimizer, images, epoch, steps=4))
        for _ in range(4):
            total = sum(group_lasso(l.module.weight, 1 - pruner._mask_tensors[l.name], l.block_size)
                        for l in pruner.layers)
            seen.append(float(pruner.penalty_term(torch.tensor(0.0), "regularize").detach() / total.detach()))
            pruner.after_step(optimizer)
        assert pruner.epoch_metrics()["lasso_coefficient"] == pytest.approx(0.02 * 4 * epoch / 8)
    assert seen == pytest.approx(values, rel=1e-5)


def test_bn_recalibration_makes_running_statistics_the_batch_average(images):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1).eval()
    norm = model.layers[1][0].bn2
    batch_means, batch_vars = [], []

    def record(module, args):
        x = args[0].detach()
        batch_means.append(x.mean((0, 2, 3)))
        batch_vars.append(x.var((0, 2, 3), unbiased=True))

    handle = norm.register_forward_pre_hook(record)
    recalibrate_batchnorm(model, images)
    handle.remove()
    assert len(batch_means) == 3
    torch.testing.assert_close(norm.running_mean, torch.stack(batch_means).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack(batch_vars).mean(0))
    assert int(norm.num_batches_tracked) == 3
    assert norm.momentum == 0.1 and not model.training  # settings restored


def test_recipes_take_the_lever_fields_and_check_them():
    recipe = parse_recipe({"schedule": {"epochs": 6}, "pruning": {
        "allocation": "global", "target_compression": 8.0, "min_layer_ratio": 0.3,
        "max_layer_ratio": 0.9, "distill_alpha": 0.5, "distill_temperature": 4.0,
        "reselect_every": 1, "lasso_schedule": "ramp"}})
    assert recipe.pruning.allocation == "global" and recipe.pruning.reselect_every == 1
    defaults = PruningConfig()
    assert (defaults.allocation, defaults.distill_alpha, defaults.reselect_every,
            defaults.lasso_schedule) == ("uniform", 0.0, 0, "constant")
    for pruning, message in [
        ({"distill_alpah": 0.5}, "pruning.distill_alpah: Extra inputs are not permitted"),
        ({"allocation": "layerwise"}, "pruning.allocation"),
        ({"distill_alpha": 1.5}, "pruning.distill_alpha"),
        ({"method": "prunetrain", "distill_alpha": 0.5}, "pruning.distill_alpha is a ClickTrain lever"),
        ({"allocation": "global", "layer_ratios": {"layers.*": 0.5}}, "give one or the other"),
        ({"allocation": "erk", "layer_ratios": {"layers.*": 0.5}}, "allocation 'erk' chooses them"),
        ({"method": "admm", "regrow_every": 1}, "pruning.regrow_every is a ClickTrain lever"),
        ({"regrow_fraction": 0.0}, "pruning.regrow_fraction"),
        ({"min_layer_ratio": 0.8, "max_layer_ratio": 0.5}, "min_layer_ratio (0.8) must be <="),
        ({"reselect_every": 2}, "must be before hard_prune_epoch (3)"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_recipe({"pruning": pruning}, "r.toml")
    with pytest.raises(RecipeError, match="schedule.sparse_kernels fixes its kernels' tables"):
        parse_recipe({"pruning": {"regrow_every": 1}, "schedule": {"sparse_kernels": True}}, "r.toml")


LEVERS = {"allocation": "global", "target_compression": 8.0, "distill_alpha": 0.5,
          "reselect_every": 1, "lasso_schedule": "ramp", "select_epoch": 1, "hard_prune_epoch": 3,
          "mixup_alpha": 0.3}  # mixup in the hard phase: the teacher sees the mixed images


def _lever_recipe(output_dir) -> dict:
    return small_recipe(output_dir, pruning=LEVERS,
                        data={"train_subset": 200, "test_subset": 200, "test_batch_size": 200},
                        schedule={"epochs": 4, "bn_recalibration_batches": 2})


def test_levers_train_record_their_metrics_and_resume_with_the_same_loss(tmp_path):
    result = train(parse_recipe(_lever_recipe(tmp_path / "run")), progress=False)
    m = result.metrics
    assert [row["phase"] for row in m] == ["dense", "regularize", "regularize", "hard"]
    assert m[0]["distill_loss"] == 0 and all(row["distill_loss"] > 0 for row in m[1:])
    assert [row["reselection_changed_groups"] is None for row in m] == [True, True, False, True]
    assert [row["lasso_coefficient"] for row in m] == pytest.approx([0, 0.01 * 4 / 8, 0.01, 0])
    assert m[-1]["paper_conv_compression"] == pytest.approx(8.0, rel=0.02)
    assert len(set(m[-1]["layer_ratios"].values())) > 1 and m[0]["layer_ratios"] == {}
    assert all(row["distill_alpha"] == 0.5 and row["bn_recalibration_batches"] == 2
               and row["allocation"] == "global" for row in m)
    # the teacher is the model at the end of the dense phase, and is checkpointed
    checkpoints = sorted((result.output_dir / "checkpoints").iterdir())
    dense, first = load_checkpoint(checkpoints[0]), load_checkpoint(checkpoints[1])
    assert dense["teacher"] is None
    for key, value in dense["model"].items():
        assert torch.equal(first["teacher"][key], value), key
    for path in checkpoints[2:]:
        path.unlink()  # as if the run died after epoch 1: resume in the lasso phase
    resumed = train(parse_recipe(_lever_recipe(tmp_path / "run")), resume=True, progress=False)
    assert without_wall_clock(resumed.metrics) == without_wall_clock(m)
