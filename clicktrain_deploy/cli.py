"""Command line: ``clicktrain-deploy run --config R`` (the whole pipeline) and one command per stage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import distributed
from .config import load_recipe
from .errors import ClickTrainError
from .pruning.report import SparsityReport
from .train import load_checkpoint, restore_model, train as train_recipe

app = typer.Typer(help="ClickTrain pattern pruning, from recipe to deployable model.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
NOT_VALIDATED = 3  # exit status of `run` when a requested target could not be validated


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
    """Train a model with ClickTrain pattern pruning (or dense) as the recipe says.

    Under ``torchrun --nproc_per_node=N -m clicktrain_deploy train ...`` the N processes train
    together (DistributedDataParallel); rank 0 writes the files and prints the summary.
    """
    try:
        recipe = load_recipe(config)
        result = train_recipe(recipe, resume=resume, progress=not quiet)
    except ClickTrainError as error:
        _fail(error)
    if not distributed.is_main():
        return
    _print_report(result.report)
    console.print(f"test accuracy: {result.test_accuracy:.2f}%")
    console.print(f"outputs: {result.output_dir} (checkpoint {result.checkpoint.name}, "
                  "metrics.jsonl, sparsity.json)")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="recipe file (.toml or .yaml)")],
    until: Annotated[str | None, typer.Option(help="stop after this stage or kind (train, export, "
                                              "validate, compile, benchmark)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress display")] = False,
    require_all: Annotated[bool, typer.Option(
        "--require-all/--allow-skipped",
        help="exit 3 when a requested target could not be validated here (e.g. cuda without a "
             "GPU); --allow-skipped exits 0 then, still listing what was skipped")] = True,
) -> None:
    """Train, export, validate, compile per target, validate each, benchmark and report.

    Stages whose inputs did not change since the last run are kept (cached); an interrupted
    stage resumes. Stops at the first failing stage, leaving earlier outputs as they were.
    Exit status: 0 all done and every requested target validated; 1 a stage failed; 2 bad
    input; 3 (unless --allow-skipped) a target's validation was skipped (no device to run on).
    """
    from .pipeline import PipelineError, run_pipeline, summary_table

    try:
        recipe = load_recipe(config)
        result = run_pipeline(recipe, until=until, progress=not quiet, console=Console(stderr=True))
    except PipelineError as error:
        console.print(summary_table(error.result))
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        console.print(f"outputs of the stages before {error.stage} are kept in {error.result.folder.root}")
        raise typer.Exit(1)
    except ClickTrainError as error:
        _fail(error)
    console.print(summary_table(result))
    if result.folder.report.exists() and until is None:
        console.print(f"report: {result.folder.report}")
    if result.unvalidated:
        names = ", ".join(f"{o.name.partition(':')[2]} ({o.summary})" for o in result.unvalidated)
        if require_all:
            console.print(f"[bold red]error:[/] not validated: {names}; pass --allow-skipped to "
                          "accept a run that validated fewer targets than requested", highlight=False)
            raise typer.Exit(NOT_VALIDATED)
        console.print(f"[bold yellow]warning:[/] not validated: {names} (--allow-skipped)", highlight=False)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="run folder or checkpoint file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    html: Annotated[bool, typer.Option("--html", help="write the HTML report of a run folder")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HTML file (default RUN/report.html)")] = None,
) -> None:
    """Sparsity report of a trained run: per layer and whole model; ``--html``: the full report."""
    if html:
        from .report import write_report

        try:
            console.print(f"wrote {write_report(run, output=output)}")
        except ClickTrainError as error:
            _fail(error)
        return
    try:
        model, method = restore_model(load_checkpoint(run))
        result = method.report(model)
    except ClickTrainError as error:
        _fail(error)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    _print_report(result)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="run folder or checkpoint file")],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write")],
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    check_images: Annotated[int, typer.Option(help="real test images for the onnxruntime gate")] = 256,
    metadata: Annotated[bool, typer.Option(help="embed pattern metadata")] = True,
) -> None:
    """Export a trained run to ONNX (BN folded, pattern metadata), gated in onnxruntime."""
    from .export.onnx_export import export_onnx

    try:
        result = export_onnx(run, output, opset=opset, check_images=check_images,
                             with_metadata=metadata)
    except ClickTrainError as error:
        _fail(error)
    a = result.agreement
    layers = len(result.metadata.layers) if result.metadata else 0
    console.print(f"wrote {result.path}: {layers} pattern-pruned convs described; onnxruntime vs "
                  f"PyTorch on {a.images} test images: max |diff| {a.max_abs_diff:.2e}, "
                  f"top-1 agreement {a.top1_agreement:.2f}%")


@app.command()
def validate(
    model: Annotated[Path, typer.Argument(help="ONNX file")],
    checkpoint: Annotated[Path, typer.Option(help="run folder or checkpoint it was exported from")],
    images: Annotated[int, typer.Option(help="real test images to compare on")] = 10000,
    atol: Annotated[float, typer.Option(help="absolute logit tolerance")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="tolerance relative to the largest |logit|")] = 1e-4,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """onnxruntime against PyTorch on real test images; exit 1 beyond tolerance."""
    from .contract import load_onnx
    from .export.check import compare_with_torch
    from .export.onnx_export import reference_batches
    from .passes.onnx_passes import verify

    try:
        proto = load_onnx(model)
        verify(proto)
        saved = load_checkpoint(checkpoint)
        torch_model, _ = restore_model(saved)
        agreement = compare_with_torch(proto.SerializeToString(), torch_model,
                                       reference_batches(saved, images).epoch(0))
    except ClickTrainError as error:
        _fail(error)
    passed = agreement.within(atol, rtol)
    if as_json:
        print(json.dumps({**agreement.to_dict(), "atol": atol, "rtol": rtol, "passed": passed}))
    else:
        a = agreement
        console.print(f"{a.images} test images: max |diff| {a.max_abs_diff:.2e} (largest |logit| "
                      f"{a.max_abs_logit:.2f}), top-1 agreement {a.top1_agreement:.2f}%, accuracy "
                      f"PyTorch {a.torch_accuracy:.2f}% / onnxruntime {a.onnxruntime_accuracy:.2f}%")
        console.print("[green]PASS[/]" if passed else
                      f"[bold red]FAIL[/]: beyond {atol} + {rtol} * {a.max_abs_logit:.2f}")
    if not passed:
        raise typer.Exit(1)


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="ONNX file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Per-layer density, kernels kept, pattern use and compression of an ONNX model."""
    from .contract import load_onnx
    from .export.onnx_export import inspect_onnx

    try:
        result, metadata = inspect_onnx(load_onnx(model))
    except ClickTrainError as error:
        _fail(error)
    if as_json:
        print(json.dumps({**result.to_dict(), "has_pattern_metadata": metadata is not None}, indent=2))
        return
    if metadata is None:
        console.print(f"{model}: no pattern metadata; treated as dense")
    _print_report(result)


@app.command("compile")
def compile_(
    model: Annotated[Path, typer.Argument(help="ONNX file from `export`")],
    target: Annotated[str, typer.Option("--target", "-t", help="x86, arm64, cortex-a72, cortex-a76, cuda")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".so to write (manifest beside it)")],
    dense: Annotated[bool, typer.Option(help="ignore the pattern metadata: our dense build")] = False,
    arch: Annotated[str | None, typer.Option(help="GPU of a cuda target: sm_80, sm_86, sm_89, sm_90 (default)")] = None,
    batch: Annotated[int | None, typer.Option(help="images per call, fixed at compile time, for a symbolic "
                                                   "first dim (default 1)")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", help="fixed shape of a symbolic input: N,C,H,W (one input) or NAME=N,C,H,W; repeatable")] = None,
    check: Annotated[bool, typer.Option(help="run the library against onnxruntime on random inputs; "
                                             "--no-check skips it (the manifest says so)")] = True,
) -> None:
    """Compile an ONNX model with TVM into a deployable library and a JSON manifest: every conv
    with a constant weight on our generated kernels, everything else scheduled by TVM; the
    library is checked against onnxruntime before it is written."""
    from .compile.build import compile_model
    from .compile.targets import CUDA_ARCHS, TARGETS

    try:
        if arch is not None:
            if target != "cuda":
                raise ClickTrainError(f"--arch {arch}: only for --target cuda")
            if arch not in CUDA_ARCHS:
                raise ClickTrainError(f"--arch {arch!r}: unknown CUDA arch; presets: {', '.join(CUDA_ARCHS)}")
            target = f"cuda-{arch.replace('_', '')}"
        if target not in TARGETS:
            raise ClickTrainError(f"--target {target!r}: unknown; known: {', '.join(TARGETS.names())}")
        result = compile_model(model, target, output, sparse=not dense, batch=batch,
                               input_shape=parse_input_shapes(input_shape), check=check)
    except ClickTrainError as error:
        _fail(error)
    kernels = [layer["kernel"] for layer in result.manifest["layers"]]
    counts = ", ".join(f"{kernels.count(k)} {k}" for k in sorted(set(kernels)))
    gate = result.manifest["check"]
    said = f"check {gate['status']}" + (f" (max |diff| {gate['max_abs_diff']:.2g}, {gate['runtime']})"
                                        if gate.get("max_abs_diff") is not None else f" ({gate['reason']})")
    console.print(f"wrote {result.library} and {result.library.with_suffix('.json').name} for "
                  f"{result.manifest['target']} in {result.manifest['compile_seconds']:.1f}s; convs: {counts}; {said}")


def parse_input_shapes(values: list[str] | None) -> dict[str, list[int]] | list[int] | None:
    """``N,C,H,W`` (the only input) or ``NAME=N,C,H,W`` entries -> compile_model's input_shape."""
    if not values:
        return None
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            raise ClickTrainError(f"--input-shape {value!r}: expected N,C,H,W or NAME=N,C,H,W") from None
        if not name:
            if len(values) > 1:
                raise ClickTrainError("--input-shape: name each input (NAME=N,C,H,W) when giving several")
            return shape
        shapes[name] = shape
    return shapes
