"""Benchmark results as README-ready Markdown tables.

A record (what ``bench.benchmark`` returns, or one model of ``benchmarks/compile_bar.py``'s JSON):
``flop_reduction_limit``, ``layers`` (rows of ``bench.layer_rows``), ``timings`` {threads:
{runtime: ``bench.host_latency`` entry}}, optionally ``arm`` {"cpu", "ours_sparse", "ours_dense",
"onnxruntime"}, ``environment``, ``onnx``.
"""
from __future__ import annotations

RUNTIMES = ("ours_sparse", "ours_dense", "onnxruntime", "torch")


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def _fmt(value: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def _ms(value: float | None) -> str:
    return f"{value:.3f} ms" if value is not None else "-"


def whole_model_table(record: dict) -> list[str]:
    limit = record["flop_reduction_limit"]
    lines = ["| threads | ours pattern-sparse | ours dense | onnxruntime | torch | sparse vs ORT | "
             "sparse vs our dense | our dense vs ORT | FLOP-reduction limit |", "|---|---|---|---|---|---|---|---|---|"]
    for threads, runtimes in record["timings"].items():
        ms = {r: runtimes.get(r, {}).get("model_ms") for r in RUNTIMES}
        lines.append(f"| {threads} | {_ms(ms['ours_sparse'])} | {_ms(ms['ours_dense'])} | {_ms(ms['onnxruntime'])} | "
                     f"{_ms(ms['torch'])} | {_ratio(ms['onnxruntime'], ms['ours_sparse'])} | "
                     f"{_ratio(ms['ours_dense'], ms['ours_sparse'])} | {_ratio(ms['onnxruntime'], ms['ours_dense'])} | "
                     f"{limit:.2f}x |")
    return lines


def floor_table(record: dict) -> list[str]:
    lines = ["| threads | ours: VM `main` | ours: one kernel | onnxruntime: session | torch: module | "
             "torch: one op |", "|---|---|---|---|---|---|"]
    for threads, runtimes in record["timings"].items():
        ours = next((runtimes[r]["floors_us"] for r in ("ours_sparse", "ours_dense") if r in runtimes), {})
        ort = runtimes.get("onnxruntime", {}).get("floors_us", {})
        pt = runtimes.get("torch", {}).get("floors_us", {})
        lines.append(f"| {threads} | {_fmt(ours.get('model'), 2)} us | {_fmt(ours.get('op'), 2)} us | "
                     f"{_fmt(ort.get('model'), 2)} us | {_fmt(pt.get('model'), 2)} us | {_fmt(pt.get('op'), 2)} us |")
    return lines


def layer_table(record: dict, threads: str) -> list[str]:
    runtimes = record["timings"][threads]
    us = {r: runtimes.get(r, {}).get("layers_us", {}) for r in RUNTIMES}
    lines = ["| layer | shape | kernel chosen | ours sparse build | ours dense build | onnxruntime | torch | "
             "sparse vs dense | FLOP limit | sparse vs ORT | dense vs ORT |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["layers"]:
        t = {r: us[r].get(row["layer"]) for r in RUNTIMES}
        lines.append(
            f"| {row['layer']} | {'x'.join(map(str, row['shape']))} | {row['kernel']} | {_fmt(t['ours_sparse'], 1)} | "
            f"{_fmt(t['ours_dense'], 1)} | {_fmt(t['onnxruntime'], 1)} | {_fmt(t['torch'], 1)} | "
            f"{_ratio(t['ours_dense'], t['ours_sparse'])} | {row['flop_limit']:.2f}x | "
            f"{_ratio(t['onnxruntime'], t['ours_sparse'])} | {_ratio(t['onnxruntime'], t['ours_dense'])} |")
    return lines


def arm_table(record: dict) -> list[str]:
    arm, limit = record["arm"], record["flop_reduction_limit"]
    sparse, dense, ort = arm["ours_sparse"], arm.get("ours_dense"), arm.get("onnxruntime")
    runs = arm.get("runs") or {}
    counted = "; ".join(f"{name}: ({many} - {few}) / {many - few} runs" for name, (few, many) in runs.items())
    lines = [f"ARM ({arm['cpu']}, 1 thread, retired instructions per inference under qemu-user, deterministic"
             f"{f'; {counted}' if counted else ''}):", "",
             "| ours pattern-sparse | ours dense | onnxruntime-aarch64 | sparse vs dense | sparse vs ORT | "
             "FLOP-reduction limit | share of limit (vs ORT) |", "|---|---|---|---|---|---|---|"]
    vs_ort = ort / sparse if ort else None
    lines.append(f"| {sparse / 1e6:.2f} M | {f'{dense / 1e6:.2f} M' if dense else '-'} | "
                 f"{f'{ort / 1e6:.2f} M' if ort else '-'} | {_ratio(dense, sparse)} | {_ratio(ort, sparse)} | "
                 f"{limit:.2f}x | {f'{100 * vs_ort / limit:.0f}%' if vs_ort else '-'} |")
    return lines


def to_markdown(record: dict, title: str = "") -> str:
    """Whole-model table, floors, ARM table and the per-layer table at each thread count."""
    env = record.get("environment") or next(
        (entry["environment"] for per in record["timings"].values() for entry in per.values()
         if entry.get("environment")), {})
    where = f"{env.get('cpu', 'this host')}, {env.get('cores', '?')} cores" if env else "this host"
    versions = ", ".join(f"{k} {env[k]}" for k in ("tvm", "onnxruntime", "torch") if env.get(k))
    lines = [f"{title}Measured {env.get('date', record.get('date', ''))} on {where}"
             f"{f' ({versions})' if versions else ''}, `{record.get('onnx', '')}`, batch 1. "
             f"Harness: {record.get('harness', 'see clicktrain_deploy.bench')}."]
    if any(record["timings"].values()):
        lines += ["", *whole_model_table(record), "",
                  "Empty-call floor of each runtime (the same call path on a one-ReLU model; included, not "
                  "subtracted, in every figure):", "", *floor_table(record)]
    if record.get("arm", {}).get("ours_sparse"):
        lines += ["", *arm_table(record)]
    for threads in record["timings"]:
        if not any(r.get("layers_us") for r in record["timings"][threads].values()):
            continue
        lines += ["", f"Per conv layer, x86, {threads} thread(s), microseconds (ours: the layer's kernel from "
                  "each build's library, fused epilogue included; onnxruntime: a one-Conv model; torch: "
                  "`F.conv2d`; bias included):", "", *layer_table(record, threads)]
    return "\n".join(lines) + "\n"
