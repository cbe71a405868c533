"""Rewrite each quantized Conv/Gemm/MatMul of a TensorRT-layout graph into the arithmetic TensorRT's
INT8 kernel performs, so ONNX Runtime can check the graph against the simulation exactly.

For checking only: the shipped graph is never rewritten. ``DQ(x) -> Conv(DQ(W), b)`` becomes

    Cast(Q(x) codes -> float) -> Conv(float INT8 codes of W) -> Mul(float32(s_x) * s_w[c]) -> Add(b)

(a token linear, ``MatMul(DQ(x), DQ(W [in, out], axis 1))`` followed by its own bias Add, gets
the same Cast -> MatMul -> Mul, and keeps its Add)

which equals the original in exact arithmetic. Its float32 convolution of integer-valued
tensors is exact in any accumulation order (partial sums below 2**24), so ONNX Runtime and
the PyTorch simulation (``qwt_deploy.quantization.trt_kernels``) compute bit-identical layer
outputs, as TensorRT's INT32 accumulation would; a float convolution of dequantized values
instead differs between implementations by rounding flips that compound through deep
networks. Run the result with graph optimizations off (ORT's Conv+Mul/Add fusion would fold
the scale back into the weights) and QDQ fusion off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .helpers import const, int8_weight_dq, producer, zero_point_is_zero
from .scaffold import apply_all, run_pass


@dataclass
class _Match:
    layer: gs.Node
    codes_in: gs.Tensor  # the activation's INT8 codes (output of its QuantizeLinear)
    x_scale: np.float32
    w_codes: np.ndarray
    w_scale: np.ndarray
    bias: Optional[np.ndarray]


def select_quantized_layer(layer: gs.Node) -> Optional[_Match]:
    """Selector. Preconditions: Conv, or Gemm with transB=1 and alpha=beta=1, or MatMul; input 0
    is DequantizeLinear(QuantizeLinear output, scalar scale, zero point 0); input 1 is
    DequantizeLinear(constant INT8 codes, per-channel scale on axis 0 -- axis 1 of a 2-D
    [in, out] MatMul weight --, zero point 0); the bias, if any, is a constant float vector."""
    if layer.op not in ("Conv", "Gemm", "MatMul") or len(layer.inputs) < 2:
        return None
    if layer.op == "Gemm" and (layer.attrs.get("transB", 0) != 1 or layer.attrs.get("transA", 0) != 0
                               or layer.attrs.get("alpha", 1.0) != 1.0 or layer.attrs.get("beta", 1.0) != 1.0):
        return None
    xdq, found = producer(layer.inputs[0], "DequantizeLinear"), int8_weight_dq(layer)
    if xdq is None or found is None:
        return None
    wdq, codes, ws = found
    xs = const(xdq.inputs[1])
    if xs is None or xs.size != 1 or not zero_point_is_zero(xdq):
        return None
    out_axis = 1 if layer.op == "MatMul" else 0
    if layer.op == "MatMul" and codes.ndim != 2:
        return None
    if ws.ndim != 1 or wdq.attrs.get("axis", 1) != out_axis or ws.size != codes.shape[out_axis]:
        return None
    bias = None
    if len(layer.inputs) > 2:
        bias = const(layer.inputs[2])
        if bias is None or bias.dtype != np.float32:
            return None
    return _Match(layer, xdq.inputs[0], np.float32(xs.reshape(())), codes, ws.astype(np.float32), bias)


def rewrite_match(graph: gs.Graph, m: _Match) -> None:
    """Action: Cast codes -> integer-valued Conv/Gemm -> Mul(accumulator scale) -> Add(bias)."""
    name = m.layer.name or m.layer.outputs[0].name
    rank = m.w_codes.ndim if m.layer.op == "Conv" else 1
    shape = (1, -1) + (1,) * (rank - 2) if m.layer.op == "Conv" else (-1,)
    xf = gs.Variable(f"{name}/acc_x", dtype=np.float32)
    graph.nodes.append(gs.Node("Cast", f"{name}/acc_cast", {"to": onnx.TensorProto.FLOAT}, [m.codes_in], [xf]))
    acc = gs.Variable(f"{name}/acc", dtype=np.float32)
    attrs = dict(m.layer.attrs)
    graph.nodes.append(gs.Node(m.layer.op, f"{name}/acc_layer", attrs,
                               [xf, gs.Constant(f"{name}/acc_w", m.w_codes.astype(np.float32))], [acc]))
    scale = (m.x_scale * m.w_scale).astype(np.float32).reshape(shape)
    out = m.layer.outputs[0]
    scaled = gs.Variable(f"{name}/acc_scaled", dtype=np.float32) if m.bias is not None else out
    m.layer.outputs.clear()
    graph.nodes.append(gs.Node("Mul", f"{name}/acc_scale", {}, [acc, gs.Constant(f"{name}/acc_s", scale)], [scaled]))
    if m.bias is not None:
        b = gs.Constant(f"{name}/acc_b", m.bias.astype(np.float32).reshape(shape))
        graph.nodes.append(gs.Node("Add", f"{name}/acc_bias", {}, [scaled, b], [out]))
    m.layer.inputs.clear()


def _type_named_outputs(graph: gs.Graph) -> None:
    """Outputs marked by name only (Polygraphy ModifyOutputs) carry no dtype, which
    gs.export_onnx requires: a QuantizeLinear output is INT8, anything else float32."""
    for t in graph.outputs:
        if t.dtype is None:
            t.dtype = np.float32 if t.inputs and t.inputs[0].op != "QuantizeLinear" else np.int8


# Pass rewrite_layers_as_integer_accumulators (check copies only, TensorRT layout):
#   selector select_quantized_layer: Conv / Gemm(transB=1, alpha=beta=1) / MatMul reading
#     DQ(Q output, scalar scale, zp 0) and DQ(INT8 W, per-channel scale on the output axis, zp 0),
#     with a constant float32 bias or none;
#   action rewrite_match: Cast(codes -> float) -> same op on float INT8 codes -> Mul(s_x * s_w)
#     -> Add(bias), into the layer's original output tensor.
# Preconditions: run the result with graph optimizations and QDQ fusion off.
def rewrite_layers_as_integer_accumulators(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The rewritten copy of ``model`` and how many layers were rewritten."""
    def rewrite_all(graph: gs.Graph) -> int:
        n = len(apply_all(graph, select_quantized_layer, rewrite_match))
        _type_named_outputs(graph)
        return n

    return run_pass(model, rewrite_all)
