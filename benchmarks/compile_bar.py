"""Issue #4's x86 bar, measured: whole model at batch 1, ours (pattern-sparse and dense) vs
onnxruntime vs torch, at 1 and 2 threads, interleaved rounds in one process per thread count.

    .venv/bin/python benchmarks/compile_bar.py --run runs/fashion_resnet20 --out benchmarks/results/compile_bar
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _time(fn, rounds: int, budget_s: float = 0.2) -> list[float]:
    fn()
    started = time.perf_counter()
    fn()
    reps = max(1, int(budget_s / max(time.perf_counter() - started, 1e-6)))
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - started) / reps * 1e3)
    return samples


def measure(args: argparse.Namespace) -> dict:
    """Runs inside a process whose thread counts were fixed before any runtime started."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import tvm
    from tvm import relax

    from clicktrain_deploy.export.check import onnxruntime_session
    from clicktrain_deploy.train import load_checkpoint, restore_model

    threads = args.threads
    torch.set_num_threads(threads)
    model, _ = restore_model(load_checkpoint(args.run))
    model.eval()
    shape = [1, *json.loads(Path(args.sparse_lib).with_suffix(".json").read_text())["inputs"][0]["shape"][1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    session = onnxruntime_session(Path(args.onnx).read_bytes(), threads)
    io = session.io_binding()
    io.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x))
    io.bind_output("logits")
    vms = {}
    for name, lib in (("ours_sparse", args.sparse_lib), ("ours_dense", args.dense_lib)):
        vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
        tx = tvm.runtime.tensor(x)
        vms[name] = (vm, tx)
    tx = torch.from_numpy(x)

    def run_torch():
        with torch.no_grad():
            model(tx)

    fns = {"onnxruntime": lambda: session.run_with_iobinding(io), "torch": run_torch,
           **{name: (lambda vm=vm, t=t: vm["main"](t)) for name, (vm, t) in vms.items()}}
    samples = {name: [] for name in fns}
    for _ in range(args.rounds):  # interleave: each round times every variant once
        for name, fn in fns.items():
            samples[name] += _time(fn, 1)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/fashion_resnet20"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_bar"))
    parser.add_argument("--work", type=Path, default=Path("runs/compile_bar"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--onnx"), parser.add_argument("--sparse-lib"), parser.add_argument("--dense-lib")
    args = parser.parse_args()
    if args.threads:  # child process: measure and print JSON
        print(json.dumps(measure(args)))
        return
    from clicktrain_deploy.compile.build import compile_model
    from clicktrain_deploy.export.onnx_export import export_onnx
    from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text

    args.work.mkdir(parents=True, exist_ok=True)
    onnx_path = args.work / "model.onnx"
    export_onnx(args.run, onnx_path)
    sparse = compile_model(onnx_path, "x86", args.work / "sparse_x86.so")
    dense = compile_model(onnx_path, "x86", args.work / "dense_x86.so", sparse=False)
    rows = {}
    for threads in (1, 2):
        env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
               "OMP_WAIT_POLICY": "PASSIVE"}
        child = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--threads", str(threads),
                                "--rounds", str(args.rounds), "--onnx", str(onnx_path),
                                "--sparse-lib", str(sparse.library), "--dense-lib", str(dense.library)],
                               env=env, capture_output=True, text=True, check=True)
        rows[threads] = json.loads(child.stdout.strip().splitlines()[-1])
    arm = arm_counts(onnx_path, args.work)
    layers = sparse.manifest["layers"]
    convs = [l for l in layers if l["op"] == "conv"]
    result = {
        "date": datetime.date.today().isoformat(), "machine": sparse.manifest["tvm_target"]["mcpu"],
        "model": str(args.run), "ms": rows,
        "kernels": {k: sum(l["kernel"] == k for l in convs) for k in {l["kernel"] for l in convs}},
        "flop_reduction_limit": _flop_limit(onnx_path), "arm_instructions": arm,
    }
    lines = [f"Measured {result['date']} on this machine (LLVM cpu `{result['machine']}`), model "
             f"`{args.run}`, batch 1, median of {args.rounds} interleaved rounds; conv kernels: "
             f"{result['kernels']}. FLOP-reduction limit of the whole model: "
             f"{result['flop_reduction_limit']:.2f}x.", "",
             "| threads | ours pattern-sparse | ours dense | onnxruntime | torch | sparse vs ORT | "
             "sparse vs our dense | our dense vs ORT |", "|---|---|---|---|---|---|---|---|"]
    for threads, r in rows.items():
        lines.append(f"| {threads} | {r['ours_sparse']:.3f} ms | {r['ours_dense']:.3f} ms | "
                     f"{r['onnxruntime']:.3f} ms | {r['torch']:.3f} ms | "
                     f"{r['onnxruntime'] / r['ours_sparse']:.2f}x | {r['ours_dense'] / r['ours_sparse']:.2f}x | "
                     f"{r['onnxruntime'] / r['ours_dense']:.2f}x |")
    limit = result["flop_reduction_limit"]
    ratio = arm["ours_dense"] / arm["ours_sparse"]
    lines += ["", f"ARM ({arm['cpu']}, NEON, 1 thread, qemu-user retired instructions per inference, "
              "deterministic):", "",
              "| ours pattern-sparse | ours dense | ratio | FLOP-reduction limit | share of limit |",
              "|---|---|---|---|---|",
              f"| {arm['ours_sparse'] / 1e6:.2f} M | {arm['ours_dense'] / 1e6:.2f} M | {ratio:.2f}x | "
              f"{limit:.2f}x | {100 * ratio / limit:.0f}% |"]
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def arm_counts(onnx_path: Path, work: Path, cpu: str = "cortex-a72") -> dict:
    """Instructions per inference of our sparse and dense aarch64 builds under qemu."""
    import numpy as np

    from clicktrain_deploy.compile.arm import instructions_per_inference
    from clicktrain_deploy.compile.build import compile_model

    counts = {"cpu": cpu}
    for name, sparse in (("ours_sparse", True), ("ours_dense", False)):
        built = compile_model(onnx_path, cpu, work / f"{name}_{cpu}.so", sparse=sparse)
        shape = built.manifest["inputs"][0]["shape"]
        image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        counts[name] = instructions_per_inference(built.library, image, cpu)
    return counts


def _flop_limit(onnx_path: Path) -> float:
    """Dense multiply-adds of every conv and Gemm / those left on non-zero weights."""
    import numpy as np
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(onnx_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output})
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dense = sparse = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in weights:
            w = weights[node.input[1]]
            pixels = int(np.prod(shapes[node.output[0]][2:])) if node.op_type == "Conv" else 1
            dense += w.size * pixels
            sparse += int((w != 0).sum()) * pixels
    return dense / sparse


if __name__ == "__main__":
    main()
