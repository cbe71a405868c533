"""Per-layer sensitivity to quantization, and the greedy choice of layers to keep float.

For every quantized weighted layer (Conv/Gemm/MatMul with INT8 weights, ``QuantPlan.weighted``)
two end-to-end losses against FP32 on held-out inputs:

- **only quantized**: the FP32 model with just this layer quantized (its INT8 weights with the
  compensation folded in, its input and output quantizers): the damage the layer does alone;
- **only float**: the quantized model with just this layer's weights left float (it computes
  in float on its dequantized input; its output keeps the quantizer its integer readers need,
  as ``--keep-float`` places it): what keeping this one layer float would win back.

The loss is the mean KL(FP32 || quantized) for class scores, else ``1 - mean cosine``.

How it is fast (EfficientNet-Lite0, 50 layers, 32 samples: ~2.5 min on 2 cores):

- no layer is re-calibrated: calibration ran once, and each variant is the same
  :class:`~qwt_deploy.quantization.simulate.SimulatedModel` with a subset of the calibrated
  :class:`~qwt_deploy.quantization.simulate.QuantParams` ("only float" shares every other
  layer's folded weights: ``SimulatedModel.with_float_weights``);
- one pass per layer and variant, on a small held-out subset (default 32 samples); the FP32
  outputs are computed once;
- plain fake-quant (dequantized INT8 weights, float conv, activation quantizers) instead of the
  bit-exact integer-kernel emulation, 2.6x faster on Lite0; the two differ by rounding flips of
  one output step, which do not change a ranking. Layouts whose quantizers sit on edges
  (``QuantPlan.readers``: TensorRT, transformers) keep the exact simulation, which places them.

The fallback (:func:`greedy_fallback`) uses the same variants to try layer sets (on all the
held-out data, the gates' own);
the caller then re-calibrates once for real with the chosen layers kept float and measures
that exactly on the full held-out data.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from ..graph.ir import Graph
from ..quantization.placement import QuantPlan
from ..quantization.simulate import QuantParams, SimulatedModel
from .accuracy import Accuracy, AccuracyGates, measure

HOW = ("no re-calibration: the calibrated parameters with one layer's weights (and quantizers) "
       "left out or kept; one simulation pass per layer and variant on a held-out subset; FP32 outputs "
       "computed once; fake-quant instead of the integer-kernel emulation where the layout allows")


@dataclass
class LayerSensitivity:
    node: str
    op: str
    only_quantized: float  # loss when only this layer is quantized (rest FP32)
    only_float: float  # loss when only this layer is left float (rest quantized)
    gain: float  # loss(all quantized) - only_float: what keeping this layer float wins back

    @property
    def score(self) -> float:
        """The ranking key: the mean of the two estimates of this layer's share of the loss
        (alone against FP32, and what leaving it float wins back); either alone is noisy where
        single layers matter little (W8A8)."""
        return 0.5 * (self.only_quantized + self.gain)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SensitivityReport:
    metric: str  # "kl" | "1-cosine"
    samples: int
    source: str
    all_quantized: float  # loss of the fully quantized model
    layers: list[LayerSensitivity]  # most sensitive first (LayerSensitivity.score)
    seconds: float
    exact: bool = False  # True: the bit-exact integer-kernel simulation; False: plain fake-quant
    how: str = HOW

    def ranking(self) -> list[str]:
        return [l.node for l in self.layers]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [dict(l.to_dict(), score=l.score) for l in self.layers]
        return d


def loss(fp32: np.ndarray, quantized: np.ndarray) -> tuple[str, float]:
    """("kl", mean KL) for class scores, else ("1-cosine", 1 - mean cosine)."""
    acc = measure(fp32, quantized)
    return ("kl", float(acc.kl)) if acc.kind == "classes" else ("1-cosine", 1.0 - acc.cosine)


def run_first_output(sim: SimulatedModel, batches: list) -> np.ndarray:
    """The (first) graph output of ``sim`` over input batches, as one array."""
    outs = []
    with torch.no_grad():
        for b in batches:
            y = sim(b)
            outs.append((y[0] if isinstance(y, tuple) else y).numpy())
    return np.concatenate(outs)


class Variants:
    """Simulations of one calibrated model with some layers' quantization removed or kept
    alone, sharing the folded weights (computed once)."""

    def __init__(self, graph: Graph, plan: QuantPlan, params: QuantParams, exact: bool = False):
        self.graph, self.params = graph, params
        # plan None: plain fake-quant (no integer-kernel emulation); only where no quantizer is
        # limited to some readers, which only the plan knows how to place
        self.exact = exact or bool(plan.readers)
        self.plan = plan if self.exact else None
        self.full = SimulatedModel(graph, self.plan, params)

    def without(self, layers: Iterable[str]) -> SimulatedModel:
        """The quantized model with ``layers``' weights left float (their compensation too)."""
        return self.full.with_float_weights(layers)

    def only(self, layer: str) -> SimulatedModel:
        """The FP32 model with only ``layer`` quantized: its weights and the quantizers on its
        (first) input and its output."""
        node = self.graph.node(layer)
        acts = {v: self.params.acts[v] for v in (node.inputs[0], node.output) if v in self.params.acts}
        p = replace(self.params, acts=acts, weights={layer: self.params.weights[layer]},
                    cwac={k: v for k, v in self.params.cwac.items() if k == layer}, branches={}, tables={})
        return SimulatedModel(self.graph, self.plan, p)


def layer_sensitivity(graph: Graph, plan: QuantPlan, params: QuantParams, batches: list, *, samples: int,
                      source: str = "held-out", fp32: Optional[np.ndarray] = None, exact: bool = False,
                      progress: Optional[Callable[[int, int, str], None]] = None) -> SensitivityReport:
    """Both losses for every weighted layer of ``plan`` on ``batches`` (held-out inputs as the
    simulation takes them), sorted most sensitive first."""
    t = time.perf_counter()
    v = Variants(graph, plan, params, exact)
    ref = fp32 if fp32 is not None else run_first_output(SimulatedModel(graph), batches)
    metric, base = loss(ref, run_first_output(v.full, batches))
    layers = [n for n in plan.weighted if n in params.weights]
    rows = []
    for i, name in enumerate(layers):
        if progress:
            progress(i, len(layers), name)
        _, lq = loss(ref, run_first_output(v.only(name), batches))
        _, lf = loss(ref, run_first_output(v.without([name]), batches))
        rows.append(LayerSensitivity(node=name, op=graph.node(name).op, only_quantized=lq, only_float=lf,
                                     gain=base - lf))
    if progress:
        progress(len(layers), len(layers), "")
    rows.sort(key=lambda r: -r.score)
    return SensitivityReport(metric=metric, samples=samples, source=source, all_quantized=base, layers=rows,
                             seconds=time.perf_counter() - t, exact=v.exact)


@dataclass
class FallbackStep:
    float_layers: list[str]
    accuracy: dict  # Accuracy.to_dict() on the held-out subset (simulation, no re-calibration)
    met: bool


@dataclass
class FallbackSearch:
    chosen: list[str]  # layers to keep float, in the order they were added
    met: bool  # the gates are met on the search's data with these layers float
    steps: list[FallbackStep] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def greedy_fallback(evaluate: Callable[[list[str]], Accuracy], ranking: list[str], gates: AccuracyGates,
                    max_float_layers: int, max_trials: Optional[int] = None) -> FallbackSearch:
    """Add layers from ``ranking`` (most sensitive first) one at a time, keeping a layer only if
    it improves the gated figures, until ``gates`` are met, ``max_float_layers`` are float or
    ``max_trials`` candidates were tried (default ``2 * max_float_layers``).
    ``evaluate(float_layers)`` measures the model with those layers float."""
    max_trials = 2 * max_float_layers if max_trials is None else max_trials
    chosen: list[str] = []
    acc = evaluate(chosen)
    search = FallbackSearch(chosen=chosen, met=gates.met(acc),
                            steps=[FallbackStep([], acc.to_dict(), gates.met(acc))])
    score = gate_score(acc, gates)
    for name in ranking:
        if search.met or len(chosen) >= max_float_layers or len(search.steps) > max_trials:
            break
        trial = evaluate(chosen + [name])
        met = gates.met(trial)
        search.steps.append(FallbackStep(chosen + [name], trial.to_dict(), met))
        s = gate_score(trial, gates)
        if met or s < score:  # keep it only if the gated figures got better
            chosen.append(name)
            acc, score, search.met = trial, s, met
    search.chosen = chosen
    return search


def gate_score(acc: Accuracy, gates: AccuracyGates) -> tuple:
    """Lower is better: how far the gated figures miss their bars, summed in their own units."""
    miss = 0.0
    if gates.min_agreement is not None:
        miss += max(0.0, gates.min_agreement - (acc.top1_agreement or 0.0))
    if gates.max_kl is not None:
        miss += max(0.0, (acc.kl if acc.kl is not None else float("inf")) - gates.max_kl)
    if gates.min_cosine is not None:
        miss += max(0.0, gates.min_cosine - acc.cosine)
    # tie-break on KL (or 1 - cosine): closer to FP32 is better even when the miss is the same
    return (round(miss, 12), acc.kl if acc.kl is not None else 1.0 - acc.cosine)


def write_bar_chart(report: SensitivityReport, path: str, title: str = "", top: int = 40) -> None:
    """PNG: per layer (most sensitive first, at most ``top``), the loss with only that layer
    quantized and the loss recovered by keeping only it float, as horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.layers[:top]
    h = max(3.0, 0.22 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(9, h))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r.only_quantized for r in rows], 0.4, label="only this layer quantized (rest FP32)",
            color="#d62728")
    ax.barh(y + 0.2, [max(r.gain, 0.0) for r in rows], 0.4, label="recovered by keeping only it float",
            color="#1f77b4")
    ax.axvline(report.all_quantized, color="k", ls="--", lw=1, label=f"all layers quantized ({report.all_quantized:.4g})")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r.node} ({r.op})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"end-to-end {report.metric} vs FP32 on {report.samples} held-out samples")
    ax.set_title(title or "per-layer quantization sensitivity", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
