"""The numerical gate of ``compile``: the built library against onnxruntime on random inputs.

The library runs where its target runs: host CPUs in this process, aarch64 under qemu-user, CUDA
on a GPU when one is here (otherwise the check is "skipped", and says why; skipped is never
passed). A library whose largest difference exceeds ``tolerance`` x max(1, largest reference
magnitude) is not written.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

from .targets import TargetSpec

TOLERANCE = 1e-4


@dataclass
class GateResult:
    status: str              # "passed", "failed" or "skipped"
    runtime: str             # where the library ran: "host", "qemu-aarch64 -cpu ...", "cuda"
    tolerance: float = TOLERANCE
    max_abs_diff: float | None = None
    max_reference: float | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def onnxruntime_outputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs in onnxruntime (CPU), the reference every runtime is held to."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def run_on_host(library: str | Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run a host-built library once on ``inputs`` (at the shapes it was built for)."""
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    return _as_list(result)


def _as_list(result) -> list[np.ndarray]:
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    return [item.numpy() for item in result]


def run_library(library: str | Path, target: TargetSpec, inputs: list[np.ndarray]) -> tuple[list[np.ndarray] | None, str, str]:
    """The library's outputs where its target runs: (outputs or None, runtime, why not)."""
    if target.device == "cuda":
        from .cuda.toolchain import gpu_present, run_on_cuda

        if not gpu_present():
            return None, "cuda", "no NVIDIA GPU on this machine"
        if len(inputs) != 1:
            return None, "cuda", "the CUDA check runs one-input models"
        return [run_on_cuda(library, inputs[0])], "cuda", ""
    if target.cross_compiler:
        from .arm import arm_available, qemu_cpu, run_under_qemu

        runtime = f"qemu-aarch64 -cpu {qemu_cpu(target)}"
        if not arm_available():
            return None, runtime, "the aarch64 runner is not set up (scripts/setup.sh)"
        if len(inputs) != 1 or inputs[0].dtype != np.float32:
            return None, runtime, "the qemu runner takes one float32 input"
        output, _ = run_under_qemu(library, inputs[0], cpu=qemu_cpu(target))
        return [output], runtime, ""
    return run_on_host(library, inputs), "host", ""


def gate(library: str | Path, target: TargetSpec, model: onnx.ModelProto, inputs: dict[str, np.ndarray],
         tolerance: float = TOLERANCE) -> GateResult:
    """Compare ``library`` with onnxruntime running ``model`` on ``inputs``."""
    reference = onnxruntime_outputs(model, inputs)
    outputs, runtime, why_not = run_library(library, target, list(inputs.values()))
    if outputs is None:
        return GateResult("skipped", runtime, tolerance, reason=why_not)
    if len(outputs) != len(reference) or any(o.shape != r.shape for o, r in zip(outputs, reference)):
        return GateResult("failed", runtime, tolerance, reason=f"output shapes {[o.shape for o in outputs]} "
                          f"differ from onnxruntime's {[r.shape for r in reference]}")
    diff = max(float(np.abs(o.astype(np.float64) - r).max(initial=0)) for o, r in zip(outputs, reference))
    scale = max(float(np.abs(r).max(initial=0)) for r in reference)
    passed = np.isfinite(diff) and diff <= tolerance * max(1.0, scale)
    return GateResult("passed" if passed else "failed", runtime, tolerance, diff, scale,
                      "" if passed else f"max |diff| {diff:.3g} > {tolerance:g} x max(1, {scale:.3g})")
