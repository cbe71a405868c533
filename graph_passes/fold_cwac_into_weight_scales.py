"""Fold CWAC's explicit Mul(alpha)/Add(beta) into the layer before it.

Why this is exact: a quantized layer computes, per output channel c,

    y_c = s_w[c] * sum(W_int * x) + b_c            (s_w: per-channel weight DQ scale)

so ``alpha_c * y_c + beta_c`` is the same layer with ``s_w[c] <- alpha_c * s_w[c]`` and
``b_c <- alpha_c * b_c + beta_c``. The INT8 weights do not change and the deployed graph
has no extra node and no custom op: alpha lands in the requantization multiplier that the
backend already applies, beta in the bias it already adds.

alpha < 0 would give a negative scale, which QuantizeLinear/DequantizeLinear specs and
TensorRT reject. Narrow-range weights ([-127, 127]) negate exactly, so we negate that
channel's INT8 weights and use |alpha|.

alpha == 0 (a dead channel) would give a zero scale. The channel's output is then the
constant beta: we zero its weights, keep its old scale, and put beta in the bias.

Bias forms handled: INT32 bias behind a DequantizeLinear whose scale must stay
``s_x * s_w[c]`` (ONNX Runtime's QLinearConv/QGemm contract) -- it is recomputed from the
new weight scale and re-rounded -- and a plain float bias initializer (TensorRT layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qwt_deploy.quantization.fold_arithmetic import fold_affine, int32_bias_codes

from .helpers import const, int8_weight_dq, producer
from .scaffold import apply_all, run_pass

_LAYERS = ("Conv", "Gemm")


@dataclass
class _Match:
    layer: gs.Node
    mul: gs.Node
    add: gs.Node
    weight_dq: gs.Node
    alpha: np.ndarray
    beta: np.ndarray


def _channel_vector(t, channels: int) -> Optional[np.ndarray]:
    """A constant broadcastable per-channel vector [1,C,1,...] or [C] (for Gemm: [1,C])."""
    v = const(t)
    if v is None or v.size != channels:
        return None
    if v.ndim >= 2 and v.shape[1] != channels:
        return None
    return v.reshape(-1).astype(np.float64)


def select_cwac_pair(layer: gs.Node) -> Optional[_Match]:
    """Selector. Preconditions, all required:

    - ``layer`` is Conv/Gemm whose weight input is DequantizeLinear(INT8 constant,
      per-channel scale on axis 0 (output channels), zero point 0);
    - Gemm has transB=1 (weight rows are output channels);
    - its output has exactly one reader, a Mul by a constant per-channel vector, whose
      output has exactly one reader, an Add of a constant per-channel vector;
    - the layer's output is not a graph output.

    QwT (v1) branches (a float 1x1 Conv or MatMul + Add beside the QDQ graph) never match:
    their weights are float initializers, not a DequantizeLinear of INT8 codes.
    """
    if layer.op not in _LAYERS or len(layer.outputs[0].outputs) != 1:
        return None
    if layer.op == "Gemm" and (layer.attrs.get("transB", 0) != 1 or layer.attrs.get("transA", 0) != 0):
        return None
    found = int8_weight_dq(layer)
    if found is None or found.scale.ndim != 1 or found.dq.attrs.get("axis", 1) != 0:
        return None
    dq, codes, scale = found
    channels = scale.size
    mul = layer.outputs[0].outputs[0]
    if mul.op != "Mul" or len(mul.outputs[0].outputs) != 1:
        return None
    alpha = _channel_vector(mul.inputs[1], channels)
    add = mul.outputs[0].outputs[0]
    if alpha is None or add.op != "Add":
        return None
    beta = _channel_vector(add.inputs[1], channels)
    if beta is None:
        return None
    return _Match(layer, mul, add, dq, alpha, beta)


def fold_match(graph: gs.Graph, m: _Match) -> None:
    """Action: rewrite weight codes/scale and bias, then bypass the Mul/Add."""
    dq = m.weight_dq
    codes = dq.inputs[0].values
    axis = dq.attrs.get("axis", 1) % codes.ndim  # DequantizeLinear's default axis is 1
    folded = fold_affine(codes, dq.inputs[1].values, _dequantized_bias(m.layer), m.alpha, m.beta, axis)
    new_codes, new_scale, bias = folded.codes, folded.scale, folded.bias

    base = dq.inputs[0].name.removesuffix("_quantized")  # e.g. "stem.weight"
    dq.inputs[0] = gs.Constant(f"{base}_quantized_folded", new_codes)
    dq.inputs[1] = gs.Constant(f"{base}_scale_folded", new_scale)
    _set_bias(graph, m.layer, bias, new_scale, base.removesuffix(".weight"))

    # bypass Mul and Add: the layer now produces what Add produced
    out = m.add.outputs[0]
    m.layer.outputs[0] = out
    m.mul.outputs.clear()
    m.add.outputs.clear()
    m.mul.inputs.clear()
    m.add.inputs.clear()


def _bias_dq(layer: gs.Node) -> Optional[gs.Node]:
    if len(layer.inputs) < 3:
        return None
    return producer(layer.inputs[2], "DequantizeLinear")


def _input_scale(layer: gs.Node) -> Optional[float]:
    x_dq = producer(layer.inputs[0], "DequantizeLinear")
    if x_dq is not None:
        s = const(x_dq.inputs[1])
        if s is not None and s.size == 1:
            return float(s.reshape(()))
    return None


def _dequantized_bias(layer: gs.Node) -> Optional[np.ndarray]:
    if len(layer.inputs) < 3:
        return None
    dq = _bias_dq(layer)
    if dq is not None:
        return dq.inputs[0].values.astype(np.float64) * dq.inputs[1].values.astype(np.float32).astype(np.float64)
    v = const(layer.inputs[2])
    return None if v is None else v.astype(np.float64)


def _set_bias(graph: gs.Graph, layer: gs.Node, bias: np.ndarray, weight_scale: np.ndarray, name: str) -> None:
    int32_bias = _bias_dq(layer) is not None or (len(layer.inputs) < 3 and _input_scale(layer) is not None
                                                 and _layer_uses_int32_bias(graph))
    if int32_bias:
        try:
            q, s_b = int32_bias_codes(bias, _input_scale(layer), weight_scale)
        except ValueError:
            raise ValueError(f"{name}: folded bias overflows INT32; lower the CWAC ridge or keep the Mul/Add") from None
        codes = gs.Constant(f"{name}.bias_quantized_folded", q.astype(np.int32))
        scale = gs.Constant(f"{name}.bias_scale_folded", s_b)
        zp = gs.Constant(f"{name}.bias_zero_point_folded", np.zeros(s_b.shape, np.int32))
        out = gs.Variable(f"{name}.bias_folded_dq", dtype=np.float32, shape=list(s_b.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}.bias_folded/DequantizeLinear",
                                   attrs={"axis": 0}, inputs=[codes, scale, zp], outputs=[out]))
        new_bias = out
    else:
        new_bias = gs.Constant(f"{name}.bias_folded", bias.astype(np.float32))
    if len(layer.inputs) >= 3:
        layer.inputs[2] = new_bias
    else:
        layer.inputs.append(new_bias)


def _layer_uses_int32_bias(graph: gs.Graph) -> bool:
    """A bias-less layer gets an INT32 bias if the graph already uses INT32 biases (ORT layout)."""
    for n in graph.nodes:
        if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant) and n.inputs[0].values.dtype == np.int32:
            return True
    return False


@dataclass
class _MatMulMatch:
    layer: gs.Node  # MatMul(x, DQ(W [in, out]))
    bias_add: Optional[gs.Node]  # Add(layer, bias [C]) or None
    mul: gs.Node
    add: gs.Node
    weight_dq: gs.Node
    alpha: np.ndarray
    beta: np.ndarray


def _sole_reader(node: gs.Node, op: str) -> Optional[gs.Node]:
    readers = node.outputs[0].outputs
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def select_matmul_cwac(layer: gs.Node) -> Optional[_MatMulMatch]:
    """Selector for a linear on token activations (batch, tokens, dim), which is exported as
    MatMul with a pre-transposed weight. Preconditions, all required:

    - ``layer`` is MatMul whose second input is DequantizeLinear(INT8 constant [in, out],
      per-channel scale [out] on axis 1 (the output channels), zero point 0);
    - its output has exactly one reader: optionally an Add of a constant bias [C] (itself
      read once), then a Mul by a constant per-channel vector read once by an Add of a
      constant per-channel vector;
    - the layer's output is not a graph output (it has a reader).
    """
    if layer.op != "MatMul" or len(layer.inputs) != 2:
        return None
    found = int8_weight_dq(layer)
    if found is None:
        return None
    dq, codes, scale = found
    if codes.ndim != 2 or scale.ndim != 1 or dq.attrs.get("axis", 1) % 2 != 1 or scale.size != codes.shape[1]:
        return None
    channels = scale.size
    bias_add = _sole_reader(layer, "Add")
    if bias_add is not None and (bias_add.inputs[0] is not layer.outputs[0]
                                 or _channel_vector(bias_add.inputs[1], channels) is None):
        bias_add = None
    first = bias_add or layer
    mul = _sole_reader(first, "Mul")
    if mul is None or len(mul.outputs[0].outputs) != 1:
        return None
    alpha = _channel_vector(mul.inputs[1], channels)
    add = _sole_reader(mul, "Add")
    if alpha is None or add is None:
        return None
    beta = _channel_vector(add.inputs[1], channels)
    if beta is None:
        return None
    return _MatMulMatch(layer, bias_add, mul, add, dq, alpha, beta)


def fold_matmul_match(graph: gs.Graph, m: _MatMulMatch) -> None:
    """Action: new codes/scale on axis 1 (alpha < 0 negates the INT8 column), the float bias
    becomes alpha*b + beta in one Add, and the CWAC Mul/Add are bypassed."""
    dq = m.weight_dq
    bias = m.bias_add.inputs[1].values.reshape(-1).astype(np.float64) if m.bias_add is not None else None
    f = fold_affine(dq.inputs[0].values, dq.inputs[1].values, bias, m.alpha, m.beta, axis=1)
    base = dq.inputs[0].name.removesuffix("_quantized")
    dq.inputs[0] = gs.Constant(f"{base}_quantized_folded", f.codes)
    dq.inputs[1] = gs.Constant(f"{base}_scale_folded", f.scale)
    new_bias = gs.Constant(f"{base.removesuffix('.weight')}.bias_folded", f.bias.astype(np.float32))
    out = m.add.outputs[0]
    if m.bias_add is not None:
        m.bias_add.inputs[1] = new_bias
        m.bias_add.outputs[0] = out
        m.add.outputs.clear()
        m.add.inputs.clear()
    else:  # the CWAC Add becomes the bias Add
        m.add.inputs[0] = m.layer.outputs[0]
        m.add.inputs[1] = new_bias
    m.mul.outputs.clear()
    m.mul.inputs.clear()


# Pass fold_cwac_into_weight_scales, two selector/action rounds in this order (the MatMul round
# selects on the graph the Conv/Gemm round left):
#   1. selector select_cwac_pair: Conv/Gemm(DQ(INT8 W, per-channel axis 0, zp 0)) read only by
#      Mul(const per-channel alpha) read only by Add(const per-channel beta);
#      action fold_match: W codes/scale and bias absorb alpha/beta, the Mul/Add are bypassed.
#   2. selector select_matmul_cwac: MatMul(x, DQ(INT8 W [in, out], axis 1, zp 0)) -> optional
#      bias Add -> Mul(alpha) -> Add(beta), each read once;
#      action fold_matmul_match: the same fold on axis 1, one bias Add remains.
# Preconditions: alpha/beta are constants broadcast per output channel; an INT32 bias (ORT
# layout) needs a per-tensor input DQ scale and must not overflow INT32 (ValueError otherwise).
def fold_cwac_into_weight_scales(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every CWAC Mul/Add pair; returns the new model and how many layers were folded."""
    def fold_all(graph: gs.Graph) -> int:
        return (len(apply_all(graph, select_cwac_pair, fold_match))
                + len(apply_all(graph, select_matmul_cwac, fold_matmul_match)))

    return run_pass(model, fold_all)
