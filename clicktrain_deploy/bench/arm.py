"""Deterministic ARM cost: retired aarch64 instructions per inference under qemu-user."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compile.arm import instructions_per_inference
from ..compile.arm.ort import run_onnxruntime_arm
from ..compile.build import compile_model


def arm_instructions(onnx_path: str | Path, work_dir: str | Path, cpu: str = "cortex-a72", *,
                     target: str | None = None, sparse_library: str | Path | None = None) -> dict[str, int]:
    """Instructions of one batch-1 inference of our pattern-sparse and our dense build for
    ``target`` (default: the target named ``cpu``), run under qemu ``-cpu cpu`` with 1 thread:
    {"ours_sparse": n, "ours_dense": n}. ``sparse_library``: an existing sparse build to count."""
    target = target or cpu
    counts = {}
    for sparse in (True, False):
        name = "ours_sparse" if sparse else "ours_dense"
        if sparse and sparse_library is not None:
            library = Path(sparse_library)
            shape = json.loads(library.with_suffix(".json").read_text())["inputs"][0]["shape"]
        else:
            built = compile_model(onnx_path, target, Path(work_dir) / f"{name}_{target}.so", sparse=sparse)
            library, shape = built.library, built.manifest["inputs"][0]["shape"]
        image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        counts[name] = instructions_per_inference(library, image, cpu)
    return counts


@dataclass
class OrtArmCount:
    """onnxruntime's aarch64 build under qemu: instructions of one inference, from
    (count at ``runs[1]`` - count at ``runs[0]``) / (runs[1] - runs[0]) session.run calls in one
    process each, the two process totals, and the outputs of the longer run."""
    per_inference: int
    totals: dict[int, int]
    outputs: list[np.ndarray]


def measure_onnxruntime_arm(onnx_path: str | Path, inputs: list[np.ndarray], runs: tuple[int, int] = (1, 11),
                            cpu: str = "cortex-a72", timeout: float = 600) -> OrtArmCount:
    """Count onnxruntime-aarch64 (the runtime an ARM user would pick) on ``inputs`` under
    ``qemu-aarch64 -cpu cpu``, one thread, like ``instructions_per_inference`` counts ours.
    Interpreter and session start-up cancel in the difference; the Python ``session.run`` call
    itself (a few thousand instructions) is part of each inference, as it is for a user.
    ``timeout``: seconds each qemu run may take."""
    few, many = runs
    if not 0 <= few < many:
        raise ValueError(f"runs={runs}: need 0 <= fewer < more")
    _, low = run_onnxruntime_arm(onnx_path, inputs, runs=few, cpu=cpu, count=True, timeout=timeout)
    outputs, high = run_onnxruntime_arm(onnx_path, inputs, runs=many, cpu=cpu, count=True, timeout=timeout)
    return OrtArmCount(round((high - low) / (many - few)), {few: low, many: high}, outputs)


def onnxruntime_arm_instructions(onnx_path: str | Path, inputs: list[np.ndarray], runs: tuple[int, int] = (1, 11),
                                 cpu: str = "cortex-a72", timeout: float = 600) -> int:
    """Guest instructions of one onnxruntime-aarch64 inference (see ``measure_onnxruntime_arm``)."""
    return measure_onnxruntime_arm(onnx_path, inputs, runs, cpu, timeout).per_inference
