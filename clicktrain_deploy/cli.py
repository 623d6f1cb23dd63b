"""Command line: ``clicktrain-deploy train --config R`` and ``clicktrain-deploy report RUN``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .config import load_recipe
from .errors import ClickTrainError
from .pruning.report import SparsityReport, sparsity_report
from .train import load_checkpoint, restore_model, train as train_recipe

app = typer.Typer(help="ClickTrain pattern pruning, from recipe to deployable model.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()


def report_table(report: SparsityReport) -> Table:
    """Per-layer density, kernels kept and pattern use, for a terminal."""
    table = Table(title="sparsity per pruned layer")
    for column in ("layer", "shape", "B", "density", "kernels kept", "kernels per pattern"):
        table.add_column(column, overflow="fold")
    for layer in report.layers:
        used = " ".join(f"{c}" for c in layer.pattern_histogram.values())
        table.add_row(layer.name, "x".join(map(str, layer.shape)), str(layer.block_size),
                      f"{100 * layer.density:.1f}%",
                      f"{layer.kernels_kept}/{layer.kernels} ({100 * layer.kernels_kept / layer.kernels:.1f}%)",
                      used)
    return table


def _compression_line(report: SparsityReport) -> str:
    c = report.compression
    return (f"compression: {c['paper_convs']:.2f}x conv weights as the paper counts "
            f"(no 1x1 shortcuts), {c['pruned_layers']:.2f}x pruned layers, "
            f"{c['all_convs']:.2f}x all convs, {c['all_weights']:.2f}x all weights")


def _print_report(report: SparsityReport) -> None:
    if report.layers:
        console.print(report_table(report))
        library = "  ".join(f"p{i}={p}" for i, p in enumerate(report.library))
        console.print(f"pattern library (rows top to bottom, X kept): {library}")
    console.print(_compression_line(report))


def _fail(error: ClickTrainError) -> None:
    console.print(f"[bold red]error:[/] {error}", highlight=False)
    raise typer.Exit(2)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="recipe file (.toml or .yaml)")],
    resume: Annotated[bool, typer.Option(help="continue after the newest checkpoint")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train a model with ClickTrain pattern pruning (or dense) as the recipe says."""
    try:
        recipe = load_recipe(config)
        result = train_recipe(recipe, resume=resume, progress=not quiet)
    except ClickTrainError as error:
        _fail(error)
    _print_report(result.report)
    console.print(f"test accuracy: {result.test_accuracy:.2f}%")
    console.print(f"outputs: {result.output_dir} (checkpoint {result.checkpoint.name}, "
                  "metrics.jsonl, sparsity.json)")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="run folder or checkpoint file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Sparsity report of a trained run: per layer and whole model."""
    try:
        model, pruner = restore_model(load_checkpoint(run))
        result = (sparsity_report(model, pruner.masks, pruner.library) if pruner
                  else sparsity_report(model, {}, None))
    except ClickTrainError as error:
        _fail(error)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    _print_report(result)
