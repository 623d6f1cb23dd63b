"""Analytic FLOPs of a model as it stands: shapes as shrunk, exact zeros as skipped.

Training FLOPs per image are counted as 3x the forward FLOPs (forward, gradient of the input,
gradient of the weights), over conv and linear layers, which carry nearly all of the work.
"""
from __future__ import annotations

import torch
from torch import nn

TRAINING_PASSES = 3


@torch.no_grad()
def forward_flops(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> int:
    """FLOPs of one forward pass of one (C, H, W) image: 2 * non-zero weights * output pixels
    per conv, 2 * non-zero weights per linear layer (bias and BN omitted)."""
    total = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        pixels = output.shape[2] * output.shape[3] if isinstance(module, nn.Conv2d) else 1
        total += 2 * int(module.weight.ne(0).sum()) * pixels

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total
