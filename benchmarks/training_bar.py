"""Issue #2's bar, measured: dense vs ClickTrain at B = 1, 4, 16, same model, epochs and seed.

Runs every configuration of one recipe to the end (accuracy, compression, seconds per epoch),
then times single training steps of each phase interleaved on the same batches (robust to other
load on the machine). Writes ``<out>.json`` and a markdown table ``<out>.md``.

    .venv/bin/python benchmarks/training_bar.py --recipe recipes/fashion_resnet20.toml
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from clicktrain_deploy import load_recipe, train
from clicktrain_deploy.data import BatchIterator, load_data
from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text
from clicktrain_deploy.models import create_model
from clicktrain_deploy.pruning.clicktrain import ClickTrainPruner

from step_timing import median_step_ms  # noqa: E402  (same folder)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def full_runs(recipe_path: Path, blocks: list[int], out_root: Path) -> list[dict]:
    rows = []
    for name, block in [("dense", None)] + [(f"clicktrain B={b}", b) for b in blocks]:
        recipe = load_recipe(recipe_path)
        recipe.output_dir = str(out_root / name.replace(" ", "_").replace("=", ""))
        if block is None:
            recipe.pruning.method = "dense"
        else:
            recipe.pruning.block_size = block
        started = time.perf_counter()
        result = train(recipe, resume=True, progress=False)
        seconds = [m["epoch_seconds"] for m in result.metrics]
        rows.append({
            "run": name, "block_size": block, "test_accuracy": result.test_accuracy,
            "best_test_accuracy": max(m["test_accuracy"] for m in result.metrics),
            "paper_conv_compression": result.report.compression["paper_convs"],
            "all_conv_compression": result.report.compression["all_convs"],
            "all_weight_compression": result.report.compression["all_weights"],
            "mean_epoch_seconds": statistics.mean(seconds),
            "epoch_seconds": seconds, "wall_seconds": time.perf_counter() - started,
            "library": result.report.library,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def step_timing(recipe_path: Path, blocks: list[int], rounds: int, steps: int) -> list[dict]:
    """Median ms per training step for dense and each ClickTrain phase, interleaved by round."""
    recipe = load_recipe(recipe_path)
    d = recipe.data
    data = load_data(d.name, d.root, 4096, recipe.seed)
    batches = list(BatchIterator(data.train, d.batch_size, data.mean, data.std, train=True,
                                 crop_padding=d.crop_padding, flip=d.flip).epoch(0, limit=steps))
    variants = {}
    for block in [None] + blocks:
        torch.manual_seed(recipe.seed)
        model = create_model(recipe.model.name, len(data.classes), data.input_shape[0])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if block is None:
            variants["dense"] = (model, optimizer, None, "dense")
            continue
        config = recipe.pruning.model_copy(update={"block_size": block})
        pruner = ClickTrainPruner(model, config)
        pruner.select(model, batches[:2], nn.functional.cross_entropy)
        variants[f"B={block} regularize"] = (model, optimizer, pruner, "regularize")
        hard_model = create_model(recipe.model.name, len(data.classes), data.input_shape[0])
        hard_model.load_state_dict(model.state_dict())
        hard_opt = torch.optim.SGD(hard_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        hard = ClickTrainPruner(hard_model, config)
        hard.load_state_dict(pruner.state_dict())
        hard.harden(hard_opt)
        variants[f"B={block} hard"] = (hard_model, hard_opt, hard, "hard")
    medians = median_step_ms(variants, batches, rounds)
    return [{"variant": name, "ms_per_step": ms, "ratio_to_dense": ms / medians["dense"]}
            for name, ms in medians.items()]


def markdown(result: dict) -> str:
    dense = result["runs"][0]
    lines = [f"Measured {result['date']} on {result['machine']} ({result['threads']} threads, "
             f"torch {result['torch']}), recipe `{result['recipe']}`.", "",
             "| run | test acc (final) | Δ vs dense | best acc | conv compression (paper) | "
             "all convs | all weights | s/epoch | epoch time vs dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(
            f"| {r['run']} | {r['test_accuracy']:.2f}% | {r['test_accuracy'] - dense['test_accuracy']:+.2f} | "
            f"{r['best_test_accuracy']:.2f}% | {r['paper_conv_compression']:.2f}x | "
            f"{r['all_conv_compression']:.2f}x | {r['all_weight_compression']:.2f}x | "
            f"{r['mean_epoch_seconds']:.1f} | {r['mean_epoch_seconds'] / dense['mean_epoch_seconds']:.3f}x |")
    lines += ["", "Training step, median of interleaved rounds on the same batches:", "",
              "| variant | ms/step | vs dense |", "|---|---|---|"]
    for t in result["step_timing"]:
        lines.append(f"| {t['variant']} | {t['ms_per_step']:.1f} | {t['ratio_to_dense']:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/fashion_resnet20.toml"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/training_bar"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_bar"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    result = {
        "date": datetime.date.today().isoformat(), "machine": _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "recipe": str(args.recipe),
        "runs": full_runs(args.recipe, args.blocks, args.runs_dir),
        "step_timing": step_timing(args.recipe, args.blocks, args.rounds, args.steps),
    }
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
