"""The PyTorch fake-quant simulation of the exported graph.

``QuantParams`` holds everything calibration decided. ``SimulatedModel`` runs the IR with
those parameters, computing each node the way the deployed (folded) QDQ ONNX graph does:

    DQ(x) -> op(DQ(W_int8 folded), DQ(b_int32 folded)) -> ReLU/Clip -> [Clip a-bits] -> Q -> DQ

so ONNX Runtime on the exported file can be checked against it step for step. The CWAC
fold re-rounds the bias at the new weight scale; simulating ``layer * alpha + beta``
instead would differ from the deployed graph by a rounding flip in ~0.1-0.4% of each
layer's output codes (see ``fold_arithmetic``). ``params.cwac`` keeps alpha/beta for the
unfolded export and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..graph.ir import Graph, Node
from ..graph.ops import OPS, linear_as_matmul
from .fold_arithmetic import FoldedLayer, deployed_bias, fold_affine, int32_bias_codes
from .integer_kernels import (IntegerLayer, integer_matmul, made_redundant_by_q, qlinear_add, qlinear_mul,
                              qlinear_sigmoid, qlinear_sigmoid_table)
from .trt_kernels import AccumulatorLayer
from .compensation import AffineFit, BlockBranch
from .fake_quant import ActQuant, WeightQuant, bias_scale, quantize_bias_int32
from .placement import Kernels, QuantPlan


@dataclass
class QuantParams:
    acts: dict[str, ActQuant] = field(default_factory=dict)  # per value (inherited ones included)
    weights: dict[str, WeightQuant] = field(default_factory=dict)  # per node name
    cwac: dict[str, AffineFit] = field(default_factory=dict)  # per node name, if compensated
    int32_bias: bool = True  # ONNX Runtime layout; False where the bias stays float (TensorRT)
    # per qwt_branch node: the fitted QwT (v1) block branch (qwt_deploy.calibration.qwt_branch.BranchFit)
    branches: dict[str, BlockBranch] = field(default_factory=dict)
    tables: dict[str, WeightQuant] = field(default_factory=dict)  # INT8 embedding tables, per row (plan.tables)

    def bias_int32(self, node: Node) -> Optional[torch.Tensor]:
        if node.bias is None:
            return None
        return quantize_bias_int32(node.bias, self.acts[node.inputs[0]].scale, self.weights[node.name].scale)


def quantized_weights(node: Node, params: QuantParams) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dequantized INT8 weight and INT32 bias, exactly as the DequantizeLinear nodes produce them."""
    wq = params.weights[node.name]
    b = None
    if node.bias is not None and (not params.int32_bias or linear_as_matmul(node)):
        b = node.bias.float()  # TensorRT layout / MatMul linears: the bias stays a float initializer
    elif node.bias is not None:
        b = params.bias_int32(node).float() * bias_scale(params.acts[node.inputs[0]].scale, wq.scale)
    return wq.dequant(), b


def deployed_layer(node: Node, params: QuantParams) -> FoldedLayer:
    """INT8 codes, weight scale and float bias of ``node`` as the deployed graph holds them:
    with CWAC folded in if the node is compensated (exactly as the graph pass folds it)."""
    wq = params.weights[node.name]
    b = None
    if node.bias is not None and params.int32_bias and not linear_as_matmul(node):
        b = params.bias_int32(node).double().numpy() * bias_scale(
            params.acts[node.inputs[0]].scale, wq.scale).double().numpy()
    elif node.bias is not None:
        b = node.bias.double().numpy()
    fit = params.cwac.get(node.name)
    if fit is None:
        return FoldedLayer(wq.q.numpy(), wq.scale.numpy().astype(np.float32), b)
    return fold_affine(wq.q.numpy(), wq.scale.numpy(), b, fit.alpha, fit.beta, axis=0)


def deployed_weights(node: Node, params: QuantParams) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dequantized weight and bias of ``node`` as the deployed graph's DequantizeLinear nodes
    produce them: with ``params.cwac[node]`` folded in (and the bias re-rounded) if present.
    The simulation runs these rather than ``layer * alpha + beta``."""
    if node.name not in params.cwac:
        return quantized_weights(node, params)
    f = deployed_layer(node, params)
    int32 = params.int32_bias and not linear_as_matmul(node)  # a MatMul linear keeps a float bias Add
    s_x = params.acts[node.inputs[0]].scale if int32 else None
    shape = (-1,) + (1,) * (f.codes.ndim - 1)
    w = torch.from_numpy(f.codes.astype(np.float32) * f.scale.reshape(shape))
    if f.bias is None:  # a bias-less layer gets the folded beta as its bias
        f.bias = np.zeros(f.scale.shape, np.float64)
    return w, torch.from_numpy(deployed_bias(f, s_x, int32))


def integer_layer(node: Node, params: QuantParams, plan: Optional[QuantPlan]) -> Optional[IntegerLayer]:
    """The fused integer kernel ONNX Runtime runs for ``node``, or None if it stays float
    (see ``integer_kernels`` for the preconditions)."""
    if plan is None or plan.kernels is not Kernels.REQUANTIZING or not params.int32_bias or node.name not in params.weights:
        return None
    if linear_as_matmul(node):  # MatMul + float bias Add: not a fused QGemm/QLinearConv unit
        return None
    x, y = params.acts.get(node.inputs[0]), params.acts.get(node.output)
    if x is None or y is None or y.bits != 8 or plan.activations.get(node.output) is not None:
        return None
    if node.activation is not None and not made_redundant_by_q(node.activation, y):
        return None
    f = deployed_layer(node, params)
    bias = None
    if f.bias is not None or node.name in params.cwac:
        bias, _ = int32_bias_codes(f.bias if f.bias is not None else np.zeros(f.scale.shape), x.scale, f.scale)
    return IntegerLayer.build(f.codes, f.scale, bias, x, y)


def qlinear_add_params(node: Node, params: QuantParams, plan: Optional[QuantPlan]) -> Optional[tuple]:
    """(q_a, q_b, q_out) if ONNX Runtime runs ``node`` as QLinearAdd: an activation + activation
    Add read through both input quantizers and followed by an 8-bit output Q, on the ONNX
    Runtime layout; None otherwise (it stays a float Add between DQ and Q)."""
    return _qlinear_binary_params(node, params, plan, "add")


def qlinear_mul_params(node: Node, params: QuantParams, plan: Optional[QuantPlan]) -> Optional[tuple]:
    """(q_a, q_b, q_out) if ONNX Runtime runs ``node`` as QLinearMul (same conditions as
    QLinearAdd; broadcasting included: ORT fuses it too, and its kernel's arithmetic is the same
    per element); None otherwise."""
    return _qlinear_binary_params(node, params, plan, "mul")


def _qlinear_binary_params(node: Node, params: QuantParams, plan: Optional[QuantPlan], op: str) -> Optional[tuple]:
    if plan is None or plan.kernels is not Kernels.REQUANTIZING or node.op != op or len(node.inputs) != 2:
        return None
    if node.name in params.weights or node.name in params.branches:
        return None
    qs = [params.acts.get(v) for v in node.inputs]
    y = params.acts.get(node.output)
    if any(q is None or q.bits != 8 for q in qs) or y is None or y.bits != 8:
        return None
    if plan.activations.get(node.output) is not None or not all(plan.sees_quantized(v, node.name) for v in node.inputs):
        return None
    if node.activation is not None and not made_redundant_by_q(node.activation, y):
        return None
    return qs[0], qs[1], y


def qlinear_sigmoid_params(node: Node, params: QuantParams, plan: Optional[QuantPlan]) -> Optional[tuple]:
    """(table, q_in) if ONNX Runtime runs ``node`` as QLinearSigmoid (a Sigmoid between an 8-bit
    DQ and an 8-bit Q, ONNX Runtime layout): it looks the input codes up in a 256-entry table;
    None otherwise."""
    if plan is None or plan.kernels is not Kernels.REQUANTIZING or node.op != "sigmoid":
        return None
    x, y = params.acts.get(node.inputs[0]), params.acts.get(node.output)
    if x is None or y is None or x.bits != 8 or y.bits != 8 or plan.activations.get(node.output) is not None:
        return None
    if not plan.sees_quantized(node.inputs[0], node.name):
        return None
    return qlinear_sigmoid_table(x, y), x


def accumulator_layer(node: Node, params: QuantParams, plan: Optional[QuantPlan]) -> Optional[AccumulatorLayer]:
    """``node`` as an integer kernel with a float output computes it (exact accumulator, float32
    scale, float bias; see ``trt_kernels``), or None where it stays plain float: TensorRT's INT8
    Conv/Gemm/MatMul, and ONNX Runtime's MatMulIntegerToFloat for token linears (MatMul + bias Add),
    which computes ``float32(acc) * float32(s_x * s_w) + b`` the same way (checked bit for bit
    against ORT on MiniLM's first linear; a float MatMul of dequantized values matched 13%)."""
    if plan is None or node.name not in params.weights or node.name in params.branches:
        return None
    if plan.kernels is Kernels.REQUANTIZING and not linear_as_matmul(node):  # Conv/Gemm: IntegerLayer
        return None
    x = params.acts.get(node.inputs[0])
    if x is None or not plan.sees_quantized(node.inputs[0], node.name):
        return None
    f = deployed_layer(node, params)
    return AccumulatorLayer.build(f.codes, f.scale, f.bias, x)


def apply_affine(y: torch.Tensor, fit: AffineFit, channel_dim: int = 1, shift=None) -> torch.Tensor:
    """``alpha * y + beta`` per channel (``shift`` replaces beta when given)."""
    shape = [1] * y.dim()
    shape[channel_dim % y.dim()] = -1
    a = torch.from_numpy(fit.alpha).reshape(shape)
    b = (torch.from_numpy(fit.beta) if shift is None else torch.as_tensor(shift)).reshape(shape)
    return (y * a).add_(b)  # Mul then Add, two roundings, as the unfolded ONNX graph does


def channel_dim(node: Node) -> int:
    """Output-channel axis: 1 for conv (NCHW); the last dim for linear, which is 1 on a 2-D
    input and the feature dim of (batch, tokens, dim) activations."""
    return -1 if node.op == "linear" else 1


class SimulatedModel(torch.nn.Module):
    """Runs the IR in float (``params=None``) or as the fake-quant model of the QDQ graph."""

    def __init__(self, graph: Graph, plan: Optional[QuantPlan] = None, params: Optional[QuantParams] = None):
        super().__init__()
        self.graph, self.plan, self.params = graph, plan, params
        self._w = {}
        # nodes that ONNX Runtime runs as fused integer kernels: emulated bit for bit
        self._int = {} if params is None else {
            n.name: k for n in graph.nodes if (k := integer_layer(n, params, plan)) is not None}
        # ONNX Runtime layout: same-shape residual Adds as QLinearAdd computes them
        self._qadd = {} if params is None else {
            n.name: p for n in graph.nodes if (p := qlinear_add_params(n, params, plan)) is not None}
        # ONNX Runtime layout: activation x activation Muls (SiLU, gates) as QLinearMul computes them
        self._qmul = {} if params is None else {
            n.name: p for n in graph.nodes if (p := qlinear_mul_params(n, params, plan)) is not None}
        # ONNX Runtime layout: Sigmoids as QLinearSigmoid's lookup table (MLAS's logistic)
        self._qsigmoid = {} if params is None else {
            n.name: p for n in graph.nodes if (p := qlinear_sigmoid_params(n, params, plan)) is not None}
        # TensorRT layout: Conv/Gemm computed as TensorRT's INT8 kernels compute them
        self._acc = {} if params is None else {
            n.name: k for n in graph.nodes if (k := accumulator_layer(n, params, plan)) is not None}
        # ONNX Runtime layout: activation x activation MatMuls (attention) as MatMulIntegerToFloat
        self._act_matmul = {} if params is None or plan is None or plan.kernels is not Kernels.REQUANTIZING else {
            n.name: (params.acts[n.inputs[0]], params.acts[n.inputs[1]]) for n in graph.nodes
            if n.op == "matmul" and all(v in params.acts and plan.sees_quantized(v, n.name) for v in n.inputs[:2])}
        if params is not None:
            for n in graph.nodes:
                if n.name in params.weights:
                    self._w[n.name] = deployed_weights(n, params)  # CWAC folded in
            for name, table in params.tables.items():  # codes x row scale, as Cast + Mul compute it
                self._w[name] = (table.dequant(), None)

    def _quant(self, value: str, x: torch.Tensor) -> torch.Tensor:
        if self.params is None or value not in self.params.acts:
            return x
        return self.params.acts[value](x)

    def _read(self, env: dict, raw: dict, value: str, reader: Optional[str]) -> torch.Tensor:
        """The value as ``reader`` (None: a graph output) sees it: quantized or, where the plan
        puts the quantizer on other edges only (TensorRT layout), float."""
        if value in raw and not self.plan.sees_quantized(value, reader):
            return raw[value]
        return env[value]

    def _keep_float(self, raw: dict, value: str, y: torch.Tensor) -> None:
        if self.plan is not None and self.params is not None and self.plan.has_float_readers(value):
            raw[value] = y

    @torch.no_grad()
    def forward(self, x: torch.Tensor, intermediates: Optional[dict] = None) -> torch.Tensor:
        """``intermediates``, if a dict, receives every IR value as the next reader sees it
        (after its quantizer); qwt-check compares these layer by layer across backends."""
        g = self.graph
        # several graph inputs (token ids, attention mask): pass a tuple, in graph.inputs order
        feeds = dict(zip(g.inputs, x if isinstance(x, (tuple, list)) else (x,)))
        env = {v: self._quant(v, t) for v, t in feeds.items()}
        raw: dict = {}  # float versions of values that some readers read unquantized
        for v, t in feeds.items():
            self._keep_float(raw, v, t)
        if intermediates is not None:
            intermediates.update(env)
        last = g.last_use()
        for i, n in enumerate(g.nodes):
            w, b = self._w.get(n.name, (n.weight, n.bias))
            xs = [self._read(env, raw, v, n.name) for v in n.inputs]
            kernel = self._int.get(n.name)
            if kernel is not None and xs[0].dim() in (2, 4) and n.name not in self.params.branches:
                # requantized by the emulated integer kernel (the Q below then changes nothing)
                y = kernel(lambda a, codes: OPS[n.op].forward(n, [a], codes, None), xs[0])
            elif n.name in self._qadd and xs[0].shape == xs[1].shape:  # QLinearAdd (broadcasts: float Add)
                y = qlinear_add(xs[0], xs[1], *self._qadd[n.name])
            elif n.name in self._qmul:
                y = qlinear_mul(xs[0], xs[1], *self._qmul[n.name])
            elif n.name in self._qsigmoid:
                y = qlinear_sigmoid(xs[0], *self._qsigmoid[n.name])
            else:
                acc = self._acc.get(n.name)
                both = self._act_matmul.get(n.name)
                if acc is not None:
                    y = acc(lambda a, codes: OPS[n.op].forward(n, [a], codes, None), xs[0], channel_dim(n))
                elif both is not None:
                    y = integer_matmul(xs[0], xs[1], *both)
                else:
                    y = OPS[n.op].forward(n, xs, w, b)
                if self.params is not None and n.name in self.params.branches:  # QwT (v1): Y + W·X_q + b
                    y = self.params.branches[n.name].apply(self._read(env, raw, n.inputs[0], n.name), y)
                if n.activation is not None:
                    y = n.activation.apply(y)
            env[n.output] = self._quant(n.output, y)
            self._keep_float(raw, n.output, y)
            if intermediates is not None:
                intermediates[n.output] = env[n.output]
            for v in n.inputs:
                if last.get(v) == i:
                    del env[v]
                    raw.pop(v, None)
        outs = [self._read(env, raw, v, None) for v in g.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def with_float_weights(self, names) -> "SimulatedModel":
        """This model with the weighted nodes ``names`` computed in float on their (dequantized)
        inputs: their INT8 weights, compensation and integer kernels dropped, every quantizer
        and every other node's kernel kept and shared, not re-derived (per-layer sensitivity,
        comparison.sensitivity). Each per-node table of this class is keyed by node name."""
        import copy

        drop = set(names)
        p = self.params
        sim = copy.copy(self)
        sim.params = QuantParams(**{**vars(p), "weights": {k: v for k, v in p.weights.items() if k not in drop},
                                    "cwac": {k: v for k, v in p.cwac.items() if k not in drop}})
        for k, v in vars(self).items():
            if k.startswith("_") and isinstance(v, dict) and drop & set(v):
                object.__setattr__(sim, k, {n: t for n, t in v.items() if n not in drop})
        return sim
