"""The report's figures, drawn with matplotlib and returned as inline PNG data URIs."""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PHASE_COLOURS = {"dense": "#f2f2f2", "regularize": "#fff4d6", "hard": "#e3f1e3"}
SPARSE, DENSE, ORT, TORCH = "#2a7ab0", "#c0504d", "#8c8c8c", "#e0a030"


def to_data_uri(figure: Figure) -> str:
    """PNG of ``figure`` as a data URI, so the HTML needs no other file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _shade_phases(ax, metrics: list[dict]) -> None:
    for row in metrics:
        ax.axvspan(row["epoch"] - 0.5, row["epoch"] + 0.5, color=PHASE_COLOURS.get(row["phase"], "white"), lw=0)


def training_curves(metrics: list[dict]) -> Figure:
    """Loss, top-1 accuracy and sparsity per epoch; background shaded by pruning phase."""
    epochs = [m["epoch"] for m in metrics]
    figure, (loss, accuracy, sparsity) = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax in (loss, accuracy, sparsity):
        _shade_phases(ax, metrics)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    loss.plot(epochs, [m["test_loss"] for m in metrics], "s-", label="test")
    loss.set_title("loss")
    loss.legend()
    accuracy.plot(epochs, [m["train_accuracy"] for m in metrics], "o-", label="train")
    accuracy.plot(epochs, [m["test_accuracy"] for m in metrics], "s-", label="test")
    accuracy.set_title("top-1 accuracy (%)")
    accuracy.legend()
    sparsity.plot(epochs, [100 * (1 - 1 / m["pruned_layer_compression"]) for m in metrics], "o-",
                  color="#555", label="pruned layers")
    sparsity.plot(epochs, [100 * (1 - 1 / m["paper_conv_compression"]) for m in metrics], "s-",
                  color=SPARSE, label="convs, as the paper counts")
    sparsity.set_ylim(-2, 100)
    sparsity.set_title("weights removed (%)")
    sparsity.legend(loc="lower right")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLOURS.values()]
    figure.legend(handles, [f"{p} phase" for p in PHASE_COLOURS], loc="lower center", ncol=3,
                  bbox_to_anchor=(0.5, -0.08), frameon=False)
    figure.tight_layout()
    return figure


def layer_density(layers: list[dict]) -> Figure:
    """Per pruned layer: share of weights and of kernels kept."""
    names = [layer["name"] for layer in layers]
    x = range(len(names))
    figure, ax = plt.subplots(figsize=(12, 3.6))
    ax.bar([i - 0.2 for i in x], [100 * layer["density"] for layer in layers], 0.4, color=SPARSE,
           label="weights kept")
    ax.bar([i + 0.2 for i in x], [100 * layer["kernels_kept"] / layer["kernels"] for layer in layers], 0.4,
           color="#9cc3de", label="kernels kept")
    ax.axhline(100 * 4 / 9, color="#999", ls=":", lw=1)
    ax.text(len(names) - 0.5, 100 * 4 / 9 + 1, "4 of 9 taps", ha="right", va="bottom", fontsize=8, color="#666")
    ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("% kept")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title("density per pattern-pruned layer")
    figure.tight_layout()
    return figure


def pattern_histogram(counts: dict[str, int]) -> Figure:
    """Kernels per library pattern over all layers, each pattern's 3x3 shape drawn under its bar."""
    patterns = list(counts)
    figure = plt.figure(figsize=(max(6, 1.1 * len(patterns) + 1), 4.2))
    ax = figure.add_axes((0.08, 0.32, 0.9, 0.6))
    ax.bar(range(len(patterns)), [counts[p] for p in patterns], 0.6, color=SPARSE)
    ax.set_xlim(-0.5, len(patterns) - 0.5)
    ax.set_xticks(range(len(patterns)), [f"p{i}" for i in range(len(patterns))])
    ax.set_ylabel("kernels")
    ax.set_title("kernels per library pattern (all pruned layers)")
    ax.grid(axis="y", alpha=0.3)
    width = 0.9 / len(patterns)
    for i, pattern in enumerate(patterns):
        cells = [[1.0 if c == "X" else 0.0 for c in row] for row in pattern.split("|")]
        size = min(width * 0.7, 0.16)
        glyph = figure.add_axes((0.08 + width * (i + 0.5) - size / 2, 0.04, size, 0.2))
        glyph.imshow(cells, cmap="Blues", vmin=0, vmax=1.2)
        glyph.set_xticks([x - 0.5 for x in range(4)], [])
        glyph.set_yticks([y - 0.5 for y in range(4)], [])
        glyph.tick_params(length=0)
        glyph.grid(color="#555", lw=0.8)
    return figure


def validation_diffs(checks: list[dict]) -> Figure:
    """Max |diff| of each runtime against its reference, beside its tolerance (log scale)."""
    ran = [c for c in checks if not c.get("skipped")]
    labels = [f"{c['runtime']}\nvs {c['reference']}" for c in ran]
    figure, ax = plt.subplots(figsize=(max(5, 1.8 * len(ran) + 1), 3.4))
    diffs = [max(c["max_abs_diff"], 1e-12) for c in ran]
    ax.bar(range(len(ran)), diffs, 0.5, color=[SPARSE if c["passed"] else DENSE for c in ran])
    for i, c in enumerate(ran):
        tolerance = c["atol"] + c["rtol"] * c["max_abs_logit"]
        ax.plot([i - 0.35, i + 0.35], [tolerance] * 2, color="black", lw=1.5,
                label="tolerance" if i == 0 else None)
        ax.text(i, diffs[i] * 1.3, f"{c['max_abs_diff']:.1e}\n{c['images']} images", ha="center",
                va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(min(diffs) / 10, max(diffs + [c["atol"] + c["rtol"] * c["max_abs_logit"] for c in ran]) * 30)
    ax.set_xticks(range(len(ran)), labels, fontsize=9)
    ax.set_ylabel("max |logit diff|")
    ax.set_title("validation on real test images")
    ax.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    return figure


def whole_model_speedups(rows: list[dict]) -> Figure:
    """Per target (and thread count): pattern-sparse vs our dense, and vs onnxruntime, beside the
    model's FLOP-reduction limit. rows: label, sparse_vs_dense, sparse_vs_ort (or None), limit."""
    figure, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 3.6))
    x = range(len(rows))
    ax.bar([i - 0.18 for i in x], [r["sparse_vs_dense"] for r in rows], 0.36, color=SPARSE,
           label="pattern-sparse vs our dense")
    ax.bar([i + 0.18 for i in x], [r["sparse_vs_ort"] or 0 for r in rows], 0.36, color=ORT,
           label="pattern-sparse vs onnxruntime")
    for i, r in enumerate(rows):
        ax.plot([i - 0.4, i + 0.4], [r["limit"]] * 2, color="black", ls="--", lw=1.2,
                label="FLOP-reduction limit" if i == 0 else None)
        ax.text(i - 0.18, r["sparse_vs_dense"], f"{r['sparse_vs_dense']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(1, color="#999", lw=0.8)
    ax.set_xticks(list(x), [r["label"] for r in rows], fontsize=9)
    ax.set_ylim(0, 1.1 * max(max(r["limit"], r["sparse_vs_dense"], r["sparse_vs_ort"] or 0) for r in rows))
    ax.set_ylabel("speed-up (x)")
    ax.set_title("whole model: speed-up of the pattern-sparse build")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def layer_latency(rows: list[dict], title: str) -> Figure:
    """Per conv: our sparse kernel and our dense kernel (us, bars), and the sparse speed-up beside
    the layer's FLOP-reduction limit (markers). rows: layer, sparse_us (or None), dense_us, limit."""
    figure, (times, ratios) = plt.subplots(2, 1, figsize=(12, 6), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 2]})
    x = list(range(len(rows)))
    times.bar([i - 0.2 for i in x], [r["sparse_us"] or 0 for r in rows], 0.4, color=SPARSE, label="ours pattern-sparse")
    times.bar([i + 0.2 for i in x], [r["dense_us"] or 0 for r in rows], 0.4, color=DENSE, label="ours dense")
    times.set_ylabel("us")
    times.set_title(title)
    times.legend(fontsize=8)
    times.grid(axis="y", alpha=0.3)
    measured = [i for i in x if rows[i]["sparse_us"] and rows[i]["dense_us"]]
    ratios.plot(measured, [rows[i]["dense_us"] / rows[i]["sparse_us"] for i in measured], "o", color=SPARSE,
                label="measured speed-up")
    ratios.plot(x, [r["limit"] for r in rows], "_", color="black", markersize=14, mew=2, label="FLOP-reduction limit")
    ratios.axhline(1, color="#999", lw=0.8)
    ratios.set_ylabel("x")
    ratios.legend(fontsize=8)
    ratios.grid(axis="y", alpha=0.3)
    ratios.set_xticks(x, [r["layer"] for r in rows], rotation=45, ha="right", fontsize=8)
    figure.tight_layout()
    return figure
