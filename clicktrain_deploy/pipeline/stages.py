"""The stages of ``clicktrain-deploy run``, one registered factory per kind.

A ``Stage`` states what decides its result (``settings``: recipe fields; ``reads``: files of
earlier stages), what it writes, and ``run``. ``plan`` lays them out for a recipe::

    train -> export -> validate:onnxruntime -> (compile:T -> validate:T) per target
          -> benchmark:T per target -> report
"""
from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..config import Recipe
from ..fileio import atomic_write_json
from ..registry import Registry
from ..runfolder import RunFolder

STAGES: Registry = Registry("stage")


class Skipped(str):
    """The summary a stage returns when it finished without doing its job (a validation or
    benchmark with no device to run on): recorded as status ``skipped``, never as ``done``."""


# The training kernels: only the train stage runs them, and only with schedule.sparse_kernels, so
# no other stage's cache key holds their code.
TRAINING_KERNELS = frozenset({"clicktrain_deploy.train.pattern_kernels"})


@dataclass
class StageContext:
    """How a stage runs. ``resume``: its inputs are those of an earlier, unfinished attempt (or
    there is no record of one), so it may continue from that attempt's files (training does)."""

    console: Console
    progress: bool
    resume: bool


@dataclass
class Stage:
    """One step of the pipeline; ``run`` does the work and returns a one-line summary."""

    name: str                         # "train", "compile:x86"
    kind: str                         # its factory in STAGES
    describe: str                     # what it does, for the progress display
    settings: dict                    # recipe fields that decide its result (JSON-ready)
    reads: list[Path]                 # files of earlier stages it reads
    writes: list[Path]                # files it produces
    run: Callable[[StageContext], str]  # returns its summary (a ``Skipped`` one if it could not do its job)
    own_progress: bool = False        # draws its own progress bar (otherwise the runner's spinner)
    unused_code: frozenset[str] = TRAINING_KERNELS  # modules its factory's imports reach that it never runs


def plan(recipe: Recipe) -> list[Stage]:
    """Every stage of ``recipe``'s pipeline, in the order they run."""
    folder = RunFolder(Path(recipe.output_dir))
    targets = recipe.deploy.targets

    def make(kind: str, *args: str) -> Stage:
        return STAGES.get(kind)(recipe, folder, *args)

    return [make("train"), make("export"), make("validate", "onnxruntime"),
            *[stage for t in targets for stage in (make("compile", t), make("validate", t))],
            *[make("benchmark", t) for t in targets], make("report")]


def _image_progress(ctx: StageContext, description: str, total: int) -> tuple[Progress, Callable[[int], None]]:
    bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=ctx.console, disable=not ctx.progress, transient=True)
    task = bar.add_task(description, total=total)
    return bar, lambda done: bar.update(task, completed=done)


@STAGES.register("train")
def train_stage(recipe: Recipe, folder: RunFolder) -> Stage:
    from ..train import train
    from ..train.checkpoint import list_checkpoints

    settings = recipe.model_dump(exclude={"output_dir", "keep_checkpoints", "deploy"})
    settings["schedule"].pop("threads")  # as resuming allows: how fast, not what is trained
    settings["data"].pop("workers", None)

    def run(ctx: StageContext) -> str:
        if not ctx.resume:  # outputs of a run under other settings: start over
            for path in [*list_checkpoints(folder.root), folder.metrics, folder.sparsity]:
                path.unlink(missing_ok=True)
        result = train(recipe, resume=True, progress=ctx.progress, console=ctx.console)
        return (f"test accuracy {result.test_accuracy:.2f}%, "
                f"{result.report.compression['paper_convs']:.2f}x conv compression")

    epochs = recipe.schedule.epochs
    # a user's model file and weights decide what is trained: their bytes key the stage too
    reads = [Path(p) for p in (recipe.model.file and recipe.model.file.rpartition(":")[0], recipe.model.weights) if p]
    unused = frozenset() if recipe.schedule.sparse_kernels else TRAINING_KERNELS
    return Stage("train", "train", f"{recipe.model.label} on {recipe.data.name}, {epochs} epochs, "
                 f"{recipe.pruning.method}", settings, reads,
                 [folder.final_checkpoint(epochs), folder.metrics, folder.sparsity], run, own_progress=True,
                 unused_code=unused)


@STAGES.register("export")
def export_stage(recipe: Recipe, folder: RunFolder) -> Stage:
    from ..export.onnx_export import DEFAULT_OPSET, export_onnx

    checkpoint = folder.final_checkpoint(recipe.schedule.epochs)

    def run(ctx: StageContext) -> str:
        result = export_onnx(checkpoint, folder.onnx)
        layers = len(result.metadata.layers) if result.metadata else 0
        return f"{folder.onnx.name}: {layers} pattern-pruned convs in its metadata"

    return Stage("export", "export", "ONNX with BatchNorm folded and pattern metadata",
                 {"opset": DEFAULT_OPSET}, [checkpoint], [folder.onnx], run)


@STAGES.register("validate")
def validate_stage(recipe: Recipe, folder: RunFolder, runtime: str) -> Stage:
    """``runtime`` "onnxruntime": against PyTorch; a target name: its library against onnxruntime."""
    from ..compile.targets import TARGETS
    from ..export.onnx_export import reference_batches
    from ..train import load_checkpoint, restore_model
    from ..validate import check_library, check_onnxruntime, missing_device, runner_kind

    d = recipe.deploy
    checkpoint = folder.final_checkpoint(recipe.schedule.epochs)
    settings: dict = {"atol": d.atol, "rtol": d.rtol}
    if runtime == "onnxruntime":
        images, reads, against = d.validate_images, [checkpoint, folder.onnx], "PyTorch"
    else:
        spec = TARGETS.get(runtime)()
        kind = runner_kind(spec)
        images = d.emulated_images if kind == "qemu" else d.validate_images
        reads, against = [checkpoint, folder.onnx, folder.library(runtime)], "onnxruntime"
        settings |= {"runner": kind, "missing": missing_device(spec)}
    settings["images"] = images

    def run(ctx: StageContext) -> str:
        saved = load_checkpoint(checkpoint)
        if runtime == "onnxruntime":
            model, _ = restore_model(saved)
            result = check_onnxruntime(folder.onnx.read_bytes(), model,
                                       reference_batches(saved, images).epoch(0), d.atol, d.rtol)
        else:
            batches = reference_batches(saved, images, batch_size=1 if kind == "qemu" else 100)
            bar, advance = _image_progress(ctx, f"{runtime} ({kind})", images)
            with bar:
                result = check_library(spec, folder.library(runtime), folder.onnx.read_bytes(),
                                       batches.epoch(0), d.atol, d.rtol, advance)
        atomic_write_json(folder.validation(runtime), result.to_dict())  # kept when it fails
        result.require()
        return Skipped(result.describe()) if result.skipped else result.describe()

    return Stage(f"validate:{runtime}", "validate", f"{runtime} against {against} on {images} real "
                 "test images", settings, reads, [folder.validation(runtime)], run,
                 own_progress=runtime != "onnxruntime")


@STAGES.register("compile")
def compile_stage(recipe: Recipe, folder: RunFolder, target: str) -> Stage:
    from ..compile.build import compile_model
    from ..compile.targets import TARGETS

    spec = TARGETS.get(target)()

    def run(ctx: StageContext) -> str:
        built = compile_model(folder.onnx, target, folder.library(target))
        kernels = Counter(layer["kernel"] for layer in built.manifest["layers"] if layer["op"] == "conv")
        return "convs: " + ", ".join(f"{n} {kernel}" for kernel, n in kernels.most_common())

    return Stage(f"compile:{target}", "compile", f"TVM build for {target} ({spec.tvm_target.get('mcpu', 'generic')})",
                 {"target": target, "tvm_target": spec.tvm_target}, [folder.onnx],
                 [folder.library(target), folder.manifest(target)], run)


@STAGES.register("benchmark")
def benchmark_stage(recipe: Recipe, folder: RunFolder, target: str) -> Stage:
    """Host targets: latency per thread count, whole model and per conv (ours sparse and dense,
    onnxruntime, torch). qemu targets: instructions per inference, sparse and dense."""
    from ..compile.arm import qemu_cpu
    from ..compile.targets import TARGETS
    from ..validate import missing_device, runner_kind

    spec = TARGETS.get(target)()
    kind = runner_kind(spec)
    d = recipe.deploy
    checkpoint = folder.final_checkpoint(recipe.schedule.epochs)
    settings: dict = {"kind": kind, "tvm_target": spec.tvm_target}
    if kind == "host":
        settings |= {"threads": d.bench_threads, "rounds": d.bench_rounds}
        describe = f"latency at {', '.join(map(str, d.bench_threads))} thread(s), {d.bench_rounds} rounds"
    elif kind == "qemu":
        settings["cpu"] = qemu_cpu(spec)
        describe = f"instructions per inference under qemu -cpu {settings['cpu']}"
    else:
        settings["missing"] = missing_device(spec)
        describe = "device benchmark"

    def run(ctx: StageContext) -> str:
        result = {"target": target, "kind": kind, "date": datetime.date.today().isoformat()}
        if kind == "host":
            from ..bench import benchmark

            result |= benchmark(folder.onnx, folder.bench_work(target), checkpoint=checkpoint,
                                threads=tuple(d.bench_threads), rounds=d.bench_rounds, arm_cpu=None,
                                sparse_library=folder.library(target))
            ms = result["x86"][str(d.bench_threads[0])]
            summary = (f"{d.bench_threads[0]} thread(s): pattern-sparse {ms['ours_sparse']:.3f} ms, "
                       f"our dense {ms['ours_dense']:.3f} ms, onnxruntime {ms['onnxruntime']:.3f} ms")
        elif kind == "qemu":
            from ..bench.arm import arm_instructions
            from ..bench.flops import flop_reduction_limit, layer_work
            from ..contract import load_onnx
            from ..passes.onnx_passes import verify

            model = load_onnx(folder.onnx)
            result |= {"cpu": settings["cpu"],
                       "flop_reduction_limit": flop_reduction_limit(layer_work(model, verify(model))),
                       **arm_instructions(folder.onnx, folder.bench_work(target), settings["cpu"],
                                          target=target, sparse_library=folder.library(target))}
            summary = (f"pattern-sparse {result['ours_sparse'] / 1e6:.2f} M, our dense "
                       f"{result['ours_dense'] / 1e6:.2f} M instructions per inference")
        else:
            result["skipped"] = settings["missing"] or "no benchmark for device targets yet"
            summary = Skipped(f"skipped: {result['skipped']}")
        atomic_write_json(folder.bench(target), result)
        return summary

    return Stage(f"benchmark:{target}", "benchmark", describe, settings,
                 [checkpoint, folder.onnx, folder.library(target)], [folder.bench(target)], run)


@STAGES.register("report")
def report_stage(recipe: Recipe, folder: RunFolder) -> Stage:
    from ..report import write_report

    targets = recipe.deploy.targets
    reads = [folder.metrics, folder.sparsity, folder.validation("onnxruntime"),
             *[path for t in targets for path in (folder.manifest(t), folder.validation(t), folder.bench(t))]]

    def run(ctx: StageContext) -> str:
        return f"wrote {write_report(folder.root, targets)}"

    return Stage("report", "report", "self-contained HTML report", {"targets": targets}, reads,
                 [folder.report], run)
