"""Emit the IR as an ONNX graph: plain FP32, or QDQ INT8 with explicit CWAC nodes.

Per quantized layer the QDQ form is::

    x_dq -> Conv(DQ(W int8, per-channel), DQ(b int32, scale s_x*s_w)) -> Mul(alpha) -> Add(beta)
         -> Relu/Clip -> [Clip to a-bit range] -> QuantizeLinear(uint8) -> DequantizeLinear

Weights are stored as INT8 initializers (4x smaller than float), never as float + Q.
The Mul/Add pair is CWAC before folding; ``graph_passes.fold_cwac_into_weight_scales``
removes it. Node and tensor names derive from the model's module paths, so the same
inputs give byte-identical files.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from ..graph.ir import Graph
from ..graph.ops import OPS, Role
from ..quantize.placement import QuantPlan
from ..quantize.simulate import QuantParams
from .onnx_builder import OnnxBuilder


def _made_redundant_by_q(act, q) -> bool:
    """True when QuantizeLinear's saturation already performs this ReLU/Clip exactly.

    Q saturates to [qmin, qmax]; if the clip bounds map outside that range (same rint test
    as ONNX Runtime's IsClipMadeRedundantByQ), Q(clip(x)) == Q(x) for every x. Dropping
    the node keeps the graph a plain DQ -> Conv -> Q unit, which ORT fuses into
    QLinearConv; with the Clip left in, ORT fuses Conv+Clip into a float FusedConv first.
    """
    if q is None:
        return False
    lo_ok = act.lo is None or round(act.lo / q.scale) + q.zero_point <= q.qmin
    hi_ok = act.hi is None or round(act.hi / q.scale) + q.zero_point >= q.qmax
    return lo_ok and hi_ok


def export_onnx(
    graph: Graph,
    plan: Optional[QuantPlan] = None,
    params: Optional[QuantParams] = None,
    metadata: Optional[dict[str, str]] = None,
) -> onnx.ModelProto:
    """FP32 graph when ``params`` is None, else the unfolded QDQ graph."""
    g = OnnxBuilder()
    quantized = params is not None
    names: dict[str, str] = {}  # IR value -> ONNX tensor name as readers see it

    def publish(value: str, tensor: str, produced_by_quantizer_root: bool) -> None:
        if quantized and value in params.acts:
            q = params.acts[value]
            if q.bits < 8 and produced_by_quantizer_root:
                tensor = g.clip(tensor, q.lo, q.hi, f"{value}/abits")
            tensor = g.quantize_dequantize(tensor, q.scale, q.zero_point, f"{value}/quant")
        names[value] = tensor

    x = graph.inputs[0]
    publish(x, "input", True)
    for n in graph.nodes:
        spec = OPS[n.op]
        ins = [names[v] for v in n.inputs]
        w_name = b_name = None
        if spec.role is Role.WEIGHTED:
            if quantized:
                wq = params.weights[n.name]
                w_name = g.dequantize(f"{n.name}.weight", wq.q.numpy().astype(np.int8), wq.scale.numpy())
                b = params.bias_int32(n)
                if b is not None:
                    s_b = (np.float32(params.acts[n.inputs[0]].scale) * wq.scale.numpy().astype(np.float32))
                    b_name = g.dequantize(f"{n.name}.bias", b.numpy().astype(np.int32), s_b)
            else:
                w_name = g.const(f"{n.name}.weight", n.weight.numpy().astype(np.float32))
                if n.bias is not None:
                    b_name = g.const(f"{n.name}.bias", n.bias.numpy().astype(np.float32))
        y = spec.emit(g, n, ins, w_name, b_name)
        if quantized and n.name in params.cwac:
            fit = params.cwac[n.name]
            shape = (1, -1, 1, 1) if n.op == "conv" else (1, -1)
            a = g.const(f"{n.name}.cwac_alpha", fit.alpha.reshape(shape).astype(np.float32))
            bt = g.const(f"{n.name}.cwac_beta", fit.beta.reshape(shape).astype(np.float32))
            y = g.op("Add", [g.op("Mul", [y, a], f"{n.name}/cwac"), bt], f"{n.name}/cwac")
        if n.activation is not None and not (quantized and _made_redundant_by_q(n.activation, params.acts.get(n.output))):
            y = g.clip(y, n.activation.lo, n.activation.hi, n.name)
        inherits = quantized and params is not None and plan is not None and plan.activations.get(n.output) is not None
        publish(n.output, y, not inherits)

    # graph outputs keep readable names
    outs = {}
    for i, v in enumerate(graph.outputs):
        name = "output" if len(graph.outputs) == 1 else f"output_{i}"
        g.rename(names[v], name)
        outs[name] = ["batch"] + [int(d) for d in graph.output_shapes[v][1:]]
    shape = ["batch"] + [int(d) for d in graph.input_shapes[x][1:]]
    return g.model("input", shape, outs, "qwt_int8" if quantized else "fp32", metadata or {})
