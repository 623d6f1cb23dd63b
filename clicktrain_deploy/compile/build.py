"""ONNX file -> deployable library (.so) and JSON manifest for one target."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from ..export.onnx_export import load_onnx, model_info
from ..fileio import atomic_write_json
from ..passes.onnx_passes import verify
from ..passes.relax_passes import deploy_pipeline
from .lower import CompileError, HostTimer, lower_onnx
from .targets import TARGETS, TargetSpec


@dataclass
class CompiledModel:
    library: Path
    manifest: dict
    target: TargetSpec


def compile_model(onnx_path: str | Path, target_name: str, output: str | Path,
                  measure: bool = True, sparse: bool = True, batch: int = 1) -> CompiledModel:
    """Compile ``onnx_path`` for ``target_name`` into ``output`` (.so) plus ``output``.json.

    Convs named in the (verified) pattern metadata get the sparse kernel where it is faster
    (measured on the host for host targets, estimated otherwise); the manifest lists every layer's
    kernel and why. ``sparse=False`` ignores the metadata: every conv gets our dense kernel.
    ``batch``: images per call, fixed at compile time (CUDA targets; CPU builds take 1).
    Both files are written atomically.
    """
    target = TARGETS.get(target_name)()
    if batch != 1 and target.device != "cuda":
        raise CompileError(f"batch {batch}: {target.name} builds take batch 1; a fixed batch is for CUDA targets")
    model = load_onnx(onnx_path)
    metadata = verify(model)
    started = time.perf_counter()
    device_code = None
    if target.device == "cuda":
        from .cuda.lower import lower_onnx_cuda
        from .cuda.toolchain import build_cuda

        module, layers, layout = lower_onnx_cuda(model, metadata if sparse else None, target, batch)
        executable, device_code = build_cuda(module, target)
    else:
        timer = HostTimer(target) if measure and target.runs_on_host else None
        module, layers, layout = lower_onnx(model, metadata if sparse else None, target, timer)
        executable = tvm.compile(module, target=tvm.target.Target(target.tvm_target),
                                 relax_pipeline=deploy_pipeline())
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.so")
    try:
        if target.cross_compiler:
            from tvm.support import cc
            executable.export_library(str(tmp), fcompile=cc.cross_compiler(target.cross_compiler))
        else:
            executable.export_library(str(tmp))
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    graph_input = model.graph.input[0]
    manifest = {
        "target": target.name, "tvm_target": target.tvm_target, "layout": asdict(layout),
        "source": str(onnx_path), "library": output.name,
        "inputs": [{"name": graph_input.name, "shape": [batch, *[d.dim_value for d in
                    graph_input.type.tensor_type.shape.dim[1:]]], "dtype": "float32"}],
        "outputs": [{"name": o.name, "dtype": "float32"} for o in model.graph.output],
        "model_info": model_info(model), "compile_seconds": round(time.perf_counter() - started, 2),
        "layers": [layer.to_dict() for layer in layers],
    }
    if device_code is not None:
        manifest["device_code"] = device_code
    atomic_write_json(output.with_suffix(".json"), manifest)
    return CompiledModel(output, manifest, target)


def run_on_host(library: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Run a host-compiled library on inputs (N, C, H, W), one image at a time (libraries are
    built for batch 1); returns the logits (N, classes)."""
    module = tvm.runtime.load_module(str(library))
    vm = relax.VirtualMachine(module, tvm.cpu())
    images = np.ascontiguousarray(inputs, np.float32)
    return np.concatenate([vm["main"](tvm.runtime.tensor(image[None])).numpy() for image in images])
