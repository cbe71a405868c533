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

_LAYERS = ("Conv", "Gemm")


@dataclass
class _Match:
    layer: gs.Node
    mul: gs.Node
    add: gs.Node
    weight_dq: gs.Node
    alpha: np.ndarray
    beta: np.ndarray


def _const(t) -> Optional[np.ndarray]:
    return t.values if isinstance(t, gs.Constant) else None


def _channel_vector(t, channels: int) -> Optional[np.ndarray]:
    """A constant broadcastable per-channel vector [1,C,1,...] or [C] (for Gemm: [1,C])."""
    v = _const(t)
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
    """
    if layer.op not in _LAYERS or len(layer.outputs[0].outputs) != 1:
        return None
    if layer.op == "Gemm" and (layer.attrs.get("transB", 0) != 1 or layer.attrs.get("transA", 0) != 0):
        return None
    w_in = layer.inputs[1]
    if len(w_in.inputs) != 1 or w_in.inputs[0].op != "DequantizeLinear":
        return None
    dq = w_in.inputs[0]
    codes, scale = _const(dq.inputs[0]), _const(dq.inputs[1])
    if codes is None or scale is None or codes.dtype != np.int8 or scale.ndim != 1 or dq.attrs.get("axis", 1) != 0:
        return None
    if len(dq.inputs) > 2 and _const(dq.inputs[2]) is not None and np.any(_const(dq.inputs[2]) != 0):
        return None
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
    codes = dq.inputs[0].values.astype(np.int16)
    scale = dq.inputs[1].values.astype(np.float64)
    alpha, beta = m.alpha, m.beta
    shape = (-1,) + (1,) * (codes.ndim - 1)

    sign = np.where(alpha < 0, -1, 1)
    dead = np.abs(alpha) < 1e-12
    new_codes = (codes * sign.reshape(shape)).astype(np.int8)
    new_codes[dead] = 0
    new_scale = np.where(dead, scale, np.abs(alpha) * scale).astype(np.float32)
    alpha_eff = np.where(dead, 0.0, alpha)

    old_bias = _dequantized_bias(m.layer)  # float64 [C] or None
    bias = beta + (alpha_eff * old_bias if old_bias is not None else 0.0)

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
    b = layer.inputs[2]
    if len(b.inputs) == 1 and b.inputs[0].op == "DequantizeLinear":
        return b.inputs[0]
    return None


def _input_scale(layer: gs.Node) -> Optional[float]:
    x = layer.inputs[0]
    if len(x.inputs) == 1 and x.inputs[0].op == "DequantizeLinear":
        s = _const(x.inputs[0].inputs[1])
        if s is not None and s.size == 1:
            return float(s.reshape(()))
    return None


def _dequantized_bias(layer: gs.Node) -> Optional[np.ndarray]:
    if len(layer.inputs) < 3:
        return None
    dq = _bias_dq(layer)
    if dq is not None:
        return dq.inputs[0].values.astype(np.float64) * dq.inputs[1].values.astype(np.float32).astype(np.float64)
    v = _const(layer.inputs[2])
    return None if v is None else v.astype(np.float64)


def _set_bias(graph: gs.Graph, layer: gs.Node, bias: np.ndarray, weight_scale: np.ndarray, name: str) -> None:
    int32_bias = _bias_dq(layer) is not None or (len(layer.inputs) < 3 and _input_scale(layer) is not None
                                                 and _layer_uses_int32_bias(graph))
    if int32_bias:
        s_x = _input_scale(layer)
        s_b = (np.float32(s_x) * weight_scale.astype(np.float32)).astype(np.float32)
        q = np.round(bias / s_b.astype(np.float64))
        if np.any(np.abs(q) > 2**31 - 1):
            raise ValueError(f"{name}: folded bias overflows INT32; lower the CWAC ridge or keep the Mul/Add")
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


def fold_cwac_into_weight_scales(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every CWAC Mul/Add pair; returns the new model and how many layers were folded."""
    graph = gs.import_onnx(model)
    matches = [m for m in (select_cwac_pair(n) for n in list(graph.nodes)) if m is not None]
    for m in matches:
        fold_match(graph, m)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out, len(matches)
