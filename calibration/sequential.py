"""Sequential calibration and compensation, one graph node at a time.

QwT's reference code fits each compensation on the *already quantized and compensated*
network, block after block. We do the same per layer, in topological order:

1. For each node, run it over every calibration batch, using the quantized (and already
   compensated) values of its inputs.
2. For a weighted layer, also run the full-precision layer on the same input and stream
   per-channel moments of (y_q, y_fp) into a :class:`~qwt_deploy.calibration.cwac.ChannelStats`; solve
   CWAC (or bias correction) in closed form; apply it.
3. If the node's output carries a quantizer, observe its range over all batches, then
   quantize. Only then move on: the next node sees exactly what the deployed graph computes.

Memory: only the values still to be read (the "frontier" of the graph) are kept, for the
whole calibration set, and each is freed after its last reader. Never all layers at once.

``reference`` chooses the full-precision layer's input. ``"same-input"`` (the QwT-v2
definition: the FP layer on the very input the quantized layer receives) corrects weight
quantization error. ``"float-input"`` feeds the FP layer the value *before* its input
quantizer, so CWAC also absorbs the input's activation rounding/clipping bias, as QwT's
block-level fit does (its FP block runs with activation quantizers off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch

from qwt_deploy.graph.ir import Graph
from qwt_deploy.graph.ops import OPS, Role
from qwt_deploy.quantization.fake_quant import fit_weight_scale_to_int32_bias, quantize_weight, symmetric_act_quant
from qwt_deploy.quantization.placement import QuantPlan
from qwt_deploy.quantization.simulate import QuantParams, channel_dim, deployed_weights, quantized_weights

from qwt_deploy.graph.blocks import QWT_BRANCH

from .bias_correction import BiasCorrection
from .cwac import ChannelAffineCompensation
from .method import LayerCompensation, Method
from .observers import observe
from .qwt_branch import BlockReport, QwtBlockBranches


@dataclass
class CalibrationSettings:
    w_bits: int = 8
    a_bits: int = 8
    # activation observer: minmax | percentile | mse | auto. "auto" is the target's choice
    # (Target.default_observer), resolved by the API before calibration starts
    calib_method: str = "auto"
    percentile: float = 99.99
    weight_observer: str = "auto"  # minmax | mse | auto (mse below 8 bits)
    method: Method = field(default_factory=Method)  # Method.parse("qwt,qwt2") etc.
    ridge: float = 1e-3
    reference: str = "same-input"  # same-input | float-input
    # QwT (v1) block branches (calibration/qwt_branch.py), for methods that include "qwt"
    qwt_ridge: float = 1e-3  # relative to the block input's mean variance; 0 = plain least squares
    qwt_group_channels: int = 64  # CNN branch: input channels per group of the 1x1 conv (0 = dense)
    qwt_blocks: str = "auto"  # block rule: auto | residual | a regex on node names (graph/blocks.py)
    # what the deployed QwT branches compute in: the target's (Target.branch_precision)
    branch_precision: str = "fp32"

    def __post_init__(self):
        self.method = Method.parse(self.method)

    def layer_algorithm(self) -> Optional[ChannelAffineCompensation]:
        """The per-layer algorithm ``method`` names (None: plain PTQ)."""
        return {LayerCompensation.NONE: None, LayerCompensation.CWAC: ChannelAffineCompensation(self.ridge),
                LayerCompensation.BIAS_CORRECTION: BiasCorrection(self.ridge)}[self.method.layer]

    def block_algorithm(self) -> Optional[QwtBlockBranches]:
        """QwT (v1) block branches if ``method`` asks for them."""
        if not self.method.block_branches:
            return None
        return QwtBlockBranches(self.qwt_ridge, self.qwt_group_channels, self.qwt_blocks, self.branch_precision)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["method"] = str(self.method)
        return d


@dataclass
class LayerReport:
    name: str
    op: str
    channels: int
    alpha_min: float = 1.0
    alpha_mean: float = 1.0
    alpha_max: float = 1.0
    negative_alpha: int = 0
    beta_absmean: float = 0.0
    mse_before: float = 0.0
    mse_after: float = 0.0
    sqnr_before_db: float = 0.0
    sqnr_after_db: float = 0.0


@dataclass
class CalibrationResult:
    params: QuantParams
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    blocks: list[BlockReport] = field(default_factory=list)  # QwT (v1) branches, per block


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _scaled(bias: Optional[torch.Tensor], alpha) -> torch.Tensor | float:
    return 0.0 if bias is None else bias * torch.from_numpy(alpha).to(bias.dtype)


def activation_observer(settings: CalibrationSettings) -> str:
    """The observer ``calib_method`` names; "auto" must have been resolved for the target."""
    if settings.calib_method == "auto":
        from qwt_deploy.errors import InternalError

        raise InternalError("calib_method 'auto' reached calibrate(): resolve it with Target.observer() first")
    return settings.calib_method


def _sqnr_db(var: float, mse: float) -> float:
    import math

    return 10 * math.log10(var / mse) if mse > 0 and var > 0 else float("inf")


def calibrate(
    graph: Graph,
    plan: QuantPlan,
    batches: list[torch.Tensor],
    settings: CalibrationSettings,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> CalibrationResult:
    t0 = time.perf_counter()
    s = settings
    params = QuantParams(int32_bias=plan.int32_bias)
    w_obs = s.weight_observer if s.weight_observer != "auto" else ("mse" if s.w_bits < 8 else "minmax")
    for n in graph.nodes:
        if n.name in plan.weighted:
            params.weights[n.name] = quantize_weight(n.weight, s.w_bits, w_obs)
    # embedding tables: INT8 per row regardless of --w-bits (storage, not compute; see QuantPlan.tables)
    params.tables = {n.name: quantize_weight(n.weight, 8) for n in graph.nodes if n.name in plan.tables}
    tables = {k: t.dequant() for k, t in params.tables.items()}

    quant: dict[str, list[torch.Tensor]] = {}  # what readers see
    ref: dict[str, list[torch.Tensor]] = {}  # pre-quantizer values (float-input reference)
    raw: dict[str, list[torch.Tensor]] = {}  # float values that some readers read unquantized (trt edges)
    layer_alg = s.layer_algorithm()
    branch_alg = s.block_algorithm()
    observer = activation_observer(s)
    keep_ref = s.reference == "float-input" and layer_alg is not None
    last = graph.last_use()
    reports: list[LayerReport] = []
    block_reports: list[BlockReport] = []

    def settle(value: str, ys: list[torch.Tensor]) -> None:
        if plan.is_quantized(value):
            root = plan.root(value)
            if root == value and value not in params.acts:  # preset: a skipped QwT branch reuses Y's
                params.acts[value] = observe(ys, observer, s.a_bits, s.percentile)
                if plan.signed_activations:  # TensorRT: zero point 0
                    params.acts[value] = symmetric_act_quant(params.acts[value])
            else:
                params.acts[value] = params.acts[root]
            q = params.acts[value]
            quant[value] = [q(y) for y in ys]
            if plan.has_float_readers(value):
                raw[value] = ys
            if keep_ref:
                ref[value] = ys
        else:
            quant[value] = ys

    if len(graph.inputs) == 1 and torch.is_tensor(batches[0]):
        x_in = graph.inputs[0]
        # channels_last makes CPU (oneDNN) convolutions 2-3x faster on 4-D activations.
        settle(x_in, [_fast_layout(b.float()) for b in batches])
    else:  # several inputs (token ids, attention mask): each batch is a tuple in graph.inputs order
        for k, v in enumerate(graph.inputs):
            settle(v, [b[k].float() if graph.is_float_input(v) else b[k] for b in batches])
    total = len(graph.nodes)
    with torch.no_grad():
        for i, n in enumerate(graph.nodes):
            if progress:
                progress(i, total, n.name)
            spec = OPS[n.op]
            ins = [raw[v] if v in raw and not plan.sees_quantized(v, n.name) else quant[v] for v in n.inputs]
            if spec.role is Role.WEIGHTED and n.name in params.weights:  # (a layer kept float has none)
                if params.int32_bias:  # only an INT32 bias can overflow (a float bias cannot)
                    params.weights[n.name] = fit_weight_scale_to_int32_bias(
                        params.weights[n.name], n.weight, n.bias, params.acts[n.inputs[0]].scale)
                wq, bq = quantized_weights(n, params)
                ys = [spec.forward(n, [x], wq, bq) for x in ins[0]]
                if layer_alg is not None:  # statistics -> solve -> apply
                    stats = layer_alg.statistics(channel_dim(n))
                    refs = ref.get(n.inputs[0], ins[0]) if keep_ref else ins[0]
                    for y, x in zip(ys, refs):
                        stats.update(y, spec.forward(n, [x], n.weight, n.bias))
                    fit = layer_alg.solve(stats)
                    params.cwac[n.name] = fit
                    # continue with the folded layer, what the deployed graph computes: its
                    # re-rounded bias differs from alpha*b+beta (see fold_arithmetic). Computed
                    # as alpha*y + shift rather than a second convolution pass, to save time.
                    _, bd = deployed_weights(n, params)
                    ys = [layer_alg.apply(y, fit, channel_dim(n), shift=bd - _scaled(bq, fit.alpha)) for y in ys]
                    reports.append(LayerReport(
                        name=n.name, op=n.op, channels=len(fit.alpha),
                        alpha_min=float(fit.alpha.min()), alpha_mean=float(fit.alpha.mean()),
                        alpha_max=float(fit.alpha.max()), negative_alpha=int((fit.alpha < 0).sum()),
                        beta_absmean=float(abs(fit.beta).mean()),
                        mse_before=fit.mse_before, mse_after=fit.mse_after,
                        sqnr_before_db=_sqnr_db(fit.var_fp, fit.mse_before),
                        sqnr_after_db=_sqnr_db(fit.var_fp, fit.mse_after)))
                else:
                    reports.append(LayerReport(name=n.name, op=n.op, channels=int(n.weight.shape[0])))
            elif n.op == QWT_BRANCH:
                # QwT (v1): the block's Y is final (quantized if the target quantizes it for
                # this reader); fit the branch against the FP block on the kept X_q, add it,
                # and let settle() put Y' through its own quantizer (ort) before any reader.
                # fit.apply computes in the target's branch precision (FP16 for trt), so later
                # fits see the value the backend runs.
                if branch_alg is None:
                    from qwt_deploy.errors import InternalError

                    raise InternalError(f"{n.name}: a QwT branch node in a graph calibrated with --method {s.method}")
                fit, rep = branch_alg.fit(graph, n, ins)
                params.branches[n.name] = fit
                block_reports.append(rep)
                ys = [branch_alg.apply(fit, x, y) for x, y in zip(ins[0], ins[1])]
                y_v = n.inputs[1]
                if not fit.kept and plan.is_quantized(n.output) and plan.root(n.output) == n.output \
                        and plan.sees_quantized(y_v, n.name):
                    params.acts[n.output] = params.acts[y_v]  # no branch: no second quantizer either
            else:
                w = tables.get(n.name, n.weight)
                ys = [spec.forward(n, list(xs), w, n.bias) for xs in zip(*ins)]
            if n.activation is not None:
                ys = [n.activation.apply(y) for y in ys]
            settle(n.output, ys)
            for v in n.inputs:
                if last.get(v) == i:
                    quant.pop(v, None)
                    ref.pop(v, None)
                    raw.pop(v, None)
    if progress:
        progress(total, total, "done")
    return CalibrationResult(params=params, layers=reports, seconds=time.perf_counter() - t0, blocks=block_reports)
