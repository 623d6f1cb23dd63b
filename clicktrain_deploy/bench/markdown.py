"""Benchmark results as README-ready Markdown tables."""
from __future__ import annotations


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"


def to_markdown(result: dict, title: str = "") -> str:
    """Whole-model x86 table per thread count, ARM table, per-layer table at each thread count."""
    limit = result["flop_reduction_limit"]
    lines = [f"{title}Measured {result['date']} (LLVM cpu `{result['machine']}`), `{result['onnx']}`, batch 1, "
             f"medians of interleaved rounds. FLOP-reduction limit of the whole model: {limit:.2f}x.", "",
             "| threads | ours pattern-sparse | ours dense | onnxruntime | torch | sparse vs ORT | "
             "sparse vs our dense | our dense vs ORT |", "|---|---|---|---|---|---|---|---|"]
    for threads, ms in result["x86"].items():
        torch_ms = f"{ms['torch']:.3f} ms" if "torch" in ms else "-"
        lines.append(f"| {threads} | {ms['ours_sparse']:.3f} ms | {ms['ours_dense']:.3f} ms | "
                     f"{ms['onnxruntime']:.3f} ms | {torch_ms} | {_ratio(ms['onnxruntime'], ms['ours_sparse'])} | "
                     f"{_ratio(ms['ours_dense'], ms['ours_sparse'])} | {_ratio(ms['onnxruntime'], ms['ours_dense'])} |")
    arm = result.get("arm")
    if arm:
        ratio = arm["ours_dense"] / arm["ours_sparse"]
        lines += ["", f"ARM ({arm['cpu']}, NEON, 1 thread, retired instructions per inference under "
                  "qemu-user, deterministic):", "",
                  "| ours pattern-sparse | ours dense | ratio | FLOP-reduction limit | share of limit |",
                  "|---|---|---|---|---|",
                  f"| {arm['ours_sparse'] / 1e6:.2f} M | {arm['ours_dense'] / 1e6:.2f} M | {ratio:.2f}x | "
                  f"{limit:.2f}x | {100 * ratio / limit:.0f}% |"]
    for threads, layers in result["x86_layers_us"].items():
        lines += ["", f"Per conv layer, x86, {threads} thread(s), microseconds (ours: the kernel alone; "
                  "onnxruntime and torch: that conv alone, bias included, no fused epilogue):", "",
                  "| layer | shape | kernel chosen | ours sparse | ours dense | onnxruntime | torch | "
                  "sparse vs dense | FLOP limit | sparse vs ORT |", "|---|---|---|---|---|---|---|---|---|---|"]
        for layer in result["layers"]:
            us = layers[layer["layer"]]
            sparse = us.get("ours_pattern", us.get("ours_connectivity"))
            chosen = us.get(f"ours_{layer['kernel']}", us.get("ours_dense"))
            dense = us.get("ours_dense")
            lines.append(
                f"| {layer['layer']} | {'x'.join(map(str, layer['shape']))} | {layer['kernel']} | "
                f"{f'{sparse:.1f}' if sparse else '-'} | {f'{dense:.1f}' if dense else '-'} | "
                f"{us['onnxruntime']:.1f} | {us['torch']:.1f} | "
                f"{_ratio(dense, sparse) if sparse and dense else '-'} | {layer['flop_limit']:.2f}x | "
                f"{_ratio(us['onnxruntime'], chosen) if chosen else '-'} |")
    return "\n".join(lines) + "\n"
