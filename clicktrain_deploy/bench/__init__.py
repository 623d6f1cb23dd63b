"""Measure compiled models against the dense baselines, side by side in one run.

x86: whole-model and per-conv latency of our pattern-sparse build, our dense build, onnxruntime and
torch at each thread count (interleaved rounds). ARM: retired instructions per inference under
qemu-user. Every ratio sits beside the FLOP-reduction limit it could reach.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..compile.build import compile_model
from ..contract import load_onnx
from ..passes.onnx_passes import verify
from .arm import arm_instructions
from .flops import flop_reduction_limit, layer_work
from .host import measure_in_child
from .markdown import to_markdown

__all__ = ["benchmark", "to_markdown"]


def benchmark(onnx_path: str | Path, work_dir: str | Path, *, checkpoint: str | Path | None = None,
              threads: tuple[int, ...] = (1, 2), rounds: int = 9, arm_cpu: str | None = "cortex-a72",
              sparse_library: str | Path | None = None) -> dict:
    """Compile ``onnx_path`` sparse and dense for the host (and ``arm_cpu``), measure, return a
    JSON-ready dict: whole-model ms and per-layer us per thread count, ARM instructions, limits.
    ``sparse_library``: an x86 build of ``onnx_path`` made by ``compile_model`` (manifest beside
    it) to measure instead of compiling one."""
    work_dir = Path(work_dir)
    model = load_onnx(onnx_path)
    work = layer_work(model, verify(model))
    if sparse_library is None:
        sparse_library = compile_model(onnx_path, "x86", work_dir / "sparse_x86.so").library
    manifest = json.loads(Path(sparse_library).with_suffix(".json").read_text())
    dense = compile_model(onnx_path, "x86", work_dir / "dense_x86.so", sparse=False)
    request = {"onnx": str(onnx_path), "sparse_lib": str(sparse_library), "dense_lib": str(dense.library),
               "checkpoint": str(checkpoint) if checkpoint else None, "rounds": rounds}
    host = {str(t): measure_in_child(request, t) for t in threads}
    kernels = {layer["layer"]: layer for layer in manifest["layers"] if layer["op"] == "conv"}
    return {
        "date": datetime.date.today().isoformat(),
        "machine": manifest["tvm_target"].get("mcpu", "host"),
        "onnx": str(onnx_path),
        "flop_reduction_limit": flop_reduction_limit(work),
        "layers": [{"layer": w.layer, "shape": kernels[w.layer]["shape"], "kernel": kernels[w.layer]["kernel"],
                    "reason": kernels[w.layer]["reason"], "flop_limit": w.limit}
                   for w in work if w.node.op_type == "Conv"],
        "x86": {t: result["whole_ms"] for t, result in host.items()},
        "x86_layers_us": {t: result["layers_us"] for t, result in host.items()},
        "arm": {"cpu": arm_cpu, **arm_instructions(onnx_path, work_dir, arm_cpu)} if arm_cpu else None,
    }
