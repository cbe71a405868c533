"""Emit the IR as an ONNX graph: plain FP32, or QDQ INT8 with explicit CWAC nodes.

Per quantized layer the QDQ form is::

    x_dq -> Conv(DQ(W int8, per-channel), DQ(b int32, scale s_x*s_w)) -> Mul(alpha) -> Add(beta)
         -> Relu/Clip -> [Clip to a-bit range] -> QuantizeLinear(uint8) -> DequantizeLinear

Weights are stored as INT8 initializers (4x smaller than float), never as float + Q.
The Mul/Add pair is CWAC before folding; ``qwt_deploy.graph_passes.fold_cwac_into_weight_scales``
removes it. Node and tensor names derive from the model's module paths, so the same
inputs give byte-identical files.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from ..graph.ir import Graph
from ..graph.ops import OPS, Role, linear_as_matmul
from ..quantization.integer_kernels import made_redundant_by_q
from ..quantization.placement import Kernels, QuantPlan
from ..quantization.simulate import QuantParams
from .onnx_builder import OnnxBuilder




def _emit_int8_table_lookup(g: OnnxBuilder, name: str, table, ids: str) -> str:
    """An INT8 embedding table: ``Cast(Gather(codes, ids)) * Gather(row_scales, ids)``.

    Why not DequantizeLinear -> Gather: ONNX Runtime keeps DQ nodes out of constant folding, so
    it would dequantize the whole table (MiniLM: 11.7 M values) on every run. Gathering the
    rows first touches only the tokens in the batch; all standard ops, no custom domain. The
    product is the float32 ``code * scale`` that the simulation's ``WeightQuant.dequant`` computes."""
    from onnx import TensorProto

    codes = g.const(f"{name}.weight_int8", table.q.numpy().astype(np.int8))
    scales = g.const(f"{name}.weight_scale", table.scale.numpy().astype(np.float32).reshape(-1, 1))
    rows = g.op("Cast", [g.op("Gather", [codes, ids], f"{name}/codes", axis=0)], f"{name}/codes", to=TensorProto.FLOAT)
    return g.op("Mul", [rows, g.op("Gather", [scales, ids], f"{name}/scales", axis=0)], name)


def _emit_float_as_int32_dq(g: OnnxBuilder, name: str, x: np.ndarray) -> str:
    """A float constant as DequantizeLinear(int32 codes, power-of-two scale): the same values
    (exact where |x| >= 2**-6 of its max, otherwise within 2**-30 of that max).

    Why (the bias of a Conv/Gemm kept float by --keep-float or --auto-fallback on the ort layout):
    such a layer reads a DequantizeLinear output, and ONNX Runtime's WeightBiasQuantization
    transformer (>= 1.21, level 1) then quantizes its float initializer weight per tensor to INT8
    and fuses a QLinearConv/QGemm: the file no longer computes what was measured (Lite0: 2 of 5
    fallback layers re-quantized). The transformer skips a node whose bias exists but is not an
    initializer, so the bias (zeros if the layer has none) is written as this DequantizeLinear;
    constant folding keeps DQ nodes, and the weight stays a float initializer, which no QDQ
    selector fuses. (INT32 weight codes instead do not work: ORT's QGemm selector fuses them and
    then rejects the graph.) The cost is one dequantization of the bias per run."""
    x = np.asarray(x, np.float32)
    m = np.abs(x).max(initial=0.0)
    scale = np.float32(2.0 ** (np.floor(np.log2(m)) - 29) if m > 0 else 1.0)
    return g.dequantize(name, np.rint(x / scale).astype(np.int32), np.asarray(scale, np.float32))


def _emit_qwt_branch(g: OnnxBuilder, name: str, fit, x: str, y: str) -> str:
    """QwT (v1) branch beside the QDQ graph, in standard ops: ``Y + Conv1x1(X)`` for CNN blocks
    (stride, groups, bias in the Conv), ``Y + (MatMul(X, W^T) + b)`` for token blocks. It reads
    the block input as the plan lets it (the DQ output for ort; the float value for trt, whose
    Q/DQ sit only on the block's own input edges), so the backend runs what
    ``BranchFit.apply`` computes.

    ``fit.precision`` (set by calibration from the target's ``Target.branch_precision``):

    - ``fp32`` (``--target ort``): FP32 weights and ops. ONNX Runtime's x86 CPU provider has
      no FP16 Conv/MatMul kernels: it would insert Casts and compute in FP32 anyway.
    - ``fp16`` (``--target trt``): ``Cast(X -> float16) -> Conv/MatMul(FP16 weight) [-> Add(FP16
      bias)] -> Cast(-> float32) -> Add(Y)``. TensorRT 11 is strongly typed: each layer runs in
      the type of its ONNX tensors, so the explicit Casts are what put the branch on FP16
      tensor cores (FP32 accumulation) at half the weight bytes, while the block output Y and
      the sum stay FP32 for the next layer's INT8 Q. Casts need only opset 6 (the export is
      opset 17), and no Q/DQ touches an FP16 tensor, so no FP16 scale (opset 19) is needed.
    """
    half = getattr(fit, "precision", "fp32") == "fp16"
    ftype = np.float16 if half else np.float32
    w = fit.weight.numpy().astype(ftype)
    b = g.const(f"{name}.bias", fit.bias.numpy().astype(ftype))
    if half:
        x = g.op("Cast", [x], name + "/to_fp16", to=onnx.TensorProto.FLOAT16)
    if fit.kind == "conv":
        t = g.op("Conv", [x, g.const(f"{name}.weight", w), b], name, kernel_shape=[1, 1],
                 strides=[fit.stride, fit.stride], pads=[0, 0, 0, 0], group=fit.groups)
    else:
        t = g.op("Add", [g.op("MatMul", [x, g.const(f"{name}.weight", np.ascontiguousarray(w.T))], name), b], name)
    if half:
        t = g.op("Cast", [t], name + "/to_fp32", to=onnx.TensorProto.FLOAT)
    return g.op("Add", [y, t], name + "/sum")


def export_onnx(
    graph: Graph,
    plan: Optional[QuantPlan] = None,
    params: Optional[QuantParams] = None,
    metadata: Optional[dict[str, str]] = None,
    tensor_names: Optional[dict[str, str]] = None,
) -> onnx.ModelProto:
    """FP32 graph when ``params`` is None, else the unfolded QDQ graph.

    ``tensor_names``, if given, is filled with IR value -> ONNX tensor name: the tensor that
    holds the value as its readers see it (the DequantizeLinear output for a quantized value),
    i.e. the value ``SimulatedModel(..., intermediates=...)`` records. qwt-check marks these
    tensors as outputs to compare backends layer by layer.
    """
    g = OnnxBuilder()
    quantized = params is not None
    names: dict[str, str] = {}  # IR value -> ONNX tensor name as readers see it
    raw: dict[str, str] = {}  # float tensor of a value that some readers read unquantized (trt edges)

    def reader_sees(value: str, reader: Optional[str]) -> str:
        return raw[value] if value in raw and not plan.sees_quantized(value, reader) else names[value]

    def publish(value: str, tensor: str, produced_by_quantizer_root: bool) -> None:
        if quantized and value in params.acts:
            q = params.acts[value]
            if plan is not None and plan.has_float_readers(value):
                raw[value] = tensor
            if q.bits < 8 and produced_by_quantizer_root:
                tensor = g.clip(tensor, q.lo, q.hi, f"{value}/abits")
            tensor = g.quantize_dequantize(tensor, q.scale, q.zero_point, f"{value}/quant",
                                           dtype=np.int8 if q.signed else np.uint8)
        names[value] = tensor

    x = graph.inputs[0]
    # one input keeps the name "input"; several (input_ids, attention_mask) keep their own
    input_names = {v: ("input" if len(graph.inputs) == 1 and not graph.keep_io_names else v) for v in graph.inputs}
    for v in graph.inputs:
        publish(v, input_names[v], True)
    for n in graph.nodes:
        spec = OPS[n.op]
        ins = [reader_sees(v, n.name) for v in n.inputs]
        w_name = b_name = None
        int8 = quantized and n.name in params.weights  # a weighted layer kept float (--keep-float) has none
        if spec.role is Role.WEIGHTED:
            if linear_as_matmul(n):  # [in, out] weight, per-channel axis 1, float bias Add
                w = params.weights[n.name] if int8 else None
                w_name = (g.dequantize(f"{n.name}.weight", np.ascontiguousarray(w.q.numpy().astype(np.int8).T),
                                       w.scale.numpy(), axis=1) if int8
                          else g.const(f"{n.name}.weight", np.ascontiguousarray(n.weight.numpy().astype(np.float32).T)))
                if n.bias is not None:
                    b_name = g.const(f"{n.name}.bias", n.bias.numpy().astype(np.float32))
            elif int8:
                wq = params.weights[n.name]
                w_name = g.dequantize(f"{n.name}.weight", wq.q.numpy().astype(np.int8), wq.scale.numpy())
                b = params.bias_int32(n) if params.int32_bias else None
                if n.bias is not None and not params.int32_bias:  # TensorRT: float bias, no INT32 DQ
                    b_name = g.const(f"{n.name}.bias", n.bias.numpy().astype(np.float32))
                if b is not None:
                    s_b = (np.float32(params.acts[n.inputs[0]].scale) * wq.scale.numpy().astype(np.float32))
                    b_name = g.dequantize(f"{n.name}.bias", b.numpy().astype(np.int32), s_b)
            elif (quantized and plan is not None and plan.kernels is Kernels.REQUANTIZING
                  and plan.sees_quantized(n.inputs[0], n.name)):  # kept float, behind a DQ: see why there
                w_name = g.const(f"{n.name}.weight", n.weight.numpy().astype(np.float32))
                bias = n.bias.numpy() if n.bias is not None else np.zeros(n.weight.shape[0], np.float32)
                b_name = _emit_float_as_int32_dq(g, f"{n.name}.bias", bias)
            else:
                w_name = g.const(f"{n.name}.weight", n.weight.numpy().astype(np.float32))
                if n.bias is not None:
                    b_name = g.const(f"{n.name}.bias", n.bias.numpy().astype(np.float32))
        if quantized and n.name in getattr(params, "tables", {}):
            y = _emit_int8_table_lookup(g, n.name, params.tables[n.name], ins[0])
        else:
            y = spec.emit(g, n, ins, w_name, b_name)
        if quantized and n.name in getattr(params, "branches", {}):  # QwT (v1) block branch
            fit = params.branches[n.name]
            if fit.kept:
                y = _emit_qwt_branch(g, n.name, fit, ins[0], y)
            elif params.acts.get(n.output) is not None and params.acts.get(n.output) is params.acts.get(n.inputs[1]) \
                    and (plan is None or plan.sees_quantized(n.inputs[1], n.name)):
                names[n.output] = y  # R^2 <= 0: no branch, and Y' is Y already quantized
                continue
        if quantized and n.name in params.cwac:
            fit = params.cwac[n.name]
            shape = (1, -1, 1, 1) if n.op == "conv" else (1, -1)
            a = g.const(f"{n.name}.cwac_alpha", fit.alpha.reshape(shape).astype(np.float32))
            bt = g.const(f"{n.name}.cwac_beta", fit.beta.reshape(shape).astype(np.float32))
            y = g.op("Add", [g.op("Mul", [y, a], f"{n.name}/cwac"), bt], f"{n.name}/cwac")
        redundant = (quantized and n.activation is not None and made_redundant_by_q(n.activation, params.acts.get(n.output))
                     and not (plan is not None and plan.has_float_readers(n.output)))  # float readers need it
        if n.activation is not None and not redundant:
            y = g.clip(y, n.activation.lo, n.activation.hi, n.name)
        inherits = quantized and params is not None and plan is not None and plan.activations.get(n.output) is not None
        publish(n.output, y, not inherits)

    # graph outputs keep readable names
    outs = {}
    for i, v in enumerate(graph.outputs):
        name = v if graph.keep_io_names else "output" if len(graph.outputs) == 1 else f"output_{i}"
        seen = reader_sees(v, None)
        g.rename(seen, name)
        names = {k: (name if t == seen else t) for k, t in names.items()}
        outs[name] = graph.dims(v)
    if tensor_names is not None:
        tensor_names.update(names)
    if len(graph.inputs) > 1 or graph.dim_names or graph.input_dtypes:
        from onnx import helper

        inputs = [(input_names[v], helper.np_dtype_to_tensor_dtype(np.dtype(str(graph.input_dtypes.get(v, "float32")).replace("torch.", ""))),
                   graph.dims(v)) for v in graph.inputs]
        return g.model(inputs[0][0], inputs[0][2], outs, "qwt_int8" if quantized else "fp32", metadata or {},
                       inputs=inputs, opset=graph.opset)
    shape = ["batch"] + [int(d) for d in graph.input_shapes[x][1:]]
    return g.model("input", shape, outs, "qwt_int8" if quantized else "fp32", metadata or {})
