"""Training on our kernels (issue #16): the pattern conv op's forward, input gradient and weight
gradient against torch's dense conv on the masked weights (float64), and hard-phase training with
and without the op."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from clicktrain_deploy import parse_recipe, train
from clicktrain_deploy.pruning.clicktrain import ClickTrainPruner
from clicktrain_deploy.pruning.config import PruningConfig
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES
from clicktrain_deploy.train.pattern_kernels import (
    PatternConvKernels, PatternKernelConv2d, install, pattern_conv2d, pattern_layer_kernels, register_layer,
)

from .conftest import small_recipe

LIBRARY = PATTERN_LIBRARIES.get("clicktrain8")().numpy()


def _masked_conv(out_channels, in_channels, stride, block, removed, seed, lanes=None):
    """A conv whose weight sits on block-shared patterns, its pattern ids and op layer index."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(LIBRARY), (-(-out_channels // block), in_channels))
    ids[rng.random(ids.shape) < removed] = -1
    kernel_ids = np.repeat(ids, block, 0)[:out_channels]
    mask = LIBRARY[np.maximum(kernel_ids, 0)] & (kernel_ids >= 0)[..., None]
    conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(mask.reshape(conv.weight.shape)) * torch.randn(conv.weight.shape))
    return conv, ids, torch.from_numpy(mask.reshape(conv.weight.shape))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU for torch on this machine")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("out_channels,in_channels,size,stride,block,batch,removed", [
    (16, 16, (8, 8), 1, 16, 2, 0.7),       # one block of 16 lanes
    (32, 12, (9, 7), 2, 16, 3, 0.6),       # stride 2 on odd sizes: every parity class of dX
    (24, 12, (7, 9), 1, 4, 2, 0.5),        # B = 4: 4-lane kernels
    (8, 5, (6, 5), 2, 1, 2, 0.5),          # B = 1 (per-kernel patterns): 1 lane, odd channels
    (32, 8, (5, 6), 1, 16, 128, 0.72),     # the training batch size
    (48, 16, (6, 7), 2, 16, 1, 0.7),       # batch 1, a fully removed block
])
def test_forward_and_both_gradients_match_torch_on_masked_weights(out_channels, in_channels, size, stride, block,
                                                                  batch, removed, device):
    """On the CPU (channels_last) and, where torch has a GPU, on CUDA (NCHW)."""
    conv, ids, mask = _masked_conv(out_channels, in_channels, stride, block, removed, seed=out_channels + batch)
    if out_channels == 48:
        ids[1] = -1
        with torch.no_grad():
            conv.weight[16:32] = 0
        mask[16:32] = 0
    kernels = pattern_layer_kernels(conv.to(device), ids, LIBRARY, block, *size)
    layer = register_layer(kernels)
    x = torch.randn(batch, in_channels, *size, device=device).contiguous(
        memory_format=kernels.memory_format).requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()
    y = pattern_conv2d(x, weight, layer)
    grad = torch.randn_like(y)
    y.backward(grad)

    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y64 = nn.functional.conv2d(x64, w64, stride=stride, padding=1)
    y64.backward(grad.double())
    mask = mask.to(device)
    assert y.shape == y64.shape and y.is_contiguous(memory_format=kernels.memory_format)
    assert y.device == x.grad.device == weight.grad.device == x.device
    scale = lambda ref: 1e-5 * max(1.0, float(ref.detach().abs().max()))  # noqa: E731 (float32 sums of ~100 terms)
    assert float((y.detach().double() - y64.detach()).abs().max()) <= scale(y64)
    assert float((x.grad.double() - x64.grad).abs().max()) <= scale(x64.grad)
    kept_grad = w64.grad * mask
    assert float((weight.grad.double() - kept_grad).abs().max()) <= scale(kept_grad)
    assert not weight.grad[~mask.bool()].any(), "a removed weight got a gradient"
    assert weight.grad[mask.bool()].abs().min() > 0 or batch == 1  # every kept tap got one


def test_a_layer_with_every_kernel_removed_gives_zeros():
    conv, ids, _ = _masked_conv(16, 8, 1, 16, 1.0, seed=1)
    layer = register_layer(PatternConvKernels(conv, ids, LIBRARY, 16, 5, 5))
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()
    y = pattern_conv2d(x, weight, layer)
    y.sum().backward()
    assert not y.any() and not x.grad.any() and not weight.grad.any()


def test_the_op_passes_torch_library_opcheck():
    """Schema, fake (meta) kernel and autograd registration as torch.compile and DDP rely on."""
    conv, ids, _ = _masked_conv(16, 8, 1, 16, 0.5, seed=2)
    layer = register_layer(PatternConvKernels(conv, ids, LIBRARY, 16, 6, 6))
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(pattern_conv2d, (x, conv.weight.detach().clone().requires_grad_(), layer))


def test_install_keeps_a_layer_whose_kernels_disagree_with_torch_on_torch(monkeypatch):
    """A kernel that computes the wrong thing (here: fed weights twice too large) is caught by the
    check against torch's conv at install: the layer stays on torch, its reason gives the
    difference, and a warning says so."""
    conv, ids, _ = _masked_conv(16, 8, 1, 16, 0.5, seed=3)
    model = nn.Sequential(conv)
    monkeypatch.setattr(PatternConvKernels, "compact", lambda self, w: 2 * w.detach().reshape(-1)[self.gather]
                        * self.valid)
    with pytest.warns(RuntimeWarning, match="differs from torch"):
        decisions = install(model, {"0": (conv, ids, 16)}, LIBRARY, torch.randn(4, 8, 6, 6), batch=4, force=True)
    assert not decisions[0].used and "differs from torch's conv by" in decisions[0].reason
    assert not model[0].use_pattern_kernels


def test_install_names_why_a_conv_stays_on_torch():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=True), nn.Conv2d(16, 16, 3, padding=1, groups=2,
                                                                             bias=False))
    ids = np.zeros((1, 8), int)
    decisions = install(model, {"0": (model[0], ids, 16), "1": (model[1], np.zeros((1, 16), int), 16)},
                        LIBRARY, torch.randn(2, 8, 6, 6), batch=2)
    assert [(d.layer, d.used, d.reason) for d in decisions] == [("0", False, "has a bias"),
                                                                 ("1", False, "groups=2")]
    assert type(model[0]) is nn.Conv2d


class SmallNet(nn.Module):
    """A stem and three pattern-prunable 3x3 convs (one of stride 2) with BatchNorm, for 1x28x28."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        layers, channels = [], in_channels
        for width, stride in ((16, 1), (16, 1), (32, 2), (32, 1)):
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def make_small_net(num_classes: int, in_channels: int) -> nn.Module:
    return SmallNet(num_classes, in_channels)


def test_a_compiled_channels_last_model_on_the_op_matches_eager():
    """torch.compile (inductor) traces the op through its fake kernels: loss and every gradient
    of a compiled channels_last model equal the eager ones. (A channels_last model has
    channels_last weights, and the fake weight gradient must state the real one's strides, which
    opcheck on a contiguous weight does not see.)"""
    torch.manual_seed(0)
    model = SmallNet().to(memory_format=torch.channels_last)
    pruner = ClickTrainPruner(model, PruningConfig(connectivity_ratio=0.7, block_size=16, importance_batches=1))
    x, y = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.arange(8)
    pruner.select(model, [(x, y)], nn.functional.cross_entropy)
    pruner.harden(torch.optim.SGD(model.parameters(), lr=0.1))
    install(model, pruner.pattern_layers(), pruner.library.numpy(), x, len(x), force=True)
    model.train()
    grads = {}
    for name, run in (("eager", model), ("compiled", torch.compile(model))):
        model.zero_grad()
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        grads[name] = [float(loss.detach())] + [p.grad.clone() for p in model.parameters()]
    assert grads["eager"][0] == pytest.approx(grads["compiled"][0], rel=1e-5)
    for eager, compiled in zip(grads["eager"][1:], grads["compiled"][1:]):
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-5)


def test_hard_phase_on_the_op_keeps_masks_and_loss_curve_over_50_steps(fmnist):
    """Float32 sums in another order drift apart over SGD steps; torch itself drifts that way
    between its contiguous and channels_last convs. The op's curve stays as close to torch's as
    that envelope (with margin), matches it closely while the drift is small, and the weights
    stay on their masks."""
    torch.manual_seed(0)
    images = fmnist.train.images[:1600].float() / 255.0
    labels = fmnist.train.labels[:1600]
    batches = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 1600, 32)]
    model = SmallNet().to(memory_format=torch.channels_last)
    pruner = ClickTrainPruner(model, PruningConfig(connectivity_ratio=0.7, block_size=16, importance_batches=2))
    pruner.select(model, batches[:2], nn.functional.cross_entropy)
    start = copy.deepcopy(model.state_dict())
    curves, weights = {}, {}
    for variant in ("torch contiguous", "torch", "ours"):
        fmt = torch.contiguous_format if variant == "torch contiguous" else torch.channels_last
        model.load_state_dict(start)
        model.to(memory_format=fmt)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
        pruner.harden(optimizer)
        if variant == "ours":
            decisions = install(model, pruner.pattern_layers(), pruner.library.numpy(), images[:32], 32, force=True)
            assert [d.used for d in decisions] == [True] * len(pruner.layers) and len(decisions) == 3
        model.train()
        curve = []
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.after_step(optimizer)
            curve.append(float(loss.detach()))
        curves[variant] = np.array(curve)
        weights[variant] = {l.name: l.module.weight.detach().clone() for l in pruner.layers}
        for hook in pruner._hooks:
            hook.remove()
        pruner._hooks.clear()
    assert any(isinstance(m, PatternKernelConv2d) for m in model.modules())
    envelope = np.abs(curves["torch contiguous"] - curves["torch"])
    ours = np.abs(curves["ours"] - curves["torch"])
    assert ours[:10].max() < 1e-3, ours[:10]
    assert ours.max() <= max(3 * envelope.max(), 1e-2), (ours.max(), envelope.max())
    assert curves["ours"][-10:].mean() < curves["ours"][:5].mean()  # it learns
    for name, mask in pruner._mask_tensors.items():
        for variant in weights:
            assert torch.equal(weights[variant][name] != 0, mask.bool()), f"{variant}: {name} left its mask"


def test_recipe_turns_it_on_and_metrics_record_each_layer(tmp_path):
    recipe = small_recipe(tmp_path / "run", schedule={"epochs": 3, "memory_format": "channels_last",
                                                      "sparse_kernels": True}, pruning={"block_size": 16})
    recipe["model"] = {"factory": "tests.test_pattern_kernels:make_small_net"}
    result = train(parse_recipe(recipe), progress=False)
    hard = [m for m in result.metrics if m["phase"] == "hard"]
    decisions = hard[0]["pattern_kernels"]
    assert [d["layer"] for d in decisions] == [l.name for l in result.pruner.layers]
    assert all(d["torch_ms"] > 0 and d["ours_ms"] > 0 for d in decisions)
    assert hard[0]["pattern_kernel_layers"] == sum(d["used"] for d in decisions)
    assert all(m["memory_format"] == "channels_last" for m in result.metrics)
