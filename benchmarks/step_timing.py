"""Training-step timing shared by the training benchmarks: every variant steps over the same
batches once per round, interleaved, so load that drifts during the run hits them alike."""
from __future__ import annotations

import statistics
import time

from torch import nn

from clicktrain_deploy.train.trainer import optimizer_step


def median_step_ms(variants: dict[str, tuple], batches: list, rounds: int) -> dict[str, float]:
    """variants: name -> (model, optimizer, pruning method, phase); returns median ms per step."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (model, optimizer, pruner, phase) in variants.items():
            model.train()
            started = time.perf_counter()
            for inputs, labels in batches:
                optimizer_step(nn.functional.cross_entropy(model(inputs), labels), optimizer, pruner, phase)
            times[name].append(1000 * (time.perf_counter() - started) / len(batches))
    return {name: statistics.median(t) for name, t in times.items()}
