"""Issue #5's GPU bar: our CUDA builds against onnxruntime (1e-4), then per layer and whole model,
ours pattern-sparse vs ours dense vs torch (cuDNN), at batch 1 and 32, on the machine's GPU.

    .venv/bin/python benchmarks/cuda_bar.py --run runs/training_bar/clicktrain_B16 --out benchmarks/results/cuda_bar
    .venv/bin/python benchmarks/cuda_bar.py --run ... --compile-only   # no GPU: builds and plans, times nothing
    .venv/bin/python benchmarks/cuda_bar.py --run ... --emulate --batches 1 2 --rounds 1 --out /tmp/x
        # no GPU: the whole script on the CPU, with the GPU kernels' statements emulated (figures meaningless)

The torch column needs a CUDA build of torch on the GPU machine (the project pins the CPU wheel).
Timings are device-synchronised wall time per call, median of interleaved rounds: every variant
is timed once per round, so drift hits all alike. "ours" per layer is one generated kernel (conv,
bias, residual and ReLU fused); torch per layer is cuDNN's conv with bias, then the residual add
and ReLU as torch eager runs them. Whole model: our Relax VM call vs the torch module (BN unfolded,
as trained) under ``torch.no_grad`` with ``cudnn.benchmark``.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def kernel_calls(module) -> list[dict]:
    """The ``call_tir`` calls of a lowered module's main, in order: kernel name, argument shapes,
    constant arguments (numpy) and output shape."""
    calls = []
    for binding in module["main"].body.blocks[0].bindings:
        call = binding.value
        if getattr(getattr(call, "op", None), "name", None) != "relax.call_tir":
            continue
        args = [a.value.numpy() if hasattr(a, "value") else tuple(int(d) for d in a.ty.shape)
                for a in call.args[1].fields]
        calls.append({"kernel": call.args[0].name_hint, "args": args,
                      "out": tuple(int(d) for d in call.ty.shape)})
    return calls


def interleaved(fns: dict[str, Callable], sync: Callable, rounds: int, sample_s: float = 0.02) -> dict:
    """Median ms per call of each function, timed in interleaved rounds of ~sample_s each."""
    reps = {}
    for name, fn in fns.items():
        fn(), sync()
        started = time.perf_counter()
        fn(), sync()
        reps[name] = max(1, int(sample_s / max(time.perf_counter() - started, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            started = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - started) / reps[name] * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def build(onnx_path: Path, target: str, work: Path, batches: list[int], emulate: bool) -> dict:
    """Sparse and dense libraries for every batch, and their kernel calls (by kernel name)."""
    from clicktrain_deploy.compile.build import CompiledModel, compile_model, lower_model
    from clicktrain_deploy.compile.cuda.toolchain import build_emulated
    from clicktrain_deploy.compile.frontend import import_onnx
    from clicktrain_deploy.compile.targets import TARGETS

    builds = {}
    for batch in batches:
        imported = import_onnx(onnx_path, batch=batch)
        for variant, sparse in (("sparse", True), ("dense", False)):
            library = work / f"{variant}_b{batch}.so"
            lowered = lower_model(imported, TARGETS.get(target)(), sparse, emulate=emulate)
            module, layers = lowered.module, lowered.layers
            if emulate:
                build_emulated(module).export_library(str(library))
                built = CompiledModel(library, {"layers": [l.to_dict() for l in layers], "device_code": {}},
                                      TARGETS.get(target)())
            else:
                built = compile_model(onnx_path, target, library, sparse=sparse, batch=batch)
                print(f"built {variant} batch {batch}: {built.manifest['compile_seconds']} s, "
                      f"{built.manifest['device_code']}", flush=True)
            builds[variant, batch] = (built, kernel_calls(module))
    return builds


def validate(builds: dict, onnx_path: Path, images: np.ndarray, device) -> dict:
    """Max |ours - onnxruntime| per build on real images; fails beyond 1e-4 + 1e-4 * max|logit|."""
    import tvm
    from tvm import relax

    from clicktrain_deploy.export.check import onnxruntime_session

    session = onnxruntime_session(onnx_path.read_bytes())
    diffs = {}
    for (variant, batch), (built, _) in builds.items():
        x = images[:batch]
        expected = session.run(None, {"input": x})[0]
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(built.library)), device)
        diff = float(np.abs(vm["main"](tvm.runtime.tensor(x, device)).numpy() - expected).max())
        if diff > 1e-4 + 1e-4 * float(np.abs(expected).max()):
            raise SystemExit(f"{variant} batch {batch}: max |diff| {diff:.2e} vs onnxruntime is beyond 1e-4")
        diffs[f"{variant}_b{batch}"] = diff
    return diffs


def measure(builds: dict, run: Path, images: np.ndarray, rounds: int, device) -> dict:
    import torch
    import tvm
    from tvm import relax

    from clicktrain_deploy.train import load_checkpoint, restore_model

    torch_device = "cuda" if device.dlpack_device_type() == tvm.cuda(0).dlpack_device_type() else "cpu"
    torch.backends.cudnn.benchmark = True
    model = restore_model(load_checkpoint(run))[0].eval().to(torch_device)

    def sync():
        device.sync()
        if torch_device == "cuda":
            torch.cuda.synchronize()

    results = {"whole": {}, "layers": {}}
    for batch in sorted({batch for _, batch in builds}):
        x = images[:batch]
        libs = {v: tvm.runtime.load_module(str(builds[v, batch][0].library)) for v in ("sparse", "dense")}
        vms = {v: relax.VirtualMachine(lib, device) for v, lib in libs.items()}
        tx = tvm.runtime.tensor(x, device)
        torch_x = torch.from_numpy(x).to(torch_device)

        def run_torch():
            with torch.no_grad():
                model(torch_x)

        results["whole"][batch] = interleaved(
            {"ours_sparse": lambda: vms["sparse"]["main"](tx), "ours_dense": lambda: vms["dense"]["main"](tx),
             "torch": run_torch}, sync, rounds)
        results["layers"][batch] = _layers(builds, batch, libs, device, torch_device, sync, rounds)
        print(f"batch {batch}: {results['whole'][batch]}", flush=True)
    return results


def _layers(builds, batch, libs, device, torch_device, sync, rounds) -> list[dict]:
    """Per conv: our sparse kernel, our dense kernel and torch on the same shapes."""
    import torch
    import tvm

    rng = np.random.default_rng(0)
    manifests = {v: {l["layer"]: l for l in builds[v, batch][0].manifest["layers"] if l["kernel"] != "tvm"}
                 for v in ("sparse", "dense")}
    calls = {v: {c["kernel"]: c for c in builds[v, batch][1]} for v in ("sparse", "dense")}
    rows = []
    for name, layer in manifests["sparse"].items():  # each layer's kernel in both builds, by name
        sparse_call, dense_call = (calls[v][manifests[v][name]["function"]] for v in ("sparse", "dense"))
        x_shape, out = sparse_call["args"][0], sparse_call["out"]
        if layer["shape"][:2] != [out[1], x_shape[1]] or dense_call["out"] != out:
            raise SystemExit(f"{name}: the manifest's kernel {layer['function']} does not have the layer's shape")
        fns = {}
        for variant, call in (("ours_sparse", sparse_call), ("ours_dense", dense_call)):
            tensors = [tvm.runtime.tensor(a if isinstance(a, np.ndarray) else rng.standard_normal(a).astype(np.float32),
                                          device) for a in call["args"]]
            tensors.append(tvm.runtime.empty(call["out"], "float32", device))
            kernel = libs[variant[5:]].get_function(call["kernel"], query_imports=True)
            fns[variant] = lambda kernel=kernel, tensors=tensors: kernel(*tensors)
        stride = layer["attributes"]["stride"][0]
        size = layer["attributes"]["kernel"][0]
        x = torch.randn(x_shape, device=torch_device)
        w = torch.randn(out[1], x_shape[1], size, size, device=torch_device)
        b = torch.randn(out[1], device=torch_device)
        r = torch.randn(out, device=torch_device) if len(sparse_call["args"]) == 6 else None

        def run_torch(x=x, w=w, b=b, r=r, stride=stride, pad=size // 2):
            with torch.no_grad():
                y = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=pad)
                torch.relu_(y if r is None else y.add_(r))

        fns["torch"] = run_torch
        rows.append({"layer": layer["layer"], "kernel": layer["kernel"], "shape": [*x_shape[1:], out[1]],
                     "kept_fraction": layer["kept_fraction"], **interleaved(fns, sync, rounds)})
    return rows


def report(result: dict) -> str:
    lines = [f"Measured {result['date']} on {result['gpu']} ({result['arch']}, nvcc {result['nvcc']}, "
             f"torch {result['torch']}), model `{result['model']}`; median of {result['rounds']} interleaved "
             "rounds, device-synchronised ms per call.", "",
             "Outputs vs onnxruntime (max |diff|, real test images): "
             + ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff"].items()), "",
             "| batch | ours pattern-sparse | ours dense | torch (cuDNN) | sparse vs torch | sparse vs our dense |",
             "|---|---|---|---|---|---|"]
    for batch, r in result["whole"].items():
        lines.append(f"| {batch} | {r['ours_sparse']:.3f} ms | {r['ours_dense']:.3f} ms | {r['torch']:.3f} ms | "
                     f"{r['torch'] / r['ours_sparse']:.2f}x | {r['ours_dense'] / r['ours_sparse']:.2f}x |")
    for batch, rows in result["layers"].items():
        lines += ["", f"Per conv layer, batch {batch} (ms):", "",
                  "| layer | kernel | C_in, H, W, C_out | kept | ours sparse | ours dense | torch | sparse vs torch |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['layer']} | {row['kernel']} | {row['shape']} | {row['kept_fraction']:.2f} | "
                         f"{row['ours_sparse']:.4f} | {row['ours_dense']:.4f} | {row['torch']:.4f} | "
                         f"{row['torch'] / row['ours_sparse']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/training_bar/clicktrain_B16"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cuda_bar"))
    parser.add_argument("--work", type=Path, default=Path("runs/cuda_bar"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compile-only", action="store_true", help="build and plan without a GPU")
    parser.add_argument("--emulate", action="store_true",
                        help="run everything on the CPU with emulated GPU kernels (checks the script, not speed)")
    args = parser.parse_args()

    import tvm

    from clicktrain_deploy.compile.cuda.toolchain import gpu_present
    from clicktrain_deploy.export.onnx_export import export_onnx, reference_batches
    from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text
    from clicktrain_deploy.train import load_checkpoint

    on_gpu = gpu_present()
    if not (args.compile_only or args.emulate or on_gpu):
        raise SystemExit("no NVIDIA GPU here: run with --compile-only or --emulate, or on a GPU machine")
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "") if on_gpu else "sm_90"
    args.work.mkdir(parents=True, exist_ok=True)
    onnx_path = args.work / "model.onnx"
    export_onnx(args.run, onnx_path)
    builds = build(onnx_path, f"cuda-{arch.replace('_', '')}", args.work, args.batches, args.emulate)
    for (variant, batch), (_, calls) in builds.items():
        convs = [c for c in calls if c["kernel"].startswith("conv")]
        print(f"{variant} batch {batch}: {len(calls)} kernels, {len(convs)} convs, input {calls[0]['args'][0]}")
    if args.compile_only:
        return
    import torch

    if not (args.emulate or torch.cuda.is_available()):
        raise SystemExit(f"torch {torch.__version__} has no CUDA: install a CUDA build of torch for the torch column")
    device = tvm.cpu() if args.emulate else tvm.cuda(0)
    batches = reference_batches(load_checkpoint(args.run), max(args.batches), max(args.batches)).epoch(0)
    images = next(iter(batches))[0].numpy().astype(np.float32)
    diffs = validate(builds, onnx_path, images, device)
    measured = measure(builds, args.run, images, args.rounds, device)
    result = {"date": datetime.date.today().isoformat(),
              "gpu": "CPU emulation (not a GPU figure)" if args.emulate else tvm.cuda(0).device_name,
              "arch": arch, "nvcc": builds["sparse", args.batches[0]][0].manifest["device_code"].get("nvcc"),
              "torch": torch.__version__, "model": str(args.run), "rounds": args.rounds,
              "max_abs_diff": diffs, **measured}
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), report(result))
    print(report(result))


if __name__ == "__main__":
    main()
