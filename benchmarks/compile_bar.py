"""Issues 4/12's compile bar, measured: whole model and per conv at batch 1, ours pattern-sparse and
ours dense against onnxruntime and torch on x86 at 1 thread and at all cores, one harness for
every runtime (``clicktrain_deploy.bench``: each runtime alone in its own process, bound
zero-argument calls, median per-call time, floors beside), and ARM retired instructions of ours
sparse, ours dense and onnxruntime-aarch64 under qemu.

Models: registry models at their default size (224x224 for resnet18, resnet50, vgg16_bn_imagenet,
mobilenet_v2) with random weights and ~8x B=16 block-shared pattern masks on every 3x3 groups=1
conv (``bench.synthetic``), and trained runs (the Fashion-MNIST models) exported as they are:

    .venv/bin/python benchmarks/compile_bar.py --model resnet18 --model resnet50 \
        --model vgg16_bn_imagenet --model mobilenet_v2 \
        --run runs/training_bar/clicktrain_B16 --run runs/bench_vgg11

Resumable: every (model, thread count, runtime) and every ARM count is appended to the JSON file
(``--out``.json) as soon as it is measured, with the CPU, date, load, thread count and versions;
a re-run skips what is recorded for the same ONNX file and the same compiler source (a changed
compiler re-measures ours; ``--fresh`` re-measures everything of the models named now, keeping the
other models' records). ``--out``.md is rewritten from the
JSON at the end of every model.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ("ours_sparse", "ours_dense", "onnxruntime", "torch")


def compiler_digest() -> str:
    """sha256 of the compiler's source (compile, passes, contract) and TVM's version."""
    import tvm

    import clicktrain_deploy

    package = Path(clicktrain_deploy.__file__).parent
    roots = [package / "compile", package / "contract.py"]
    try:
        import clicktrain_deploy.passes as passes

        roots.append(Path(passes.__file__).parent)
    except ImportError:
        pass
    digest = hashlib.sha256(tvm.__version__.encode())
    for root in roots:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            if path.is_file():
                digest.update(str(path.relative_to(root.parent)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def prepare(args, kind: str, name: str, work: Path) -> tuple[Path, dict | None, dict]:
    """The model's ONNX file (made once), how torch builds it, and what it is."""
    onnx_path = work / "model.onnx"
    if kind == "run":
        run = Path(name)
        if not onnx_path.is_file():
            from clicktrain_deploy.export.onnx_export import export_onnx

            export_onnx(run, onnx_path)
        return onnx_path, {"checkpoint": str(run)}, {"kind": "trained run", "run": str(run)}
    from clicktrain_deploy.models import create_model, default_config

    size = tuple(default_config(name).input_size)
    if args.input_size:
        size = (size[0], args.input_size, args.input_size)
    kwargs = {"name": name, "num_classes": args.classes, "in_channels": size[0]}
    info = {"kind": "random weights, pattern masks", "model": name, "input": [1, *size], "block_size": args.block_size,
            "target_compression": args.compression}
    state = onnx_path.with_suffix(".pt")
    if not onnx_path.is_file() or not state.is_file():
        from clicktrain_deploy.bench.synthetic import pattern_pruned_onnx

        made = pattern_pruned_onnx(create_model(**kwargs), size, onnx_path, block_size=args.block_size,
                                   compression=args.compression)
        info["pruned_layers"], info["conv_compression"] = made.pruned_layers, made.compression
    torch_model = {"factory": "clicktrain_deploy.models:create_model", "kwargs": kwargs, "state_dict": str(state)}
    return onnx_path, torch_model, info


def build(onnx_path: Path, target: str, sparse: bool, build_dir: Path) -> Path:
    """Our library for ``target`` (cached per ONNX digest and compiler digest)."""
    from clicktrain_deploy.compile.build import compile_model

    library = build_dir / f"{'sparse' if sparse else 'dense'}_{target}.so"
    if not (library.is_file() and library.with_suffix(".json").is_file()):
        compile_model(onnx_path, target, library, sparse=sparse)
    return library


def record_for(results: dict, key: str, onnx_sha: str, compiler: str) -> dict:
    """This model's record; results of another ONNX file are dropped, and ours of another compiler."""
    record = results["models"].get(key)
    if record is None or record.get("onnx_sha256") != onnx_sha:
        record = {"onnx_sha256": onnx_sha, "timings": {}, "arm": {}, "errors": {}}
    if record.get("compiler") != compiler:
        for per_threads in record["timings"].values():
            for runtime in [r for r in per_threads if r.startswith("ours")]:
                del per_threads[runtime]
        record["arm"] = {k: v for k, v in record.get("arm", {}).items() if not k.startswith("ours")}
        record["compiler"] = compiler
    results["models"][key] = record
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="registry model, random weights + masks")
    parser.add_argument("--run", action="append", default=[], help="trained run directory (repeatable)")
    parser.add_argument("--input-size", type=int, help="H = W for registry models (default: the model's own)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--compression", type=float, default=8.0)
    parser.add_argument("--threads", default="1,all",
                        help="thread counts, 'all' = every core (default 1,all); 'none': no x86 timing (ARM only)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--no-layers", action="store_true", help="whole model only")
    parser.add_argument("--arm-cpu", default="cortex-a72", help="'none' to skip ARM")
    parser.add_argument("--arm-runs", default="1,11", help="FEW,MANY: ARM instructions per inference = "
                        "(count at MANY runs - count at FEW) / (MANY - FEW), the same for every runtime")
    parser.add_argument("--arm-timeout", type=float, default=600, help="seconds each qemu run may take")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_bar"))
    parser.add_argument("--work", type=Path, default=Path("runs/compile_bar"))
    parser.add_argument("--fresh", action="store_true",
                        help="ignore what the JSON file records for the models named now (others are kept)")
    parser.add_argument("--wait", choices=("default", "passive"), default="default",
                        help="idle threads: the runtimes' defaults (onnxruntime spins; OpenMP, TVM defaults) or "
                             "passive (allow_spinning=0, OMP_WAIT_POLICY=PASSIVE, TVM_BIND_THREADS=0): use passive "
                             "on a machine shared with other jobs (benchmarks/results/thread_isolation.md)")
    args = parser.parse_args()
    if not args.model and not args.run:
        parser.error("name at least one --model or --run")

    from clicktrain_deploy.bench import (
        environment, host_latency, layer_rows, thread_counts, to_markdown, HARNESS,
    )
    from clicktrain_deploy.bench.flops import flop_reduction_limit, layer_work, load_model
    from clicktrain_deploy.contract import read_metadata
    from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text

    out_json = args.out.with_suffix(".json")
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results.setdefault("models", {})
    if args.fresh:
        for key in [*args.model, *(Path(r).name for r in args.run)]:
            results["models"].pop(key, None)
    results["harness"] = HARNESS
    compiler = compiler_digest()
    wanted = [r for r in args.runtimes.split(",") if r]
    threads = [] if args.threads == "none" else thread_counts(args.threads)

    def save() -> None:
        atomic_write_json(out_json, results)
        atomic_write_text(args.out.with_suffix(".md"), "\n".join(
            to_markdown({**rec, "harness": results["harness"]}, f"**{key}** ({rec.get('source', {}).get('kind', '')}). ")
            for key, rec in results["models"].items() if any(rec.get("timings", {}).values()) or rec.get("arm")))

    for kind, name in [("model", m) for m in args.model] + [("run", r) for r in args.run]:
        key = name if kind == "model" else Path(name).name
        work = args.work / key
        work.mkdir(parents=True, exist_ok=True)
        onnx_path, torch_model, info = prepare(args, kind, name, work)
        record = record_for(results, key, file_digest(onnx_path), compiler)
        record["source"] = {**record.get("source", {}), **info}
        record["onnx"] = str(onnx_path)
        model = load_model(onnx_path)
        record["flop_reduction_limit"] = flop_reduction_limit(layer_work(model, read_metadata(model)))
        build_dir = work / f"build-{compiler}-{record['onnx_sha256']}"
        libraries = {}
        for runtime, sparse in (("ours_sparse", True), ("ours_dense", False)):
            if runtime not in wanted or not threads:
                continue
            record["errors"].pop(f"{runtime}/x86 build", None)
            try:
                libraries[runtime] = build(onnx_path, "x86", sparse, build_dir)
            except Exception as exc:  # noqa: BLE001  (recorded, the other runtimes still run)
                record["errors"][f"{runtime}/x86 build"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"{key}: {runtime} build failed: {exc}", file=sys.stderr)
        if "ours_sparse" in libraries:
            record["layers"] = layer_rows(onnx_path, json.loads(libraries["ours_sparse"].with_suffix(".json").read_text()))
        else:
            record.setdefault("layers", layer_rows(onnx_path, {"layers": []}))
        for t in threads:
            done = record["timings"].setdefault(str(t), {})
            todo = [r for r in wanted if r not in done and (not r.startswith("ours") or r in libraries)]
            if not todo:
                continue
            print(f"{key}: {t} thread(s): {', '.join(todo)}", flush=True)
            env = environment()
            if env["load_average"] and env["load_average"][0] > 0.5:
                print(f"warning: load average {env['load_average'][0]:.1f} on {env['cores']} cores: other jobs "
                      "share this machine; the figures (multi-thread ones above all) measure that too", file=sys.stderr)
            passive = args.wait == "passive"
            for r in todo:
                record["errors"].pop(f"{r}/x86 {t} threads", None)
            measured = host_latency(
                onnx_path, libraries, work, t, torch_model=torch_model, runtimes=todo, layers=not args.no_layers,
                rounds=args.rounds, samples=args.samples, spinning=not passive,
                env={"OMP_WAIT_POLICY": "PASSIVE", "TVM_BIND_THREADS": "0"} if passive else None,
                on_error=lambda r, exc: record["errors"].update({f"{r}/x86 {t} threads": str(exc)[-2000:]}))
            for runtime, entry in measured.items():
                done[runtime] = {**entry, "threads": t, "environment": env, "rounds": args.rounds,
                                 "samples": args.samples, "wait": args.wait}
            save()
        if args.arm_cpu != "none":
            arm(record, onnx_path, build_dir, args.arm_cpu, wanted, model,
                tuple(int(r) for r in args.arm_runs.split(",")), args.arm_timeout)
            save()
        save()
    print(args.out.with_suffix(".md").read_text())


def arm(record: dict, onnx_path: Path, build_dir: Path, cpu: str, wanted: list[str], model,
        runs: tuple[int, int], timeout: float) -> None:
    """ARM instruction counts not yet recorded: ours sparse and dense, and onnxruntime-aarch64
    where ``bench.arm`` offers ``onnxruntime_arm_instructions``, each (count at runs[1] - count
    at runs[0]) / the difference; the runs are recorded."""
    from clicktrain_deploy.bench.host import model_input

    counts = record.setdefault("arm", {})
    counts["cpu"] = cpu
    record.setdefault("date", datetime.datetime.now().isoformat(timespec="seconds"))
    runs_of = counts.setdefault("runs", {})
    record["errors"].pop("arm", None)
    try:
        from clicktrain_deploy.bench import arm as arm_bench
    except ImportError as exc:
        record["errors"]["arm"] = f"{type(exc).__name__}: {exc}"
        return
    for runtime, sparse in (("ours_sparse", True), ("ours_dense", False)):
        if runtime in wanted and runtime not in counts:
            record["errors"].pop(f"{runtime}/arm", None)
            try:
                from clicktrain_deploy.compile.arm import instructions_per_inference

                library = build(onnx_path, cpu, sparse, build_dir)
                shape = json.loads(library.with_suffix(".json").read_text())["inputs"][0]["shape"]
                image = model_input(model).reshape(shape)
                counts[runtime] = instructions_per_inference(library, image, cpu, runs, timeout)
                runs_of[runtime] = list(runs)
            except Exception as exc:  # noqa: BLE001
                record["errors"][f"{runtime}/arm"] = f"{type(exc).__name__}: {exc}"[:2000]
    ort_count = getattr(arm_bench, "onnxruntime_arm_instructions", None)
    if "onnxruntime" in wanted and "onnxruntime" not in counts and ort_count is not None:
        record["errors"].pop("onnxruntime/arm", None)
        try:
            counts["onnxruntime"] = int(ort_count(onnx_path, [model_input(model)], runs, cpu=cpu, timeout=timeout))
            runs_of["onnxruntime"] = list(runs)
        except Exception as exc:  # noqa: BLE001
            record["errors"]["onnxruntime/arm"] = f"{type(exc).__name__}: {exc}"[:2000]


if __name__ == "__main__":
    main()
