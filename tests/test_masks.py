import math

import pytest
import torch
from torch import nn

from clicktrain_deploy.pruning.clicktrain import estimate_importance, PrunedLayer
from clicktrain_deploy.pruning.masks import (
    REMOVED, block_sum, group_lasso, removal_count, select_layer_mask,
)
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES


def _importance(c_out, c_in, seed=0):
    return torch.rand(c_out, c_in, 3, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c_out,c_in,block,ratio", [
    (16, 16, 1, 0.72), (32, 16, 4, 0.72), (64, 32, 16, 0.75), (20, 7, 16, 0.5), (10, 3, 4, 0.0),
])
def test_masks_conform_exactly(c_out, c_in, block, ratio):
    library = PATTERN_LIBRARIES.get("clicktrain8")()
    mask = select_layer_mask(_importance(c_out, c_in), library, block, ratio)
    groups = math.ceil(c_out / block) * c_in
    assert mask.pattern_ids.shape == (math.ceil(c_out / block), c_in)
    assert int((mask.pattern_ids == REMOVED).sum()) == removal_count(groups, ratio)
    dense = mask.dense(library).view(c_out, c_in, 9).bool()
    patterns = {tuple(p.tolist()) for p in library}
    for o in range(c_out):
        for i in range(c_in):
            kernel = tuple(dense[o, i].tolist())
            # every kernel is removed or exactly one library pattern...
            assert kernel == (False,) * 9 or kernel in patterns
            # ...and identical across the B output channels of its block
            assert kernel == tuple(dense[(o // block) * block, i].tolist())


def test_removal_count_is_the_papers_ceil_without_float_noise():
    assert removal_count(100, 0.72) == 72
    assert removal_count(16, 0.72) == 12
    assert removal_count(10, 0.0) == 0


def test_pattern_choice_and_connectivity_follow_importance():
    library = PATTERN_LIBRARIES.get("clicktrain4")()
    importance = torch.zeros(2, 3, 3, 3)
    importance[0, 0] = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 1]])  # pattern 0, total 4
    importance[1, 0] = torch.tensor([[5, 5, 0], [5, 5, 0], [0, 0, 0]])  # pattern 3, total 20
    importance[0, 1] = torch.full((3, 3), 0.01)                       # least important
    importance[1, 2] = torch.tensor([[0, 2, 2], [0, 2, 2], [0, 0, 0]])  # pattern 2
    mask = select_layer_mask(importance, library, block_size=1, ratio=0.5)
    ids = mask.pattern_ids
    assert ids[0, 0] == 0 and ids[1, 0] == 3 and ids[1, 2] == 2
    assert ids[0, 1] == REMOVED
    assert int((ids == REMOVED).sum()) == 3  # the three all-zero-or-smallest groups


def test_block_sum_pads_the_last_short_block():
    x = torch.arange(5.0)[:, None]
    assert block_sum(x, 2).flatten().tolist() == [1.0, 5.0, 4.0]


def test_importance_matches_a_hand_computation():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    batches = [(torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 1, 0])) for _ in range(3)]
    loss_fn = nn.functional.cross_entropy
    expected = torch.zeros_like(conv.weight)
    for x, y in batches:
        (grad,) = torch.autograd.grad(loss_fn(model(x), y), conv.weight)
        expected += (conv.weight.detach() * grad) ** 2
    got = estimate_importance(model, [PrunedLayer("0", conv, 1, 0.5)], batches, loss_fn)["0"]
    torch.testing.assert_close(got, expected)
    assert conv.weight.grad is None


def test_importance_leaves_batchnorm_statistics_untouched():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 9, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 1, 3, 3), torch.randint(0, 2, (8,)))]
    estimate_importance(model, [PrunedLayer("0", model[0], 1, 0.5)], batches,
                        nn.functional.cross_entropy)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_group_lasso_matches_the_papers_per_kernel_form_at_b1_and_scales_with_blocks():
    weight = torch.randn(4, 2, 3, 3)
    removal = torch.ones(4, 2, 3, 3)
    per_kernel = weight.pow(2).sum((2, 3)).add(1e-8).sqrt().sum()
    torch.testing.assert_close(group_lasso(weight, removal, 1), per_kernel)
    block = weight.pow(2).sum((2, 3)).view(2, 2, 2).sum(1).add(1e-8).sqrt().sum() * math.sqrt(2)
    torch.testing.assert_close(group_lasso(weight, removal, 2), block)
