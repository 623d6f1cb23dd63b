"""Deterministic ARM cost: retired aarch64 instructions per inference under qemu-user."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compile.arm import instructions_per_inference
from ..compile.build import compile_model


def arm_instructions(onnx_path: str | Path, work_dir: str | Path, cpu: str = "cortex-a72") -> dict[str, int]:
    """Instructions of one batch-1 inference of our pattern-sparse and our dense build for ``cpu``
    (1 thread, qemu ``-cpu`` pinned): {"ours_sparse": n, "ours_dense": n}."""
    counts = {}
    for sparse in (True, False):
        name = "ours_sparse" if sparse else "ours_dense"
        built = compile_model(onnx_path, cpu, Path(work_dir) / f"{name}_{cpu}.so", sparse=sparse)
        image = np.random.default_rng(0).standard_normal(built.manifest["inputs"][0]["shape"]).astype(np.float32)
        counts[name] = instructions_per_inference(built.library, image, cpu)
    return counts
