"""Deterministic ARM cost: retired aarch64 instructions per inference under qemu-user."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..compile.arm import instructions_per_inference
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
