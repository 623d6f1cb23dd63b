"""One self-contained HTML report of a run folder: training, sparsity, validation, latency.

Reads only the files the pipeline leaves (``clicktrain_deploy.runfolder``), so it can be
regenerated at any time (``clicktrain-deploy report RUN --html``); sections whose files are
missing say so. Figures are matplotlib PNGs inlined as data URIs.
"""
from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path

import jinja2

from ..errors import ClickTrainError
from ..fileio import atomic_write_text
from ..runfolder import RunFolder
from . import figures

TEMPLATE = "template.html.j2"
SPARSE_KERNELS = ("pattern", "connectivity")


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _targets(folder: RunFolder, state: dict | None) -> list[str]:
    if state and state.get("targets"):
        return state["targets"]
    root = folder.root / "targets"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _why_dense(layer: dict) -> str:
    """Why a conv of a compile manifest runs without the pattern kernel."""
    reason, kernel, shape = layer["reason"], layer["kernel"], layer["shape"]
    if kernel in ("depthwise", "tvm"):
        return reason
    if shape[2:] == [1, 1]:
        return "1x1 conv (shortcut projection): never pattern-pruned"
    if reason.startswith("no pattern metadata"):
        return "not pattern-pruned in training (e.g. the stem conv, skip_first_conv)"
    if reason.startswith("measured"):
        return f"sparse kernel measured slower on this host: {reason}"
    return f"too little saved: {reason}"


def _latency(target: str, bench: dict) -> tuple[list[dict], list[dict]]:
    """Whole-model table rows and speed-up figure rows of one target's benchmark."""
    table, speedups = [], []
    if bench.get("kind") == "host":
        limit = bench["flop_reduction_limit"]
        for threads, ms in bench["x86"].items():
            table.append({"target": target, "measure": f"latency, {threads} thread(s)", "unit": "ms",
                          "sparse": ms["ours_sparse"], "dense": ms["ours_dense"],
                          "onnxruntime": ms["onnxruntime"], "torch": ms.get("torch"),
                          "ratio": ms["ours_dense"] / ms["ours_sparse"], "limit": limit})
            speedups.append({"label": f"{target}\n{threads} thread(s)", "limit": limit,
                             "sparse_vs_dense": ms["ours_dense"] / ms["ours_sparse"],
                             "sparse_vs_ort": ms["onnxruntime"] / ms["ours_sparse"]})
    elif bench.get("kind") == "qemu":
        limit, ratio = bench["flop_reduction_limit"], bench["ours_dense"] / bench["ours_sparse"]
        table.append({"target": target, "measure": f"instructions per inference (qemu -cpu {bench['cpu']})",
                      "unit": "M", "sparse": bench["ours_sparse"] / 1e6, "dense": bench["ours_dense"] / 1e6,
                      "onnxruntime": None, "torch": None, "ratio": ratio, "limit": limit})
        speedups.append({"label": f"{target}\ninstructions", "limit": limit, "sparse_vs_dense": ratio,
                         "sparse_vs_ort": None})
    return table, speedups


def _layer_rows(bench: dict, threads: str) -> list[dict]:
    rows = []
    for layer in bench["layers"]:
        us = bench["x86_layers_us"][threads][layer["layer"]]
        sparse = us.get("ours_pattern", us.get("ours_connectivity"))
        dense = us.get("ours_dense", us.get("ours_pointwise"))
        rows.append({**layer, "sparse_us": sparse, "dense_us": dense, "limit": layer["flop_limit"],
                     "onnxruntime_us": us.get("onnxruntime"), "torch_us": us.get("torch"),
                     "speedup": dense / sparse if sparse and dense else None})
    return rows


def _check_status(check: dict) -> dict:
    """A validation record with its ``status`` ("passed", "failed" or "skipped"); records
    written before the status existed counted a skipped check as passed."""
    if check.get("skipped"):
        return {**check, "status": "skipped", "passed": False}
    return {**check, "status": check.get("status") or ("passed" if check["passed"] else "failed")}


def build_context(run_dir: str | Path, targets: list[str] | None = None) -> dict:
    """Everything the template shows, figures drawn, from the files in ``run_dir``."""
    folder = RunFolder(Path(run_dir))
    if not folder.metrics.is_file():
        raise ClickTrainError(f"{folder.metrics}: not found; is {folder.root} a trained run folder?")
    state = _json(folder.state)
    targets = targets if targets is not None else _targets(folder, state)
    metrics = [json.loads(line) for line in folder.metrics.read_text().splitlines() if line.strip()]
    sparsity = _json(folder.sparsity)
    checks = [_check_status(c) for c in (_json(folder.validation(r)) for r in ["onnxruntime", *targets]) if c]
    manifests = {t: m for t in targets if (m := _json(folder.manifest(t)))}
    benches = {t: b for t in targets if (b := _json(folder.bench(t)))}

    context: dict = {"title": folder.root.name, "folder": str(folder.root), "targets": targets,
                     "generated": datetime.datetime.now().isoformat(timespec="seconds"),
                     "metrics": metrics, "final": metrics[-1], "sparsity": sparsity, "checks": checks,
                     "stages": {name: stage for name, stage in (state or {}).get("stages", {}).items()
                                if name != "report" and name.partition(":")[2] in ("", "onnxruntime", *targets)},
                     "figures": {},
                     "unvalidated": [c for c in checks if c["status"] == "skipped"]}
    context["figures"]["training"] = figures.to_data_uri(figures.training_curves(metrics))
    if sparsity and sparsity["layers"]:
        context["figures"]["density"] = figures.to_data_uri(figures.layer_density(sparsity["layers"]))
        counts: Counter = Counter()
        for layer in sparsity["layers"]:
            counts.update(layer["pattern_histogram"])
        context["patterns"] = [{"id": i, "shape": p.split("|"), "kernels": counts[p]}
                               for i, p in enumerate(sparsity["library"])]
        context["figures"]["patterns"] = figures.to_data_uri(
            figures.pattern_histogram({p: counts[p] for p in sparsity["library"]}))
    if any(not c.get("skipped") for c in checks):
        context["figures"]["validation"] = figures.to_data_uri(figures.validation_diffs(checks))

    latency, speedups, layer_sections = [], [], []
    for target, bench in benches.items():
        rows, bars = _latency(target, bench)
        latency += rows
        speedups += bars
        if bench.get("kind") == "host":
            for threads in bench["x86_layers_us"]:
                layer_rows = _layer_rows(bench, threads)
                layer_sections.append({
                    "target": target, "threads": threads, "rows": layer_rows,
                    "figure": figures.to_data_uri(figures.layer_latency(
                        layer_rows, f"{target}, {threads} thread(s): each conv's kernel alone"))})
    context |= {"latency": latency, "layer_sections": layer_sections,
                "skipped_benchmarks": {t: b["skipped"] for t, b in benches.items() if b.get("skipped")}}
    if speedups:
        context["figures"]["speedups"] = figures.to_data_uri(figures.whole_model_speedups(speedups))

    dense_layers = []
    for target, manifest in manifests.items():
        for layer in manifest["layers"]:
            if layer["op"] == "conv" and layer["kernel"] not in SPARSE_KERNELS:
                dense_layers.append({"target": target, "layer": layer["layer"], "shape": layer["shape"],
                                     "kernel": layer["kernel"], "why": _why_dense(layer)})
    context["dense_layers"] = dense_layers
    context["kernel_counts"] = {
        t: Counter(l["kernel"] for l in m["layers"] if l["op"] == "conv") for t, m in manifests.items()}
    return context


def render_report(context: dict) -> str:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.get_template(TEMPLATE).render(**context)


def write_report(run_dir: str | Path, targets: list[str] | None = None, output: str | Path | None = None) -> Path:
    """Write the HTML report of ``run_dir`` (default ``run_dir/report.html``) atomically."""
    output = Path(output) if output else RunFolder(Path(run_dir)).report
    atomic_write_text(output, render_report(build_context(run_dir, targets)))
    return output
