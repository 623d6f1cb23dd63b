"""Issue 14's Bar, end to end: a user's model file outside the package (a MobileNetV2-like net and
an ImageNet-style ResNet), its weights loaded from a file, on an image folder of real images
(Fashion-MNIST written as 64x64 RGB PNG files), through ``clicktrain-deploy run``: train, export,
compile for x86 and cortex-a72, validate; the manifests put pattern (or connectivity) kernels on
the 3x3 convs ClickTrain pruned. And PruneTrain shrinks the ResNet, whose shrunk model exports
and compiles.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from clicktrain_deploy import export_onnx, load_checkpoint, parse_recipe, train
from clicktrain_deploy.cli import app
from clicktrain_deploy.compile.build import compile_model
from clicktrain_deploy.config import load_recipe
from clicktrain_deploy.models import build_model
from clicktrain_deploy.pipeline import plan
from clicktrain_deploy.pipeline.runner import stage_digest
from clicktrain_deploy.runfolder import RunFolder

CLASSES = (0, 1, 7)                  # Fashion-MNIST's T-shirt/top, trouser, sneaker
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 15
SIZE = 64

NET = '''
"""A user's nets, in their own file: nothing here imports clicktrain_deploy."""
import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(gate))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),     # depthwise 3x3
                   SqueezeExcite(hidden, max(8, hidden // 4)),
                   conv_bn(hidden, cout, 1, act=False)]                   # linear bottleneck
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetish(nn.Module):
    """MobileNetV2's parts at toy width, with three plain 3x3 convs for ClickTrain to prune."""

    def __init__(self, num_classes, in_channels, width=16):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, width, 3, 2),        # features.0: stem
            conv_bn(width, width, 3),                 # features.1: plain 3x3
            InvertedResidual(width, width, 1, 1),     # depthwise, SE, project; residual
            InvertedResidual(width, 24, 2, 4),        # expand, strided depthwise
            InvertedResidual(24, 24, 1, 4),
            conv_bn(24, 32, 3),                       # features.5: plain 3x3
            conv_bn(32, 32, 3),                       # features.6: plain 3x3
            conv_bn(32, 64, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ImageNetResNet(nn.Module):
    """torchvision's ResNet layout (7x7/2 stem, 3x3/2 max pool, basic blocks) at toy width."""

    def __init__(self, num_classes, in_channels, widths=(16, 32)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0], 1))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2), BasicBlock(widths[1], widths[1], 1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_mobilenet(num_classes, in_channels, width=16):
    return MobileNetish(num_classes, in_channels, width)


def build_resnet(num_classes, in_channels):
    return ImageNetResNet(num_classes, in_channels)
'''

# the plain 3x3 convs (stem excluded) each model offers ClickTrain
PRUNABLE = {"build_mobilenet": {"features.1.0", "features.5.0", "features.6.0"},
            "build_resnet": {"layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                             "layer2.1.conv1", "layer2.1.conv2"}}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, fmnist) -> Path:
    """Real Fashion-MNIST images of 3 classes as 64x64 RGB PNGs: root/{train,test}/<class>/*.png."""
    root = tmp_path_factory.mktemp("images")
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        data = getattr(fmnist, split)
        for label in CLASSES:
            folder = root / split / fmnist.classes[label].replace("/", "-")
            folder.mkdir(parents=True)
            for n, i in enumerate(torch.nonzero(data.labels == label)[:per_class, 0].tolist()):
                gray = data.images[i, 0].numpy().astype(np.float32)
                # a colour per channel, so the three planes differ
                rgb = np.stack([gray, 0.8 * gray + 20, 255 - 0.6 * gray], -1).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb, "RGB").resize((SIZE, SIZE), Image.BILINEAR).save(folder / f"{n:03d}.png")
    return root


@pytest.fixture(scope="module")
def user_code(tmp_path_factory) -> Path:
    """The user's model file, outside the package."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "net.py").write_text(NET)
    return folder / "net.py"


def _weights(net: Path, builder: str, path: Path) -> Path:
    """Random-init weights saved as a plain state_dict (what a user's pretrained file is)."""
    torch.manual_seed(0)
    torch.save(build_model(file=f"{net}:{builder}", num_classes=len(CLASSES), in_channels=3).state_dict(), path)
    return path


def test_image_folder_fixture_is_what_the_loader_expects(image_folder):
    from clicktrain_deploy.data.datasets import image_folder as load

    data = load(str(image_folder), image_size=SIZE, channels=3, workers=0)
    assert (len(data.train), len(data.test)) == (3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS)
    assert data.input_shape == (3, SIZE, SIZE) and len(data.classes) == 3
    with Image.open(next((image_folder / "train").glob("*/*.png"))) as image:
        assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))


VALIDATED = ["train", "export", "validate:onnxruntime", "compile:x86", "validate:x86", "compile:cortex-a72",
             "validate:cortex-a72"]


# The MobileNet stops after the validations (its benchmarks would take the run past 3 minutes on
# two cores); the ResNet runs the whole pipeline, benchmarks (1 thread, 1 round) and report included.
@pytest.mark.parametrize(("builder", "until"), [("build_mobilenet", "validate"), ("build_resnet", None)])
def test_user_model_file_weights_and_image_folder_run_end_to_end(builder, until, image_folder, user_code,
                                                                 tmp_path):
    weights = _weights(user_code, builder, tmp_path / "pretrained.pt")
    recipe = {
        "output_dir": "run",
        "seed": 1,
        "model": {"file": f"{user_code}:{builder}", "weights": weights.name},
        "data": {"name": "image_folder", "root": str(image_folder), "image_size": SIZE, "workers": 0,
                 "batch_size": 20, "test_batch_size": 45},
        "schedule": {"epochs": 2, "lr": 0.02, "threads": 1, "bn_recalibration_batches": 2},
        "pruning": {"method": "clicktrain", "select_epoch": 0, "hard_prune_epoch": 1, "block_size": 4,
                    "connectivity_ratio": 0.7, "importance_batches": 2},
        "deploy": {"targets": ["x86", "cortex-a72"], "validate_images": 20, "emulated_images": 2,
                   "bench_threads": [1], "bench_rounds": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    result = CliRunner().invoke(app, ["run", "-c", str(path), "--quiet", *(["--until", until] if until else [])])
    assert result.exit_code == 0, result.output + repr(result.exception)

    folder = RunFolder(tmp_path / "run")
    stages = json.loads(folder.state.read_text())["stages"]
    assert list(stages) == VALIDATED + ([] if until else ["benchmark:x86", "benchmark:cortex-a72", "report"])
    assert {s["status"] for s in stages.values()} == {"done"}
    if not until:
        assert "cortex-a72" in folder.report.read_text()
        arm = json.loads(folder.bench("cortex-a72").read_text())
        assert arm["ours_sparse"] < arm["ours_dense"]  # fewer instructions with the pattern kernels
    for runtime, reference, images in [("onnxruntime", "torch", 20), ("x86", "onnxruntime", 20),
                                       ("cortex-a72", "onnxruntime", 2)]:
        check = json.loads(folder.validation(runtime).read_text())
        assert (check["reference"], check["images"], check["passed"]) == (reference, images, True), check

    # the weights came from the file, the model from the user's file, the data from the folder
    saved = load_checkpoint(folder.root)
    assert saved["recipe"]["model"]["file"] == f"{user_code.resolve()}:{builder}"
    assert saved["recipe"]["model"]["weights"] == str(weights.resolve())
    assert list(saved["data"]["input_shape"]) == [3, SIZE, SIZE] and len(saved["data"]["classes"]) == 3
    # training (12 small steps) started from the file's weights, not from the recipe's seed
    stem = {"build_mobilenet": "features.0.0.weight", "build_resnet": "conv1.weight"}[builder]
    start, end = torch.load(weights)[stem], saved["model"][stem].cpu()
    torch.manual_seed(1)
    fresh = build_model(file=f"{user_code}:{builder}", num_classes=3, in_channels=3).state_dict()[stem]
    assert (end - start).norm() < 0.5 * (fresh - start).norm()

    # the model file and weights, outside the run folder, key the train stage by their bytes
    train_stage = next(s for s in plan(load_recipe(path)) if s.name == "train")
    assert stage_digest(train_stage, folder)[0] == stages["train"]["inputs"]
    torch.save({**torch.load(weights), stem: fresh}, weights)
    assert stage_digest(train_stage, folder)[0] != stages["train"]["inputs"]

    selection = json.loads(folder.conv_selection.read_text())
    taken = {c["name"] for c in selection if c["taken"]}
    assert taken == PRUNABLE[builder], selection
    reasons = {c["name"]: c["reason"] for c in selection}
    if builder == "build_mobilenet":
        assert sum(r.startswith("depthwise") for r in reasons.values()) == 3
        assert sum(r == "1x1" for r in reasons.values()) >= 5  # expand, project, squeeze-excite, head
    else:
        assert reasons["conv1"] == "kernel 7x7: only 3x3 takes patterns"
        assert reasons["layer2.0.downsample.0"] == "1x1"

    for target in ("x86", "cortex-a72"):
        manifest = json.loads(folder.manifest(target).read_text())
        assert manifest["check"]["status"] == "passed", manifest["check"]
        kernels = {layer["layer"]: layer["kernel"] for layer in manifest["layers"]}
        assert set(kernels) == set(reasons)  # every conv of the model, by its module's name
        # exactly the convs ClickTrain pruned run on pattern (or connectivity) kernels
        sparse = {name for name, kernel in kernels.items() if kernel in ("pattern", "connectivity")}
        assert sparse == taken, (target, kernels)
        if builder == "build_mobilenet":
            assert {n for n, k in kernels.items() if k == "depthwise"} == {
                n for n, r in reasons.items() if r.startswith("depthwise")}


def _dead_channel_weights(net: Path, path: Path) -> tuple[Path, dict[str, int]]:
    """ResNet weights with channels that are zero in every layer touching them (what a trained
    model with dead channels holds): 6 of layer1.0's inner 16, 12 of layer2.1's inner 32 and 4 of
    the first residual stage's 16 (stem, layer1.0.conv2 and all their readers). Returns the file
    and the widths PruneTrain must reach at least."""
    torch.manual_seed(0)
    model = build_model(file=f"{net}:build_resnet", num_classes=len(CLASSES), in_channels=3)
    with torch.no_grad():
        def kill(writers, norms, readers, channels):
            for conv in writers:
                conv.weight[channels] = 0
            for bn in norms:
                bn.weight[channels] = 0
                bn.bias[channels] = 0
            for conv in readers:
                conv.weight[:, channels] = 0
        block, last = model.layer1[0], model.layer2[1]
        kill([block.conv1], [block.bn1], [block.conv2], slice(0, 6))
        kill([last.conv1], [last.bn1], [last.conv2], slice(0, 12))
        kill([model.conv1, block.conv2], [model.bn1, block.bn2],
             [block.conv1, model.layer2[0].conv1, model.layer2[0].downsample[0]], slice(0, 4))
    torch.save(model.state_dict(), path)
    return path, {"conv1": 12, "layer1.0.conv1": 10, "layer2.1.conv1": 20}


def test_prunetrain_shrinks_the_user_resnet_which_exports_and_compiles(image_folder, user_code, tmp_path):
    weights, widths = _dead_channel_weights(user_code, tmp_path / "dead.pt")
    raw = {
        "output_dir": str(tmp_path / "run"),
        "seed": 1,
        "model": {"file": f"{user_code}:build_resnet", "weights": str(weights)},
        "data": {"name": "image_folder", "root": str(image_folder), "image_size": SIZE, "workers": 0,
                 "batch_size": 20, "test_batch_size": 45},
        "schedule": {"epochs": 1, "lr": 0.02, "threads": 1, "bn_recalibration_batches": 2},
        "pruning": {"method": "prunetrain", "prunetrain": {"penalty_ratio": 0.5, "interval": 1}},
    }
    run = train(parse_recipe(raw), progress=False)
    model = run.model
    shrunk = {"conv1": model.conv1.out_channels, "layer1.0.conv1": model.layer1[0].conv1.out_channels,
              "layer2.1.conv1": model.layer2[1].conv1.out_channels}
    assert all(shrunk[name] <= width for name, width in widths.items()), shrunk
    # the residual stage stays aligned: every writer and reader of it has the stage's width
    stage = model.conv1.out_channels
    assert (model.layer1[0].conv2.out_channels, model.layer1[0].conv1.in_channels,
            model.layer2[0].conv1.in_channels, model.layer2[0].downsample[0].in_channels) == (stage,) * 4
    assert run.metrics[-1]["paper_conv_compression"] > 1

    exported = export_onnx(run.output_dir, tmp_path / "shrunk.onnx", check_images=45)
    assert exported.metadata is None  # no conv is pattern-pruned
    proto = onnx.load(str(exported.path))
    shapes = {tuple(init.dims) for init in proto.graph.initializer}
    assert (shrunk["layer1.0.conv1"], stage, 3, 3) in shapes

    built = compile_model(exported.path, "x86", tmp_path / "shrunk.so", measure=False)
    assert built.manifest["check"]["status"] == "passed", built.manifest["check"]
    convs = {layer["layer"]: layer for layer in built.manifest["layers"]}
    assert convs["layer1.0.conv1"]["shape"] == [shrunk["layer1.0.conv1"], stage, 3, 3]
