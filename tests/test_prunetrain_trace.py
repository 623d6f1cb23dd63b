"""PruneTrain's channel graph, traced with torch.fx (``models/channels.py``).

The traced graph reproduces the ResNets' and VGGs' channel nodes (what their hand-written
``channel_nodes()`` listed, written out here by architecture); models with an ImageNet-style stem,
projection shortcuts, depthwise convs and squeeze-excite shrink physically with their function
kept and export to ONNX; what the tracer cannot follow is refused by name; shrunk models resume in
another process from the node names alone.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clicktrain_deploy.errors import PruningError
from clicktrain_deploy.models import create_model
from clicktrain_deploy.models.channels import trace_channel_graph
from clicktrain_deploy.pruning import PruningConfig
from clicktrain_deploy.pruning.prunetrain import PruneTrain

from .conftest import REPO, onnxruntime_and_torch

CONFIG = PruningConfig(method="prunetrain")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Models defined here (tiny widths).

class Block(nn.Module):
    """torchvision-style BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN + identity or a 1x1
    projection (conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class StemResNet(nn.Module):
    """7x7/2 stem + 3x3/2 max-pool, three stages of two blocks (projection shortcuts in stages 2
    and 3 and in stage 1's first block), adaptive average pool, fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Block(8, 12, 1), Block(12, 12, 1))
        self.layer2 = nn.Sequential(Block(12, 16, 2), Block(16, 16, 1))
        self.layer3 = nn.Sequential(Block(16, 24, 2), Block(24, 24, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        gate = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(gate))))


class InvertedSE(nn.Module):
    """1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, squeeze-excite, 1x1 project-BN (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        hidden = cin * 4
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU6())
        self.se = SqueezeExcite(hidden, 4)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.residual else out


class TinyMobileSE(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedSE(8, 8, 1), InvertedSE(8, 12, 2), InvertedSE(12, 12, 1))
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


class LinearSE(nn.Module):
    """The classic squeeze-excite: pool, flatten, linear-ReLU-linear-sigmoid, view back, x * gate;
    then a residual add, and a pooled max over the map before the classifier."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.squeeze = nn.Linear(12, 4)
        self.excite = nn.Linear(4, 12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        b, c = x.size(0), x.size(1)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1).flatten(1)))))
        x = x + self.conv2(x * gate.view(b, c, 1, 1))
        return self.fc(x.amax((2, 3)))


# The ResNets' and VGGs' channel nodes, as their hand-written channel_nodes() listed them.

def _cifar_resnet_nodes(model) -> dict[str, set]:
    nodes, name, stream = {}, "conv1", {("conv1", 0), ("bn1", 0)}
    for s, stage in enumerate(model.layers):
        for j, block in enumerate(stage):
            p = f"layers.{s}.{j}"
            stream.add((f"{p}.conv1", 1))
            if not isinstance(block.shortcut, nn.Identity):
                stream.add((f"{p}.shortcut.0", 1))
                nodes[name] = stream
                name, stream = f"layers.{s}", {(f"{p}.shortcut.0", 0), (f"{p}.shortcut.1", 0)}
            nodes[f"{p}.conv1"] = {(f"{p}.conv1", 0), (f"{p}.bn1", 0), (f"{p}.conv2", 1)}
            stream |= {(f"{p}.conv2", 0), (f"{p}.bn2", 0)}
    stream.add(("fc", 1))
    nodes[name] = stream
    return nodes


def _vgg_nodes(model) -> dict[str, set]:
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    readers = [f"features.{i}" for i in convs[1:]] + ["classifier.1"]
    return {f"features.{i}": {(f"features.{i}", 0), (f"features.{i + 1}", 0), (reader, 1)}
            for i, reader in zip(convs, readers)}


@pytest.mark.parametrize("name, expected", [("resnet20", _cifar_resnet_nodes),
                                            ("resnet32", _cifar_resnet_nodes),
                                            ("vgg11_bn", _vgg_nodes)])
def test_traced_graph_is_the_hand_written_one(name, expected):
    model = create_model(name, 10, 3)
    graph = trace_channel_graph(model)
    traced = {node.name: set(graph.members(node)) for node in graph.nodes}
    assert traced == expected(model)
    # every BN follows its conv directly: paired, none left over
    assert all(norm is not None for node in graph.nodes for _, norm in node.producers)
    assert not any(node.norms for node in graph.nodes)
    assert set(PruneTrain(model, CONFIG).channels) == set(traced)


def test_residual_stages_and_readers_of_an_imagenet_style_resnet():
    graph = trace_channel_graph(StemResNet())
    members = {node.name: graph.members(node) for node in graph.nodes}
    # stem + layer1's first projection end the stem's node; stage streams are named by stage
    assert members["conv1"] == {("conv1", 0), ("bn1", 0), ("layer1.0.conv1", 1), ("layer1.0.downsample.0", 1)}
    assert members["layer1"] == {
        ("layer1.0.conv2", 0), ("layer1.0.bn2", 0),
        ("layer1.0.downsample.0", 0), ("layer1.0.downsample.1", 0),
        ("layer1.1.conv2", 0), ("layer1.1.bn2", 0), ("layer1.1.conv1", 1), ("layer2.0.conv1", 1),
        ("layer2.0.downsample.0", 1)}
    assert ("fc", 1) in members["layer3"]
    assert set(members) == {"conv1", "layer1", "layer2", "layer3"} | {
        f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in (0, 1)}
    assert graph.refused == {"fc": "its channels are the model's output"}


def test_depthwise_and_squeeze_excite_tie_channels():
    graph = trace_channel_graph(TinyMobileSE())
    members = {node.name: graph.members(node) for node in graph.nodes}
    # a block's expanded channels: expand, depthwise (in = out), the SE's gate conv, every reader
    assert members["blocks.1"] == {
        ("blocks.1.expand.0", 0), ("blocks.1.expand.1", 0), ("blocks.1.dw.0", 0), ("blocks.1.dw.1", 0),
        ("blocks.1.se.fc1", 1), ("blocks.1.se.fc2", 0), ("blocks.1.project.0", 1)}
    assert members["blocks.1.se.fc1"] == {("blocks.1.se.fc1", 0), ("blocks.1.se.fc2", 1)}
    # the stem's channels are the first block's residual stream
    assert members["stem.0"] >= {("stem.0", 0), ("blocks.0.project.0", 0), ("blocks.1.expand.0", 1)}
    assert ("classifier.1", 1) in members["head.0"]
    assert len(graph.nodes) == 1 + 3 + 3 + 1 + 1  # stem stream, expanded x3, SE hidden x3, stage 2, head


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    for module in model.modules():  # non-trivial BN so that a wrong slice would show
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)


@torch.no_grad()
def _kill_and_shrink(model: nn.Module, x: torch.Tensor) -> tuple[PruneTrain, torch.Tensor]:
    """Zero every weight touching every third channel of each node, then reconfigure: the shrunk
    model's outputs equal the masked model's."""
    _randomize_norms(model)
    method = PruneTrain(model, CONFIG)
    dead = {}
    for node in method.nodes:
        dead[node.name] = torch.arange(0, node.width, 3)
        for layer, _ in node.producers:
            layer.weight[dead[node.name]] = 0
        for reader in node.consumers:
            reader.weight[:, dead[node.name]] = 0
    model.eval()
    before = model(x)
    assert method.reconfigure() == sum(len(d) for d in dead.values())
    after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for node in method.nodes:
        assert node.width == method.widths[node.name] - len(dead[node.name])
        keep = [c for c in range(method.widths[node.name]) if c not in dead[node.name].tolist()]
        assert method.channels[node.name].tolist() == keep
    assert method.reconfigure() == 0
    return method, after


def _onnx_matches(model: nn.Module, x: torch.Tensor) -> None:
    logits, reference = onnxruntime_and_torch(model, x)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [StemResNet, TinyMobileSE, LinearSE,
                                   lambda: create_model("mobilenet_v2", 10, 3)],
                         ids=["stem_resnet", "mobile_se", "linear_se", "mobilenet_v2"])
def test_traced_models_shrink_keep_their_function_and_export(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, 32, 32)
    full = sum(p.numel() for p in model.parameters())
    method, _ = _kill_and_shrink(model, x)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * full
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert all(m.groups == m.in_channels == m.out_channels == m.weight.shape[0] for m in depthwise)
    _onnx_matches(model, x)
    # the report counts against the original widths
    assert method.report(model).compression["all_weights"] > 1.0


_RESUME = r"""
import sys, torch
from tests.test_prunetrain_trace import StemResNet, CONFIG
from clicktrain_deploy.pruning.prunetrain import PruneTrain
saved = torch.load(sys.argv[1])
model = StemResNet()
method = PruneTrain(model, CONFIG)
method.load_state_dict(saved["pruner"])
model.load_state_dict(saved["model"])
model.eval()
with torch.no_grad():
    torch.save({"names": [n.name for n in method.nodes], "out": model(saved["x"]),
                "state": method.state_dict()}, sys.argv[2])
"""


def test_shrunk_model_resumes_in_another_process(tmp_path):
    torch.manual_seed(1)
    model = StemResNet()
    x = torch.randn(2, 3, 48, 48)
    method, out = _kill_and_shrink(model, x)
    method.coefficient = 0.25
    torch.save({"pruner": method.state_dict(), "model": model.state_dict(), "x": x}, tmp_path / "ckpt.pt")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _RESUME, str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pt")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    other = torch.load(tmp_path / "out.pt")
    assert other["names"] == [node.name for node in method.nodes]
    torch.testing.assert_close(other["out"], out, rtol=1e-5, atol=1e-5)
    assert other["state"]["coefficient"] == 0.25
    for name, channels in method.state_dict()["channels"].items():
        assert torch.equal(other["state"]["channels"][name], channels), name
    # a checkpoint naming a node this model does not have is refused by name
    state = method.state_dict()
    state["channels"] = {**state["channels"], "layer9": torch.arange(3)}
    with pytest.raises(PruningError, match="layer9"):
        PruneTrain(StemResNet(), CONFIG).load_state_dict(state)


# Refusals: by name, never pruned wrongly.

class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on a tensor's value
            y = -y
        return y


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.ReLU(), Gated())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def test_a_model_fx_cannot_trace_is_refused_naming_the_module():
    with pytest.raises(PruningError, match=r"DataDependent: torch.fx cannot trace module 'body.1' \(Gated\)"):
        PruneTrain(DataDependent(), CONFIG)


class Refusing(nn.Module):
    """One of each construct the tracer refuses, between prunable convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)        # reads cat(a, b): a and b refused
        self.shuffled = nn.Conv2d(8, 8, 1)              # output shuffled (view + transpose)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.d = nn.Conv2d(8, 6, 1)                     # prunable: read by e
        self.e = nn.Conv2d(6, 6, 1)
        self.norm = nn.GroupNorm(2, 6)
        self.f = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5 * 4, 3)                   # reads a flattened 2x2 map
        self.g = nn.Conv2d(6, 4, 1)
        self.fc2 = nn.Linear(4, 3)                      # reads a view with a literal width
        self.h = nn.Conv2d(6, 4, 1)                     # output permuted to channels-last

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], 1))
        s = self.shuffled(F.relu(y))
        n, ch, h, w = s.size(0), s.size(1), s.size(2), s.size(3)
        s = s.view(n, 2, ch // 2, h, w).transpose(1, 2).reshape(n, ch, h, w)
        z = self.e(self.d(self.grouped(s)))
        z = F.relu(self.norm(z))
        u = torch.flatten(F.adaptive_avg_pool2d(self.f(z), 2), 1)
        v = F.adaptive_avg_pool2d(self.g(z), 1).view(-1, 4)
        t = self.h(z).permute(0, 2, 3, 1).mean((1, 2, 3))
        return self.fc(u) + self.fc2(v) + t[:, None]


def test_what_the_tracer_cannot_follow_keeps_its_channels_and_says_why():
    model = Refusing()
    method = PruneTrain(model, CONFIG)
    refused = method.refused
    assert [node.name for node in method.nodes] == ["c", "d"]
    assert "node 'cat' (call_function cat) concatenates along channels" in refused["a"]
    assert "concatenates along channels" in refused["b"]
    assert "node 'view' (call_method view) reshapes the channel dimension ((2, 8, 32, 32) -> " \
           "(2, 2, 4, 32, 32))" in refused["shuffled"]
    assert "module 'grouped' (Conv2d) is a grouped conv (groups=2" in refused["grouped"]
    assert "node 'permute' (call_method permute) moves the channel dimension" in refused["h"]
    assert "module 'norm' (GroupNorm)" in refused["e"]
    assert "node 'flatten' (call_function flatten) reshapes the channel dimension" in refused["f"]
    assert "hard-codes the channel count" in refused["g"]
    assert refused["fc"] == "its channels are the model's output"  # fc and fc2: one set (added)
    # removing d's dead channels still keeps the function; the refused layers keep their shapes
    shapes = {name: p.shape for name, p in model.named_parameters() if not name.startswith(("d.", "e."))}
    with torch.no_grad():
        model.d.weight[1] = 0
        model.d.bias[1] = 0
        model.e.weight[:, 1] = 0
        x = torch.randn(2, 3, 8, 8)
        before = model(x)
        assert method.reconfigure() == 1
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert {name: p.shape for name, p in model.named_parameters() if name in shapes} == shapes


class NothingToPrune(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_max_pool2d(torch.roll(self.conv(x), 1, 1), 2), 1))


def test_a_model_with_nothing_prunable_is_refused_with_the_reasons():
    with pytest.raises(PruningError, match=r"finds no channels it can remove: conv: node 'roll'"):
        PruneTrain(NothingToPrune(), CONFIG)
