import copy

import numpy as np
import pytest
import torch

from clicktrain_deploy.errors import PruningError
from clicktrain_deploy.models import MODELS, create_model, default_config
from clicktrain_deploy.pruning import ClickTrainPruner, PruneTrain, PruningConfig

from .conftest import onnxruntime_and_torch


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_takes_both_input_kinds(name, shape):
    model = create_model(name, num_classes=7, in_channels=shape[0]).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_cifar_resnet_depths_and_clicktrains_wide_resnet():
    def convs(model):
        return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs(create_model("resnet20", 10, 3))) == 19
    assert len(convs(create_model("resnet56", 10, 3))) == 55
    wide = create_model("resnet32_wide", 10, 3)
    assert len(convs(wide)) == 31 and convs(wide)[-1].out_channels == 512
    conv_weights = sum(m.weight.numel() for m in wide.modules() if isinstance(m, torch.nn.Conv2d))
    assert 19e6 < conv_weights < 21e6  # the paper's ~19.9M conv weights


# ImageNet models (torchvision's definitions) -----------------------------------------------------

IMAGENET = ["resnet18", "resnet50", "mobilenet_v2", "vgg16_bn_imagenet"]
# torchvision's published parameter counts (1000 classes, 3 planes).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032,
                      "mobilenet_v2": 3_504_872, "vgg16_bn_imagenet": 138_365_992}

_built: dict[str, torch.nn.Module] = {}


def imagenet_model(name: str) -> torch.nn.Module:
    """``name`` at 1000 classes and 3 planes, built once per session (VGG-16 takes ~2 s); tests
    that change it take a copy."""
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = create_model(name, 1000, 3)
    return _built[name]


def comparable(name: str, size: int) -> torch.nn.Module:
    """A copy of ``name`` in eval mode whose logits are O(1), for output comparisons.

    The ResNets and VGG keep BN's default statistics (identity). MobileNetV2 takes statistics
    from one random batch: with default ones, torchvision's init (kaiming fan_out counts a
    depthwise conv's output channels) shrinks its logits to ~1e-9, which any tolerance passes.
    (Batch statistics for the ResNets would put ResNet-50 at 64x64 on the edge of 1e-4: channels
    of tiny variance amplify rounding.)"""
    model = copy.deepcopy(imagenet_model(name))
    if name == "mobilenet_v2":
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        with torch.no_grad():
            model(torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_have_torchvisions_parameter_counts(name):
    assert sum(p.numel() for p in imagenet_model(name).parameters()) == TORCHVISION_PARAMS[name]
    assert default_config(name).input_size == (3, 224, 224)
    assert default_config(name).mean == (0.485, 0.456, 0.406)


def test_every_model_reports_a_default_input():
    for name in MODELS.names():
        size = default_config(name).input_size
        assert len(size) == 3 and size[0] == 3
    assert default_config("resnet20").input_size == (3, 32, 32)
    assert default_config("vgg16_bn").mean is None  # the dataset's own statistics
    with pytest.raises(KeyError, match="unknown model"):
        default_config("resnet1000")


def test_imagenet_models_keep_torchvisions_state_dict_names():
    expected = {
        "resnet18": {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                     "layer4.1.bn2.running_var": (512,), "fc.weight": (1000, 512)},
        "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1),
                     "layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.weight": (2048,),
                     "fc.weight": (1000, 2048)},
        "mobilenet_v2": {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
                         "features.1.conv.1.weight": (16, 32, 1, 1), "features.2.conv.0.0.weight": (96, 16, 1, 1),
                         "features.17.conv.3.weight": (320,), "features.18.0.weight": (1280, 320, 1, 1),
                         "classifier.1.weight": (1000, 1280)},
        "vgg16_bn_imagenet": {"features.0.bias": (64,), "features.41.running_mean": (512,),
                              "classifier.0.weight": (4096, 25088), "classifier.6.weight": (1000, 4096)},
    }
    for name, shapes in expected.items():
        state = imagenet_model(name).state_dict()
        assert {key: tuple(state[key].shape) for key in shapes} == shapes


def test_resnet50_strides_on_the_3x3_as_torchvision_v1_5():
    block = imagenet_model("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_forward_small_inputs(name):
    """At 64x64 (1 and 3 planes at 28x28 and 32x32: test_every_model_takes_both_input_kinds)."""
    with torch.no_grad():
        assert imagenet_model(name).eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_resnet18_forwards_its_default_224_input():
    with torch.no_grad():
        assert imagenet_model("resnet18").eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_a_few_resnet18_train_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=3).train()
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name, selected", [
    ("resnet18", [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]),
    ("resnet50", [f"layer{s}.{b}.conv2" for s, n in zip(range(1, 5), [3, 4, 6, 3]) for b in range(n)]),
    ("vgg16_bn_imagenet", [f"features.{i}" for i in (3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)]),
])
def test_clicktrain_selects_the_3x3_convs_of_imagenet_models(name, selected):
    """Only 3x3 convs with groups=1: the 7x7 stem, 1x1 convs and downsamples stay dense (and the
    default ``skip_first_conv`` skips VGG's first conv)."""
    pruner = ClickTrainPruner(imagenet_model(name), PruningConfig())
    assert [layer.name for layer in pruner.layers] == selected


def test_clicktrain_finds_only_mobilenet_v2s_stem_to_prune():
    """Every other 3x3 conv is depthwise (groups = channels): no kernel patterns to pick."""
    model = imagenet_model("mobilenet_v2")
    assert sum(m.kernel_size == (3, 3) and m.groups > 1 for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)) == 17
    with pytest.raises(PruningError, match="no prunable 3x3 conv"):
        ClickTrainPruner(model, PruningConfig())
    pruner = ClickTrainPruner(model, PruningConfig(skip_first_conv=False))
    assert [layer.name for layer in pruner.layers] == ["features.0.0"]


@pytest.mark.parametrize("name", IMAGENET)
def test_prunetrain_removes_dead_channels_of_imagenet_models_without_changing_outputs(name):
    """Zero every weight touching a third of each node's channels: PruneTrain removes exactly those
    and the logits stay the same, so each node lists every layer its channels touch."""
    torch.manual_seed(0)
    model = comparable(name, 32)
    x = torch.randn(2, 3, 32, 32)
    method = PruneTrain(model, PruningConfig(method="prunetrain"))
    assert len(method.nodes) >= 8
    dead = {}
    with torch.no_grad():
        for node in method.nodes:
            dead[node.name] = torch.arange(0, node.width, 3)
            for conv, _ in node.producers:
                conv.weight[dead[node.name]] = 0
            for reader in node.consumers:
                reader.weight[:, dead[node.name]] = 0
        before = model(x)
        assert method.reconfigure() == sum(len(d) for d in dead.values())
        after = model(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    for node in method.nodes:
        assert node.width == method.widths[node.name] - len(dead[node.name])


def _onnx_matches_torch(model: torch.nn.Module, x: torch.Tensor) -> None:
    logits, reference = onnxruntime_and_torch(model, x)
    assert np.abs(reference).max() > 0.1  # a real comparison, not of ~0 logits
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_imagenet_models_export_to_onnx_at_64(name):
    torch.manual_seed(0)
    _onnx_matches_torch(comparable(name, 64), torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_vgg16_bn_imagenet_exports_to_onnx_at_224():
    """~20 s, most of it the TorchScript exporter and onnxruntime handling 550 MB of weights. At
    64x64 that exporter refuses the 7x7 adaptive pool (2x2 maps are not a multiple of 7); the
    project's own exporter (dynamo=True) decomposes it and exports any size."""
    torch.manual_seed(0)
    _onnx_matches_torch(imagenet_model("vgg16_bn_imagenet").eval(), torch.randn(1, 3, 224, 224))
