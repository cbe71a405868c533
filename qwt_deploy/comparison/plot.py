"""PNG of per-layer SQNR against FP32, one line per quantized path.

A picture shows at a glance where quantization noise builds up and whether two backends
track each other; a divergence is where their lines part.
"""

from __future__ import annotations

import io
import math

from ..atomic import atomic_write_bytes


def sqnr_plot_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    paths = [p["name"] for p in report["paths"] if p["kind"] != "fp32" and p["ran"] and p["layerwise"]]
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, 0.18 * len(layers))), 4.5), dpi=110)
    styles = ["-", "--", "-.", ":"]
    for i, name in enumerate(paths):
        ys = [l["sqnr_db"].get(name) for l in layers]
        ys = [y if y is not None and math.isfinite(y) else float("nan") for y in ys]
        ax.plot(range(len(layers)), ys, styles[i % len(styles)], marker=".", markersize=3, linewidth=1.2, label=name)
    for key, d in report.get("first_divergence", {}).items():
        if d:
            idx = next(i for i, l in enumerate(layers) if l["value"] == d["value"])
            ax.axvline(idx, color="red", linewidth=0.8, alpha=0.6)
            ax.annotate(f"diverges: {key.split(' vs ')[0]}", (idx, ax.get_ylim()[1]), fontsize=7, color="red",
                        rotation=90, va="top", ha="right")
    ax.set_xlabel("layer output (topological order)")
    ax.set_ylabel("SQNR vs PyTorch FP32 (dB)")
    ax.set_title(f"{report['model']}: per-layer SQNR ({report['settings']['bits']}, {report['settings']['method']})",
                 fontsize=9)
    ticks = list(range(0, len(layers), max(1, len(layers) // 30)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([layers[i]["node"] or layers[i]["value"] for i in ticks], rotation=90, fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_sqnr_plot(report: dict, path: str) -> None:
    atomic_write_bytes(path, sqnr_plot_png(report))
