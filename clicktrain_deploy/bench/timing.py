"""The one timing function every runtime goes through.

Every runtime is first reduced to a zero-argument callable with its inputs (and, where the runtime
allows, its outputs) bound beforehand; :func:`run_samples` then times it the same way for all:
``k`` back-to-back calls per sample, ``k`` chosen by :func:`calls_per_sample` so that a sample
lasts at least ``min_sample_s`` (2 ms), and the statistic is the median of the per-call times of
all samples (:class:`Timing`). Rounds of samples are interleaved across runtimes (in one process by
:func:`interleaved`, across one process per runtime by ``bench.host``), so load that drifts during
a run hits every runtime alike. Nothing is subtracted: each runtime's cost of an empty call is
measured the same way and reported beside it (``bench.runtimes``' floors).
"""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

MIN_SAMPLE_S = 0.002
SAMPLES = 5
ROUNDS = 5


def calls_per_sample(fn: Callable[[], object], min_sample_s: float = MIN_SAMPLE_S,
                     max_calls: int = 1 << 22) -> int:
    """Warm ``fn`` up, then the smallest power of two ``k`` such that ``k`` back-to-back calls take
    at least ``min_sample_s`` seconds (at least 1); each ``k`` is tried three times and the fastest
    counts, so a preemption during calibration does not cut ``k`` short."""
    for _ in range(3):
        fn()
    k = 1
    while k < max_calls:
        if min(_elapsed(fn, k) for _ in range(3)) >= min_sample_s:
            break
        k *= 2
    return k


def _elapsed(fn: Callable[[], object], k: int) -> float:
    repeat = itertools.repeat(None, k)
    started = time.perf_counter()
    for _ in repeat:
        fn()
    return time.perf_counter() - started


def run_samples(fn: Callable[[], object], k: int, samples: int) -> list[float]:
    """``samples`` samples of ``k`` back-to-back calls: seconds per call of each sample."""
    return [_elapsed(fn, k) / k for _ in range(samples)]


@dataclass(frozen=True)
class Timing:
    """Per-call time of one callable: median of all samples, with quartiles and the fastest sample
    (microseconds), ``calls`` back-to-back calls per sample, ``samples`` samples in all; ``cpu_us``:
    the process's CPU time per call over those samples (every thread: above ``median_us`` x threads
    when idle threads spin)."""

    median_us: float
    q1_us: float
    q3_us: float
    min_us: float
    calls: int
    samples: int
    cpu_us: float | None = None  # process CPU time per call, all threads (where measured)

    @classmethod
    def from_samples(cls, per_call_s: list[float], calls: int, cpu_per_call_s: float | None = None) -> Timing:
        us = sorted(s * 1e6 for s in per_call_s)
        q1, _, q3 = statistics.quantiles(us, n=4, method="inclusive") if len(us) > 1 else (us[0],) * 3
        return cls(statistics.median(us), q1, q3, us[0], calls, len(us),
                   cpu_per_call_s * 1e6 if cpu_per_call_s is not None else None)

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS, samples: int = SAMPLES,
                min_sample_s: float = MIN_SAMPLE_S) -> dict[str, Timing]:
    """Time every callable in this process: calibrate each, then ``rounds`` rounds in each of which
    every callable (in an order rotated by one each round) takes ``samples`` samples."""
    calls = {name: calls_per_sample(fn, min_sample_s) for name, fn in fns.items()}
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_call[name] += run_samples(fns[name], calls[name], samples)
    return {name: Timing.from_samples(per_call[name], calls[name]) for name in fns}


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS,
                        budget_s: float = MIN_SAMPLE_S) -> dict[str, float]:
    """Milliseconds per call of each function (median, :func:`interleaved`)."""
    return {name: t.median_us / 1e3 for name, t in interleaved(fns, rounds, SAMPLES, budget_s).items()}
