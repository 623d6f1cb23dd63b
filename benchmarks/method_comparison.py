"""Issue #6's comparison: dense, ClickTrain, PruneTrain and ADMM pruning after training, one row each.

Same model, data, seed and base recipe for every method. Dense, ClickTrain and PruneTrain train
for ``--epochs``; pruning after training (ADMM) first trains dense for the same ``--epochs`` (its
own LR cosine, so the dense phase is a finished dense run), then ``--admm-epochs`` of ADMM and
``--retrain-epochs`` of masked retraining, each with the LR restarted at ``--restart-lr``. Per
method: final test accuracy, conv compression (as the paper counts), training FLOPs (3x forward
conv/linear FLOPs per image over the shapes and exact zeros of each epoch, summed), inference
FLOPs of the final model, and end-to-end wall time (data loading, every phase, evaluation). The
runs go one after the other in this process, so on a shared machine their wall times see
different loads; the script therefore also times single training steps of every method and
phase interleaved on the same batches, and estimates each method's training time at equal load
as the sum over its epochs of steps per epoch x the median step time of that epoch's phase
(epochs x steps x median step: an estimate, not a measurement; the markdown prints it beside the
measured training and end-to-end wall times and says so).
Writes ``<out>.json`` and ``<out>.md``; ``--reuse <out>.json`` keeps its runs and only re-times.

    .venv/bin/python benchmarks/method_comparison.py                      # Fashion-MNIST
    .venv/bin/python benchmarks/method_comparison.py --cifar10 /data/cifar-10-batches-py
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from torch import nn

from clicktrain_deploy import load_checkpoint, load_recipe, parse_recipe, train
from clicktrain_deploy.data import BatchIterator, load_data
from clicktrain_deploy.models import create_model
from clicktrain_deploy.pruning import AdmmPruner, ClickTrainPruner, create_method
from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text
from clicktrain_deploy.train import restore_model
from clicktrain_deploy.train.flops import forward_flops

from step_timing import median_step_ms  # noqa: E402  (same folder)
from training_bar import _cpu_name  # noqa: E402  (same folder)

METHODS = ("dense", "clicktrain", "prunetrain", "admm")


def method_recipe(base: dict, method: str, args: argparse.Namespace, out_root: Path) -> dict:
    """The base recipe with the comparison's budget and ``method``'s phases."""
    raw = json.loads(json.dumps(base))
    raw["output_dir"] = str(out_root / method)
    raw["data"]["train_subset"] = args.train_subset
    raw["schedule"]["threads"] = args.threads
    if args.cifar10:
        raw["data"].update(name="cifar10", root=str(args.cifar10))
    epochs = args.epochs
    pruning = raw["pruning"]
    pruning["method"] = method
    if method == "clicktrain" and pruning["hard_prune_epoch"] >= epochs:
        pruning.update(select_epoch=1, hard_prune_epoch=max(1, epochs // 2))
    elif method == "prunetrain":
        pruning["prunetrain"] = {"penalty_ratio": args.penalty_ratio, "interval": args.interval}
    elif method == "admm":
        pruning.update(select_epoch=epochs, hard_prune_epoch=epochs + args.admm_epochs,
                       admm={"rho": args.rho})
        raw["schedule"].update(restarts=[epochs, epochs + args.admm_epochs],
                               restart_lr=args.restart_lr)
        epochs += args.admm_epochs + args.retrain_epochs
    raw["schedule"]["epochs"] = epochs
    return raw


def run_method(raw: dict) -> dict:
    recipe = parse_recipe(raw, f"<{raw['pruning']['method']}>")
    started = time.perf_counter()
    result = train(recipe, resume=True, progress=False)
    wall = time.perf_counter() - started
    saved = load_checkpoint(result.output_dir)
    model, _ = restore_model(saved)
    metrics = result.metrics
    return {
        "method": recipe.pruning.method, "epochs": recipe.schedule.epochs,
        "phases": [m["phase"] for m in metrics],
        "test_accuracy": result.test_accuracy,
        "best_test_accuracy": max(m["test_accuracy"] for m in metrics),
        "accuracy_per_epoch": [m["test_accuracy"] for m in metrics],
        "paper_conv_compression": result.report.compression["paper_convs"],
        "all_weight_compression": result.report.compression["all_weights"],
        "train_flops": sum(m["train_flops"] for m in metrics),
        "inference_flops": forward_flops(model, saved["data"]["input_shape"]),
        "training_seconds": sum(m["epoch_seconds"] for m in metrics),
        "wall_seconds": wall,
        "conv_shapes": {n: list(m.weight.shape) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Conv2d)},
    }


def step_timing(base: dict, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per training step of each (method, phase), interleaved by round, same batches."""
    torch.set_num_threads(args.threads)
    raw = method_recipe(base, "clicktrain", args, args.runs_dir)
    recipe = parse_recipe(raw)
    d = recipe.data
    data = load_data(d.name, d.root, 2048, recipe.seed, **d.loader_options())
    batches = list(BatchIterator(data.train, d.batch_size, data.mean, data.std, train=True,
                                 crop_padding=d.crop_padding, flip=d.flip).epoch(0, limit=args.steps))
    variants = {}
    for method, phase in [("dense", "dense"), ("clicktrain", "regularize"), ("clicktrain", "hard"),
                          ("prunetrain", "regularize"), ("admm", "admm")]:
        torch.manual_seed(recipe.seed)
        model = create_model(recipe.model.name, len(data.classes), data.input_shape[0])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        pruner = create_method(model, recipe.pruning.model_copy(update={"method": method}))
        if isinstance(pruner, ClickTrainPruner):
            pruner.select(model, batches[:2], nn.functional.cross_entropy)
            if phase == "hard":
                pruner.harden(optimizer)
        if isinstance(pruner, AdmmPruner):
            pruner.start()
            pruner.active = True  # as begin_epoch sets it in an ADMM epoch
        variants[f"{method} {phase}"] = (model, optimizer, pruner, phase)
    return median_step_ms(variants, batches, args.rounds)


def equal_load_seconds(run: dict, step_ms: dict[str, float], steps_per_epoch: int) -> float:
    """Estimated training seconds of a run at the timed load: sum over its epochs of
    steps_per_epoch x the median step time of the epoch's phase (not a measured time)."""
    method = run["method"]
    total = 0.0
    for phase in run["phases"]:
        key = f"{method} {phase}" if f"{method} {phase}" in step_ms else "dense dense"
        total += step_ms[key] * steps_per_epoch / 1000
    return total


def verdict(rows: dict[str, dict]) -> list[str]:
    """The issue's bar, stated from the measured rows."""
    ct, lines = rows.get("clicktrain"), []
    if ct and "admm" in rows:
        admm = rows["admm"]
        speed = admm["wall_seconds"] / ct["wall_seconds"]
        gap = ct["test_accuracy"] - admm["test_accuracy"]
        comparable = abs(gap) <= 0.5
        if "equal_load_seconds" in admm:
            lines.append(f"- Estimated at equal load (epochs x steps x median interleaved step, not measured): "
                         f"ClickTrain's training {admm['equal_load_seconds'] / ct['equal_load_seconds']:.2f}x "
                         f"shorter than ADMM's"
                         + (f"; measured training time {admm['training_seconds'] / ct['training_seconds']:.2f}x"
                            if "training_seconds" in admm and "training_seconds" in ct else "")
                         + f", end to end {admm['wall_seconds'] / ct['wall_seconds']:.2f}x.")
        lines.append(
            f"- ClickTrain vs ADMM after training: end-to-end {speed:.2f}x shorter (bar >= 2x: "
            f"{'met' if speed >= 2 else 'not met'}), training FLOPs {admm['train_flops'] / ct['train_flops']:.2f}x "
            f"fewer; accuracy {ct['test_accuracy']:.2f}% vs {admm['test_accuracy']:.2f}% "
            f"({gap:+.2f} points: {'within' if comparable else 'not within'} 0.5), compression "
            f"{ct['paper_conv_compression']:.2f}x vs {admm['paper_conv_compression']:.2f}x. "
            f"Bar {'met' if speed >= 2 and (comparable or gap > 0) else 'not met'}.")
    if ct and "prunetrain" in rows and "dense" in rows:
        pt, dense = rows["prunetrain"], rows["dense"]
        drop_ct = dense["test_accuracy"] - ct["test_accuracy"]
        drop_pt = dense["test_accuracy"] - pt["test_accuracy"]
        higher = ct["paper_conv_compression"] > pt["paper_conv_compression"]
        lines.append(
            f"- ClickTrain vs PruneTrain: compression {ct['paper_conv_compression']:.2f}x vs "
            f"{pt['paper_conv_compression']:.2f}x ({'higher' if higher else 'not higher'}); accuracy "
            f"drop vs dense {drop_ct:.2f} vs {drop_pt:.2f} points "
            f"({'no larger' if drop_ct <= drop_pt else 'larger'}). Bar "
            f"{'met' if higher and drop_ct <= drop_pt else 'not met'}.")
    return lines


def markdown(result: dict) -> str:
    rows = {r["method"]: r for r in result["runs"]}
    dense = rows.get("dense")
    lines = [f"Measured {result['date']} on {result['machine']} ({result['threads']} threads, torch "
             f"{result['torch']}), {result['conditions']}.", "",
             f"Base recipe `{result['recipe']}`, data {result['data']}, {result['train_subset']} "
             f"training images (class-balanced), full test set, seed {result['seed']}. Budget: "
             f"{result['epochs']} epochs each; ADMM: {result['epochs']} dense + "
             f"{result['admm_epochs']} ADMM + {result['retrain_epochs']} retraining.", "",
             "| method | epochs | test acc | Δ vs dense | conv compression (paper) | all weights | "
             "training FLOPs | vs ClickTrain | inference MFLOPs | end-to-end s | vs ClickTrain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ct = rows.get("clicktrain")
    for r in result["runs"]:
        delta = f"{r['test_accuracy'] - dense['test_accuracy']:+.2f}" if dense else "-"
        flops = f"{r['train_flops'] / ct['train_flops']:.2f}x" if ct else "-"
        wall = f"{r['wall_seconds'] / ct['wall_seconds']:.2f}x" if ct else "-"
        lines.append(
            f"| {r['method']} | {r['epochs']} | {r['test_accuracy']:.2f}% | {delta} | "
            f"{r['paper_conv_compression']:.2f}x | {r['all_weight_compression']:.2f}x | "
            f"{r['train_flops'] / 1e12:.1f} T | {flops} | {r['inference_flops'] / 1e6:.1f} | "
            f"{r['wall_seconds']:.0f} | {wall} |")
    if "step_ms" in result:
        steps = result.get("steps_per_epoch") or result["train_subset"] // result["batch_size"]
        lines += ["", f"Training step (batch {result['batch_size']}, median of {result['rounds']} "
                  "interleaved rounds on the same batches) and each run's training time at that load:",
                  "", "| method, phase | ms/step |", "|---|---|"]
        lines += [f"| {name} | {ms:.1f} |" for name, ms in result["step_ms"].items()]
        lines += ["", f"Training time at equal load is an **estimate**, not a measurement: the sum over "
                  f"a run's epochs of {steps} steps per epoch x the median step time of that epoch's "
                  "phase above (epochs x steps x median step). Beside it, what was measured: the "
                  "run's training time (its epochs' step loops, summed) and its end-to-end wall time "
                  "(data loading, every phase, evaluation), both under the load the run had.", "",
                  "| method | epochs | measured training s | measured end-to-end s | estimated training s "
                  "at equal load | estimate vs ClickTrain |", "|---|---|---|---|---|---|"]
        for r in result["runs"]:
            ratio = f"{r['equal_load_seconds'] / ct['equal_load_seconds']:.2f}x" if ct else "-"
            measured = f"{r['training_seconds']:.0f}" if "training_seconds" in r else "-"
            lines.append(f"| {r['method']} | {r['epochs']} | {measured} | {r['wall_seconds']:.0f} | "
                         f"{r['equal_load_seconds']:.0f} (estimate) | {ratio} |")
    return "\n".join([*lines, "", *verdict(rows)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/fashion_resnet20.toml"))
    parser.add_argument("--cifar10", type=Path, help="cifar-10-batches-py folder (default: Fashion-MNIST)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--admm-epochs", type=int, default=3)
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=8_000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids thread thrashing on a shared machine)")
    parser.add_argument("--restart-lr", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--penalty-ratio", type=float, default=0.2)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--conditions", default="machine shared with other jobs (contended)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reuse", type=Path, help="runs from this earlier JSON; only re-time steps")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/method_comparison"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/method_comparison"))
    args = parser.parse_args()
    base = load_recipe(args.recipe).model_dump()
    runs = json.loads(args.reuse.read_text())["runs"] if args.reuse else []
    for method in [] if args.reuse else args.methods:
        runs.append(run_method(method_recipe(base, method, args, args.runs_dir)))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "conv_shapes"}), flush=True)
    step_ms = step_timing(base, args)
    steps_per_epoch = args.train_subset // base["data"]["batch_size"]
    for run in runs:
        run["equal_load_seconds"] = equal_load_seconds(run, step_ms, steps_per_epoch)
    result = {
        "date": datetime.date.today().isoformat(), "machine": _cpu_name(),
        "threads": args.threads, "torch": torch.__version__, "recipe": str(args.recipe),
        "data": "cifar10" if args.cifar10 else base["data"]["name"], "seed": base["seed"],
        "train_subset": args.train_subset, "epochs": args.epochs, "admm_epochs": args.admm_epochs,
        "retrain_epochs": args.retrain_epochs, "restart_lr": args.restart_lr, "rho": args.rho,
        "penalty_ratio": args.penalty_ratio, "interval": args.interval,
        "conditions": args.conditions, "runs": runs, "step_ms": step_ms,
        "batch_size": base["data"]["batch_size"], "rounds": args.rounds,
        "steps_per_epoch": steps_per_epoch,
        "equal_load_method": "estimate: sum over epochs of steps_per_epoch x median step ms of the epoch's phase",
    }
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
