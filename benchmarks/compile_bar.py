"""Issue #4's bar, measured: per layer and whole model at batch 1, ours (pattern-sparse and dense) vs
onnxruntime vs torch on x86 at 1 and 2 threads, and ARM retired instructions, for each trained run.

    .venv/bin/python benchmarks/compile_bar.py --run runs/training_bar/clicktrain_B16 \
        --out benchmarks/results/compile_bar
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clicktrain_deploy.bench import benchmark, to_markdown
from clicktrain_deploy.export.onnx_export import export_onnx
from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="trained run directory (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_bar"))
    parser.add_argument("--work", type=Path, default=Path("runs/compile_bar"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--arm-cpu", default="cortex-a72")
    args = parser.parse_args()
    results, sections = {}, []
    for run in args.run:
        work = args.work / run.name
        work.mkdir(parents=True, exist_ok=True)
        onnx_path = export_onnx(run, work / "model.onnx").path
        results[str(run)] = benchmark(onnx_path, work, checkpoint=run, rounds=args.rounds, arm_cpu=args.arm_cpu)
        sections.append(to_markdown(results[str(run)], f"**{run.name}** (`{run}`). "))
    atomic_write_json(args.out.with_suffix(".json"), results)
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
