"""``sqnr.png`` of ``qwt-check``: where is the quantization damage, and do the backends agree?

Two panels share one row per layer output (topological order, top to bottom, every layer
labelled with its full node name and op):

- left, **where is the damage**: SQNR against PyTorch FP32 in dB, per quantized path. A
  target's PyTorch fake-quant is a wide pale band, each backend of that target a thin dark
  line with markers drawn over it. A backend that computes what the simulation computes sits
  inside its band (the usual case: drawn the same way, the two lines would hide each other);
  one that leaves it is visible at once. The lowest SQNR of each path is labelled.
- right, **do the backends agree**: per layer, the share of elements where a backend is more
  than ``--atol-steps`` quantization steps away from its fake-quant, on a log axis (exact
  agreement is drawn at the axis floor). The gate (``1 - --min-agreement``) is a dashed line;
  points past it are red.

The first divergence (the first layer past the gate) is a red horizontal line across both
panels, named in the plot. The title names the model, bits, method and inputs.
"""

from __future__ import annotations

import io
import math
import os
from typing import Optional

from ..atomic import atomic_write_bytes

# Layout, in inches: every layer gets its own readable row, so the figure grows with the model.
ROW_IN = 0.17
MIN_HEIGHT_IN = 4.5
LABEL_FONT = 7
# Disagreement below this is drawn at the axis floor (log axis: 0 has no position).
FLOOR = 1e-5
_TARGET_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")  # one hue per target
_BACKEND_MARKERS = ("o", "s", "^", "D")


def model_label(description: str) -> str:
    """A short name for a report's model: ``factory pkg.mod:fn`` -> ``mod`` (``mod:fn`` unless
    fn is ``build``), a file -> its base name; else the description as is."""
    last = description.split(" ")[-1] if description else "model"
    if ":" in last and "/" not in last:
        module, _, fn = last.partition(":")
        short = module.rsplit(".", 1)[-1]
        return short if fn in ("build", "") else f"{short}:{fn}"
    if os.sep in last or "." in os.path.basename(last):
        return os.path.basename(last)
    return description


def _finite(v) -> Optional[float]:
    return float(v) if v is not None and math.isfinite(v) else None


def _shown_layers(report: dict, paths: list[str]) -> list[dict]:
    """Layer outputs that some quantized path maps (float-only values carry no SQNR)."""
    return [l for l in report["layers"]
            if any(_finite(l["sqnr_db"].get(p)) is not None for p in paths) or l.get("vs_fake_quant")]


def sqnr_figure(report: dict):
    """The matplotlib Figure (Agg); :func:`sqnr_plot_png` renders it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    ran = [p for p in report["paths"] if p["kind"] != "fp32" and p["ran"] and p["layerwise"]]
    paths = [p["name"] for p in ran]
    layers = _shown_layers(report, paths)
    n = len(layers)
    rows = list(range(n))
    targets = list(dict.fromkeys(p["target"] for p in ran))
    color = {t: _TARGET_COLORS[i % len(_TARGET_COLORS)] for i, t in enumerate(targets)}

    height = max(MIN_HEIGHT_IN, 1.6 + ROW_IN * n)
    # constrained layout sizes the margins to the full layer labels and the two-line title
    fig, (ax, ag) = plt.subplots(1, 2, sharey=True, figsize=(13.0, height), dpi=100, layout="constrained",
                                 gridspec_kw=dict(width_ratios=(2.2, 1.0)))

    # left: SQNR vs FP32 -- fake-quant as a wide pale band, backends as thin lines over it
    for p in ran:
        ys = [_finite(l["sqnr_db"].get(p["name"])) for l in layers]
        xs = [float("nan") if y is None else y for y in ys]
        c = color[p["target"]]
        if p["kind"] == "fake-quant":
            ax.plot(xs, rows, "-", color=c, linewidth=7, alpha=0.28, solid_capstyle="round",
                    label=f"{p['name']} (simulation: pale band)")
        else:
            k = sum(1 for q in ran[:ran.index(p)] if q["target"] == p["target"] and q["kind"] == "backend")
            ax.plot(xs, rows, "-", color=c, linewidth=1.0, marker=_BACKEND_MARKERS[k % len(_BACKEND_MARKERS)],
                    markersize=3.2, label=f"{p['name']} (backend: thin line)")
        finite = [(y, i) for i, y in enumerate(ys) if y is not None]
        if finite:
            y, i = min(finite)
            ax.annotate(f"lowest {y:.1f} dB", (y, i), xytext=(6, 0), textcoords="offset points", fontsize=6.5,
                        color=c, va="center")
    ax.set_xlabel("SQNR vs PyTorch FP32 (dB; higher is better)", fontsize=8)
    ax.set_title("where is the damage: per-layer SQNR vs FP32", fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", alpha=0.12)
    if ran:
        ax.legend(fontsize=7, loc="best", framealpha=0.9)

    # right: share of elements off by more than atol steps, backend vs its fake-quant
    gate = max(1.0 - float(s["min_agreement"]), FLOOR)
    pairs = list(report.get("first_divergence", {}).keys())
    pairs += sorted({k for l in layers for k in l.get("vs_fake_quant", {})} - set(pairs))
    for j, key in enumerate(pairs):
        backend = key.split(" vs ")[0]
        tgt = next((p["target"] for p in ran if p["name"] == backend), targets[0] if targets else "")
        xs, ok, bad = [], [], []
        for i, l in enumerate(layers):
            rec = l.get("vs_fake_quant", {}).get(key)
            off = None if rec is None or _finite(rec.get("within_atol")) is None else 1.0 - rec["within_atol"]
            xs.append(float("nan") if off is None else max(off, FLOOR))
            if off is not None:
                (bad if off > gate + 1e-12 else ok).append((max(off, FLOOR), i))
        ag.plot(xs, rows, "-", color=color.get(tgt, "grey"), linewidth=0.8, alpha=0.7,
                marker=_BACKEND_MARKERS[j % len(_BACKEND_MARKERS)], markersize=3, label=key)
        if bad:
            ag.scatter([b[0] for b in bad], [b[1] for b in bad], s=22, color="red", zorder=3,
                       label="past the gate" if j == 0 else None)
    ag.set_xscale("log")
    ag.set_xlim(FLOOR * 0.7, 1.5)
    ag.axvline(gate, color="black", linestyle="--", linewidth=1,
               label=f"gate: >= {s['min_agreement']:g} within {s['atol_steps']:g} step(s)")
    ag.set_xlabel(f"share of elements > {s['atol_steps']:g} step(s) from fake-quant\n(log; left edge = exact)",
                  fontsize=8)
    ag.set_title("do the backends agree with their simulation", fontsize=9, loc="left")
    ag.grid(axis="x", alpha=0.3, which="both")
    if pairs:
        ag.legend(fontsize=6.5, loc="best", framealpha=0.9)
    else:
        ag.text(0.5, 0.5, "no backend ran layer by layer", transform=ag.transAxes, ha="center", fontsize=8)

    # the first divergence, across both panels
    index = {l["value"]: i for i, l in enumerate(layers)}
    verdicts = []
    for key, d in report.get("first_divergence", {}).items():
        backend = key.split(" vs ")[0]
        if d and d["value"] in index:
            i = index[d["value"]]
            for a in (ax, ag):
                a.axhline(i, color="red", linewidth=1.2, alpha=0.8)
            ax.annotate(f"first divergence of {backend}: {d['node'] or d['value']} "
                        f"({d['within_atol']:.2%} within tolerance)", (0.995, i), xycoords=("axes fraction", "data"),
                        xytext=(0, -3), textcoords="offset points", ha="right", va="top", fontsize=7, color="red",
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
            verdicts.append(f"{backend} diverges at {d['node'] or d['value']}")
        elif d is None:
            verdicts.append(f"{backend} agrees at every layer")

    labels = [f"{l['node'] or l['value']}  ({l['op']})" for l in layers]
    ax.set_yticks(rows)
    ax.set_yticklabels(labels, fontsize=LABEL_FONT)
    ax.set_ylim(n - 0.5, -0.5)  # the first layer at the top
    ax.set_ylabel(f"layer output, topological order ({n} of {len(report['layers'])} shown: the mapped ones)",
                  fontsize=8)

    title = (f"{model_label(report.get('model', ''))}: {s['bits']} {s['method']}, "
             f"{s['num_inputs']} held-out inputs ({s.get('inputs', '')})")
    fig.suptitle(title + ("\n" + "; ".join(verdicts) if verdicts else ""), fontsize=10, x=0.01, ha="left")
    return fig


def sqnr_plot_png(report: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig = sqnr_figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_sqnr_plot(report: dict, path: str) -> None:
    atomic_write_bytes(path, sqnr_plot_png(report))
