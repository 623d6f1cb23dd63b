"""Wall-clock timing that stays fair between variants: calibrated repetitions, interleaved rounds."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def calls_per_sample(fn: Callable[[], object], budget_s: float = 0.2) -> int:
    """Warm ``fn`` up and return how many calls fill about ``budget_s`` seconds."""
    fn()
    started = time.perf_counter()
    fn()
    return max(1, int(budget_s / max(time.perf_counter() - started, 1e-6)))


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int,
                        budget_s: float = 0.2) -> dict[str, float]:
    """Milliseconds per call of each function: the median of ``rounds`` rounds, where every round
    times every function once, so load that drifts during the run hits all of them alike."""
    reps = {name: calls_per_sample(fn, budget_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - started) / reps[name] * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
