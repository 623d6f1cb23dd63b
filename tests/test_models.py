import pytest
import torch

from clicktrain_deploy.models import MODELS, create_model


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
