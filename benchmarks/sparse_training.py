"""Issue #16's benchmark: the ClickTrain hard-phase step on our pattern kernels against dense.

One process, one recipe's model and real batches. Per pruned conv: forward + backward of torch's
conv and of ``clicktrain::pattern_conv2d`` at the training batch (the decision ``install`` makes).
Per whole step (forward, backward, SGD update, mask enforcement): dense on torch (contiguous and
channels_last), ClickTrain hard on torch (both formats) and on our kernels; every variant steps
over the same batches once per round, in turn, so that load from elsewhere hits them alike; the
statistic is the median over rounds of each round's mean ms per step. Writes ``<out>.json`` and
``<out>.md``; the whole 10-epoch runs are rows of ``benchmarks/accuracy.py --study sparse_training``.

    .venv/bin/python benchmarks/sparse_training.py --threads 1
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from clicktrain_deploy import load_recipe
from clicktrain_deploy.bench import cpu_model
from clicktrain_deploy.data import BatchIterator, load_data
from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text
from clicktrain_deploy.models import create_model
from clicktrain_deploy.pruning.clicktrain import ClickTrainPruner
from clicktrain_deploy.train.pattern_kernels import install
from clicktrain_deploy.train.trainer import optimizer_step


def _variants(recipe, batches, data) -> tuple[dict, list[dict]]:
    """name -> (model, optimizer, pruner, phase, memory format); and install's per-layer rows."""
    def fresh(fmt):
        torch.manual_seed(recipe.seed)
        model = create_model(recipe.model.name, len(data.classes), data.input_shape[0]).to(memory_format=fmt)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    cl, contiguous = torch.channels_last, torch.contiguous_format
    variants = {}
    for fmt, label in ((contiguous, "contiguous"), (cl, "channels_last")):
        model, optimizer = fresh(fmt)
        variants[f"dense, torch, {label}"] = (model, optimizer, None, "dense", fmt)
    selector, _ = fresh(contiguous)
    pruner = ClickTrainPruner(selector, recipe.pruning)
    pruner.select(selector, batches[:2], nn.functional.cross_entropy)
    layers = []
    for fmt, label, ours in ((contiguous, "contiguous", False), (cl, "channels_last", False),
                             (cl, "channels_last", True)):
        model, optimizer = fresh(fmt)
        model.load_state_dict(selector.state_dict())
        hard = ClickTrainPruner(model, recipe.pruning)
        hard.load_state_dict(pruner.state_dict())
        hard.harden(optimizer)
        name = f"ClickTrain hard, torch, {label}"
        if ours:
            decisions = install(model, hard.pattern_layers(), hard.library.numpy(),
                                batches[0][0], len(batches[0][0]), rounds=7, memory_format=fmt)
            layers = [d.to_dict() for d in decisions]
            name = "ClickTrain hard, our kernels where faster, channels_last"
        variants[name] = (model, optimizer, hard, "hard", fmt)
    return variants, layers


def step_times(variants: dict, batches: list, rounds: int) -> dict[str, dict]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 1):  # round 0 warms up (first-call allocations, kernel loads)
        for name, (model, optimizer, pruner, phase, fmt) in variants.items():
            model.train()
            started = time.perf_counter()
            for inputs, labels in batches:
                logits = model(inputs.contiguous(memory_format=fmt))
                optimizer_step(nn.functional.cross_entropy(logits, labels), optimizer, pruner, phase)
            if round_:
                times[name].append(1000 * (time.perf_counter() - started) / len(batches))
    return {name: {"ms_per_step": statistics.median(t), "rounds_ms": t} for name, t in times.items()}


def profiles(variants: dict, batches: list, rows: int = 12) -> str:
    """Per variant, torch.profiler's table of one round's ops by self CPU time (our kernels run
    inside ``clicktrain::pattern_conv2d`` and its backward): where each step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for name, (model, optimizer, pruner, phase, fmt) in variants.items():
        model.train()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for inputs, labels in batches:
                logits = model(inputs.contiguous(memory_format=fmt))
                optimizer_step(nn.functional.cross_entropy(logits, labels), optimizer, pruner, phase)
        tables.append(f"## {name} ({len(batches)} steps)\n\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n\n".join(tables) + "\n"


def markdown(result: dict) -> str:
    steps = result["steps"]
    dense = {k: v["ms_per_step"] for k, v in steps.items() if k.startswith("dense")}
    best_dense = min(dense, key=dense.get)
    lines = [f"Measured {result['date']} on {result['machine']}, {result['threads']} thread(s), torch "
             f"{result['torch']}, recipe `{result['recipe']}` ({result['model']}), batch {result['batch']}, "
             f"{result['steps_per_round']} steps x {result['rounds']} interleaved rounds (median of round means).",
             "", "| step | ms/step | dense contiguous / this | fastest dense / this |", "|---|---|---|---|"]
    for name, row in steps.items():
        ms = row["ms_per_step"]
        lines.append(f"| {name} | {ms:.1f} | {dense['dense, torch, contiguous'] / ms:.2f}x | "
                     f"{dense[best_dense] / ms:.2f}x |")
    lines += ["", f"Fastest dense step: {best_dense}.", "",
              "Per pruned conv, forward + backward at the batch (fastest of interleaved rounds, as `install` "
              "decides):", "", "| layer | kept taps | torch ms | ours ms | torch / ours | runs on |",
              "|---|---|---|---|---|---|"]
    for d in result["layers"]:
        if d["torch_ms"] is None:
            lines.append(f"| {d['layer']} | - | - | - | - | torch ({d['reason']}) |")
            continue
        lines.append(f"| {d['layer']} | {d['kept_taps']} | {d['torch_ms']:.2f} | {d['ours_ms']:.2f} | "
                     f"{d['torch_ms'] / d['ours_ms']:.2f}x | {'ours' if d['used'] else 'torch'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/fashion_resnet20.toml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/sparse_training_t<threads>")
    parser.add_argument("--profile", action="store_true", help="also write <out>_profile.txt: each variant's ops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    recipe = load_recipe(args.recipe)
    d = recipe.data
    data = load_data(d.name, d.root, 4096, recipe.seed)
    batches = list(BatchIterator(data.train, d.batch_size, data.mean, data.std, train=True,
                                 crop_padding=d.crop_padding, flip=d.flip).epoch(0, limit=args.steps))
    variants, layers = _variants(recipe, batches, data)
    result = {
        "date": datetime.date.today().isoformat(), "machine": cpu_model(), "threads": args.threads,
        "torch": torch.__version__, "recipe": str(args.recipe), "model": recipe.model.name,
        "batch": d.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
        "load_average_at_start": os.getloadavg()[0],
        "steps": step_times(variants, batches, args.rounds), "layers": layers,
    }
    out = args.out or Path(f"benchmarks/results/sparse_training_t{args.threads}")
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    if args.profile:
        atomic_write_text(out.with_name(out.name + "_profile.txt"), profiles(variants, batches))
    print(markdown(result))
    print(json.dumps({k: v["ms_per_step"] for k, v in result["steps"].items()}))


if __name__ == "__main__":
    main()
