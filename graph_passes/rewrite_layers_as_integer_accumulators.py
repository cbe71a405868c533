"""Rewrite each quantized Conv/Gemm/MatMul of a TensorRT-layout graph into the arithmetic TensorRT's
INT8 kernel performs, so ONNX Runtime can check the graph against the simulation exactly.

For checking only: the shipped graph is never rewritten. ``DQ(x) -> Conv(DQ(W), b)`` becomes

    Cast(Q(x) codes -> float) -> Conv(float INT8 codes of W) -> Mul(float32(s_x) * s_w[c]) -> Add(b)

(a token linear, ``MatMul(DQ(x), DQ(W [in, out], axis 1))`` followed by its own bias Add, gets
the same Cast -> MatMul -> Mul, and keeps its Add)

which equals the original in exact arithmetic. Its float32 convolution of integer-valued
tensors is exact in any accumulation order (partial sums below 2**24), so ONNX Runtime and
the PyTorch simulation (``qwt_deploy.quantize.trt_kernels``) compute bit-identical layer
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


@dataclass
class _Match:
    layer: gs.Node
    codes_in: gs.Tensor  # the activation's INT8 codes (output of its QuantizeLinear)
    x_scale: np.float32
    w_codes: np.ndarray
    w_scale: np.ndarray
    bias: Optional[np.ndarray]


def _const(t) -> Optional[np.ndarray]:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _zero(dq: gs.Node) -> bool:
    return len(dq.inputs) < 3 or (_const(dq.inputs[2]) is not None and not np.any(_const(dq.inputs[2])))


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
    x, w = layer.inputs[0], layer.inputs[1]
    if len(x.inputs) != 1 or x.inputs[0].op != "DequantizeLinear" or len(w.inputs) != 1 or w.inputs[0].op != "DequantizeLinear":
        return None
    xdq, wdq = x.inputs[0], w.inputs[0]
    xs, codes, ws = _const(xdq.inputs[1]), _const(wdq.inputs[0]), _const(wdq.inputs[1])
    if xs is None or xs.size != 1 or not _zero(xdq) or codes is None or codes.dtype != np.int8 or ws is None:
        return None
    out_axis = 1 if layer.op == "MatMul" else 0
    if layer.op == "MatMul" and codes.ndim != 2:
        return None
    if not _zero(wdq) or ws.ndim != 1 or wdq.attrs.get("axis", 1) != out_axis or ws.size != codes.shape[out_axis]:
        return None
    bias = None
    if len(layer.inputs) > 2:
        bias = _const(layer.inputs[2])
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


def rewrite_layers_as_integer_accumulators(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The rewritten copy of ``model`` and how many layers were rewritten."""
    graph = gs.import_onnx(model)
    matches = [m for m in (select_quantized_layer(n) for n in list(graph.nodes)) if m is not None]
    for m in matches:
        rewrite_match(graph, m)
    graph.cleanup().toposort()
    for t in graph.outputs:  # outputs marked by name only (Polygraphy ModifyOutputs) carry no dtype
        if t.dtype is None:
            t.dtype = np.float32 if t.inputs and t.inputs[0].op != "QuantizeLinear" else np.int8
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out, len(matches)
