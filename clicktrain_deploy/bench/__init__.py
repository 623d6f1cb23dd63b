"""Measure compiled models against the dense baselines with one harness for every runtime.

x86: whole-model and per-conv latency of our pattern-sparse build, our dense build, onnxruntime and
torch at each thread count, every runtime alone in its own worker process (``bench.host``), every
callable timed by ``bench.timing.run_samples`` (median per-call time of back-to-back calls),
rounds interleaved across runtimes, each runtime's empty-call floor beside it. ARM: retired
instructions per inference under qemu-user. Every ratio sits beside the FLOP-reduction limit it
could reach.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

from .flops import flop_reduction_limit, layer_work
from .host import all_cores, measure
from .markdown import to_markdown
from .timing import MIN_SAMPLE_S, ROUNDS, SAMPLES

__all__ = ["benchmark", "environment", "host_latency", "to_markdown"]

HARNESS = ("each runtime alone in its own process at the thread count; a zero-argument call with inputs "
           "and outputs bound beforehand (onnxruntime: run_with_iobinding; ours: the VM main / the kernel's "
           "PackedFunc; torch: the module / F.conv2d, no autograd); K back-to-back calls per sample "
           f"(K: a sample lasts >= {MIN_SAMPLE_S * 1e3:g} ms), S samples per round, rounds interleaved across "
           "runtimes; median of the per-call times; nothing subtracted (floors: the same call on a one-ReLU model)")


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Where and with what a benchmark ran: CPU, cores, date, versions, commit."""
    import numpy
    import onnx
    import onnxruntime
    import torch
    import tvm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu_model(), "cores": all_cores(), "machine": platform.machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "onnx": onnx.__version__, "numpy": numpy.__version__, "commit": commit,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def host_latency(onnx_path: str | Path, libraries: dict[str, str | Path], work_dir: str | Path, threads: int, *,
                 torch_model: dict | None = None, runtimes: list[str] | None = None, layers: bool = True,
                 rounds: int = ROUNDS, samples: int = SAMPLES, spinning: bool = True, shared: bool = False,
                 env: dict[str, str] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> dict[str, dict]:
    """Latency of each runtime at ``threads`` threads, each alone in its own process.

    ``libraries``: our host builds by runtime name (``{"ours_sparse": .so, "ours_dense": .so}``);
    ``torch_model``: how torch gets the whole model (``bench.host.load_torch_model``; None: per
    layer only); ``runtimes``: which of ours_*, onnxruntime, torch to measure (default all).
    Returns {runtime: {"model_ms", "model", "floors_us", "floors", "layers_us", "layers"}} (the
    plain figures are medians; the others ``Timing`` dicts). ``shared``: all runtimes in one
    process instead (how not to measure threads; kept for the experiment that shows it); ``env``:
    extra worker environment; ``spinning``: onnxruntime's allow_spinning.
    """
    names = runtimes or [*libraries, "onnxruntime", "torch"]
    common = {"onnx": str(onnx_path), "work_dir": str(work_dir), "layers": layers, "spinning": spinning}
    groups = {}
    for name in names:
        spec = {**common, "runtime": name}
        if name in libraries:
            spec["library"] = str(libraries[name])
        if name == "torch" and torch_model:
            spec["torch"] = torch_model
        groups[name] = [spec]
    if shared:
        groups = {"shared": [spec for specs in groups.values() for spec in specs]}
    timings = measure(groups, threads, rounds, samples, on_error=on_error, env=env)
    result: dict[str, dict] = {}
    for key, timing in timings.items():
        runtime, _, what = key.partition("/")
        entry = result.setdefault(runtime, {"floors_us": {}, "floors": {}, "layers_us": {}, "layers": {}})
        if what == "model":
            entry["model_ms"], entry["model"] = timing.median_us / 1e3, timing.to_dict()
        elif what.startswith("floor:"):
            entry["floors_us"][what[6:]], entry["floors"][what[6:]] = timing.median_us, timing.to_dict()
        elif what.startswith("layer:"):
            entry["layers_us"][what[6:]], entry["layers"][what[6:]] = timing.median_us, timing.to_dict()
    return result


def layer_rows(onnx_path: str | Path, manifest: dict) -> list[dict]:
    """Every conv: name, weight shape, the kernel our sparse build chose and why, FLOP limit."""
    from ..contract import read_metadata
    from .flops import load_model

    model = load_model(onnx_path)
    kernels = {layer["layer"]: layer for layer in manifest["layers"] if layer.get("op", "conv") == "conv"}
    rows = []
    for w in layer_work(model, read_metadata(model)):
        if w.node.op_type != "Conv":
            continue
        chosen = kernels.get(w.layer, {})
        rows.append({"layer": w.layer, "shape": chosen.get("shape") or list(_weight_shape(model, w.node)),
                     "kernel": chosen.get("kernel", "-"), "reason": chosen.get("reason", ""),
                     "flop_limit": w.limit})
    return rows


def _weight_shape(model, node) -> tuple[int, ...]:
    for t in model.graph.initializer:
        if t.name == node.input[1]:
            return tuple(t.dims)
    return ()


def compat_layers(rows: list[dict], per_runtime: dict[str, dict]) -> dict[str, dict]:
    """{layer: {runtime: us}} with, for the report, the sparse build's time also under
    ``ours_<kernel>`` when its kernel is pattern or connectivity."""
    out = {}
    for row in rows:
        us = {runtime: r["layers_us"][row["layer"]] for runtime, r in per_runtime.items()
              if row["layer"] in r.get("layers_us", {})}
        if "ours_sparse" in us and row["kernel"] in ("pattern", "connectivity"):
            us[f"ours_{row['kernel']}"] = us["ours_sparse"]
        out[row["layer"]] = us
    return out


def benchmark(onnx_path: str | Path, work_dir: str | Path, *, checkpoint: str | Path | None = None,
              threads: tuple[int, ...] = (1, 2), rounds: int = ROUNDS, arm_cpu: str | None = "cortex-a72",
              sparse_library: str | Path | None = None, samples: int = SAMPLES) -> dict:
    """Compile ``onnx_path`` sparse and dense for the host (and ``arm_cpu``), measure, return a
    JSON-ready dict: whole-model ms, per-layer us and floors per thread count, the timings behind
    them, ARM instructions, limits, environment. ``sparse_library``: an x86 build of
    ``onnx_path`` made by ``compile_model`` (manifest beside it) to measure instead of compiling one."""
    from ..compile.build import compile_model
    from ..contract import read_metadata
    from .arm import arm_instructions
    from .flops import load_model

    work_dir = Path(work_dir)
    model = load_model(onnx_path)
    work = layer_work(model, read_metadata(model))
    if sparse_library is None:
        sparse_library = compile_model(onnx_path, "x86", work_dir / "sparse_x86.so").library
    manifest = json.loads(Path(sparse_library).with_suffix(".json").read_text())
    dense = compile_model(onnx_path, "x86", work_dir / "dense_x86.so", sparse=False)
    libraries = {"ours_sparse": sparse_library, "ours_dense": dense.library}
    torch_model = {"checkpoint": str(checkpoint)} if checkpoint else None
    rows = layer_rows(onnx_path, manifest)
    result = {"date": datetime.date.today().isoformat(), "environment": environment(), "harness": HARNESS,
              "machine": manifest["tvm_target"].get("mcpu", "host") if isinstance(manifest["tvm_target"], dict)
              else "host", "onnx": str(onnx_path), "flop_reduction_limit": flop_reduction_limit(work),
              "layers": rows, "x86": {}, "x86_layers_us": {}, "floors_us": {}, "timings": {}}
    for t in threads:
        per_runtime = host_latency(onnx_path, libraries, work_dir, t, torch_model=torch_model, rounds=rounds,
                                   samples=samples)
        key = str(t)
        result["x86"][key] = {r: v["model_ms"] for r, v in per_runtime.items() if "model_ms" in v}
        result["x86_layers_us"][key] = compat_layers(rows, per_runtime)
        result["floors_us"][key] = {r: v["floors_us"] for r, v in per_runtime.items()}
        result["timings"][key] = per_runtime
    result["arm"] = {"cpu": arm_cpu, **arm_instructions(onnx_path, work_dir, arm_cpu)} if arm_cpu else None
    return result


def thread_counts(spec: str) -> list[int]:
    """"1,all" -> [1, cores]; duplicates dropped, order kept."""
    out: list[int] = []
    for item in spec.split(","):
        n = all_cores() if item.strip() == "all" else int(item)
        if n not in out:
            out.append(n)
    return out
