"""INT8 kernel coverage: which compute ops ONNX Runtime runs as integer kernels.

Read from ORT's *optimized* graph (``SessionOptions.optimized_model_filepath``), because the
QDQ file itself says what was asked for, not what the runtime fused."""

from __future__ import annotations

import collections
from typing import Optional

import onnx

_INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}
_FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "Mul", "GlobalAveragePool",
                  "AveragePool", "Concat", "Sigmoid"}


def int8_coverage(optimized: onnx.ModelProto) -> dict:
    """Integer kernels vs float compute ops in ONNX Runtime's optimized graph.

    ORT fuses a quantized transformer Linear into ``MatMulIntegerToFloat`` (float output) and
    leaves the layer's bias as a separate float ``Add``. That Add is the integer kernel's
    epilogue, not float compute the quantizer missed, so counting it as float would make the
    coverage look worse than it is; hiding it would hide that it runs. It is counted apart:
    ``bias_epilogues`` and ``by_type["bias epilogue Add"]``, outside ``compute_ops``. An Add is
    one when, precisely: one input is a constant vector ``[N]`` (leading 1s allowed), the other is
    the output of a ``MatMulIntegerToFloat`` whose weight is a constant ``[K, N]`` and which
    nothing else reads (not a graph output either).
    """
    g = optimized.graph
    ops = collections.Counter(n.op_type for n in g.node)
    consts = {i.name: tuple(i.dims) for i in g.initializer}
    consts.update({n.output[0]: tuple(a.t.dims) for n in g.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    producer = {o: n for n in g.node for o in n.output}
    readers = collections.Counter(i for n in g.node for i in n.input if i)
    graph_outputs = {o.name for o in g.output}

    def bias_epilogue(n) -> bool:
        if n.op_type != "Add" or len(n.input) != 2:
            return False
        for acc, bias in (n.input, n.input[::-1]):
            mm, b = producer.get(acc), consts.get(bias)
            if (mm is None or mm.op_type != "MatMulIntegerToFloat" or b is None or readers[acc] != 1
                    or acc in graph_outputs or len(b) < 1 or any(d != 1 for d in b[:-1])):
                continue
            w = consts.get(mm.input[1]) if len(mm.input) > 1 else None
            if w is not None and len(w) == 2 and w[-1] == b[-1]:
                return True
        return False

    epilogues = sum(1 for n in g.node if bias_epilogue(n))
    ops["Add"] -= epilogues
    integer = {k: v for k, v in ops.items() if k in _INTEGER_OPS}
    flt = {k: v for k, v in ops.items() if k in _FLOAT_COMPUTE and v > 0}
    return dict(integer_ops=sum(integer.values()), compute_ops=sum(integer.values()) + sum(flt.values()),
                bias_epilogues=epilogues,
                by_type={**integer, **{f"float {k}": v for k, v in flt.items()},
                         **({"bias epilogue Add": epilogues} if epilogues else {})})


# ------------------------------------------------------------------ FLOP share of integer kernels
# ORT's integer compute kernels, and which input holds the (constant) weight
_INTEGER_KERNEL_WEIGHT = {"QLinearConv": 3, "QLinearConvTranspose": 3, "QGemm": 3, "QLinearMatMul": 3,
                          "MatMulInteger": 1, "MatMulIntegerToFloat": 1, "ConvInteger": 1,
                          "DynamicQuantizeMatMul": 1, "MatMulInteger16": 1}
_FLOP_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ORT's float compute kernels that a source Conv/Gemm/MatMul can become (for the cross-check)
_FLOAT_FLOP_KERNELS = {"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul",
                       "FusedMatMul"}


def _with_input_shapes(model: onnx.ModelProto, input_shapes: dict) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        if vi.name not in input_shapes:
            raise ValueError(f"input_shapes has no shape for graph input {vi.name!r}")
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in input_shapes[vi.name]:
            shape.dim.add().dim_value = int(d)
    return m


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    g = model.graph
    shapes = {i.name: tuple(i.dims) for i in g.initializer}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    for n in g.node:  # Constant nodes (weights written as Constant)
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    return shapes


def _shapes_by_running(model: onnx.ModelProto, names: list[str], input_shapes: dict) -> dict[str, tuple]:
    """Shapes that shape inference left open, from one ONNX Runtime run of zeros (only shapes
    are read; the values mean nothing)."""
    import numpy as np
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s.get_inputs():
        dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                 "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}.get(i.type, np.float32)
        feeds[i.name] = np.zeros(input_shapes[i.name], dtype)
    outs = s.run(names, feeds)
    return {t: tuple(v.shape) for t, v in zip(names, outs)}


def _macs(n: onnx.NodeProto, shapes: dict) -> Optional[int]:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul, None if a shape is unknown."""
    import math

    ins = [shapes.get(t) for t in n.input[:2]]
    out = shapes.get(n.output[0])
    if n.op_type == "Conv":
        w = ins[1]
        return None if w is None or out is None else math.prod(out) * math.prod(w[1:])
    if n.op_type == "ConvTranspose":  # every input element meets C_out/groups * kernel weights
        x, w = ins
        return None if x is None or w is None else math.prod(x) * math.prod(w[1:])
    if n.op_type == "Gemm":
        a = ins[0]
        if a is None or out is None:
            return None
        trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[-1])
    if n.op_type == "MatMul":
        a = ins[0]
        return None if a is None or out is None else math.prod(out) * a[-1]
    return None


def _weight_signature(op_type: str, shape: Optional[tuple]):
    """What a weight shape says of its node across the exporter and ORT: convs keep output
    channels and kernel size (input channels may be zero-padded: kept apart as a lower bound);
    2-D matmul weights keep their two sizes (ORT may transpose them)."""
    if shape is None:
        return None
    if op_type in ("Conv", "QLinearConv", "ConvInteger") and len(shape) >= 3:
        return ("conv", shape[0], tuple(shape[2:])), shape[1]
    if op_type in ("ConvTranspose", "QLinearConvTranspose") and len(shape) >= 3:
        return ("convT", shape[1], tuple(shape[2:])), shape[0]
    if len(shape) == 2:
        return ("mm", tuple(sorted(shape))), 0
    return None


def _same_or_padded(source: int, kernel: int) -> bool:
    """Input channels as the source has them, or zero-padded up to the next multiple of 4
    (graph_passes/pad_conv_input_channels.py, --target ort)."""
    return kernel == source or (kernel % 4 == 0 and 0 < kernel - source < 4)


def _strip_ort_suffix(name: str) -> str:
    import re

    return re.sub(r"(_token_\d+)+$", "", name)


def integer_flop_share(fp32_model: onnx.ModelProto, int8_model, input_shapes: dict, *,
                       optimized: Optional[onnx.ModelProto] = None, threads: int = 2) -> dict:
    """The share of the FP32 source graph's Conv/ConvTranspose/Gemm/MatMul FLOPs that ONNX
    Runtime runs in integer kernels, read from ORT's optimized graph of the INT8 QDQ file.

    ``fp32_model``: the FP32 source graph (for the pipeline: ``QuantizedModel.loaded.onnx``).
    ``int8_model``: the QDQ file (path, bytes or ModelProto); ORT (CPU provider, all graph
    optimizations, as ``qd.verify`` runs it) writes its optimized graph, unless ``optimized``
    gives that graph already. ``input_shapes``: a concrete shape per FP32 graph input, e.g.
    ``{"images": (1, 3, 320, 320)}``.

    FLOPs are ``2 * MACs`` from ONNX shape inference (``data_prop``) of the FP32 graph at those
    shapes (a tensor it leaves open is measured by one ONNX Runtime run of zeros: only the shape
    is read). Conv: ``out elements * C_in/groups * kernel``; ConvTranspose: ``in elements *
    C_out/groups * kernel``; Gemm/MatMul: ``out elements * K``.

    Source node -> ORT node, by name first (checked on the nudenet YOLOv8n and MTCNN files):
    the frontend names each IR node after its source node (``frontend.onnx_names.node_names``:
    the node name, or ``<op_type>_<index>``); the QDQ exporter names the compute node
    ``<IR name>/Conv`` (``/MatMul``, ``/Gemm``); ORT's QDQ fusion names the integer kernel after
    the node it replaces plus ``_token_<n>`` (``/model.0/conv/Conv/Conv_token_17``). A file that
    keeps the source names (``onnxruntime.quantization.quantize_static``) maps the same way
    (``<source name>_token_<n>``). Names do not survive ORT's float layout pass (NCHWc): a
    float Conv there is named after its output tensor (``..._nchwc``), so float source nodes are
    never looked up; every source node that no integer kernel maps to is float. An integer
    kernel whose name maps to no source node falls back to its weight: the next unmatched
    source node, in graph order, whose weight has the same output channels and kernel, and the
    same input channels or those zero-padded to the next multiple of 4 (convs), or the same two
    sizes (2-D matmul weights). ``matched_by`` counts both ways; ``unmatched_integer_kernels`` lists integer
    kernels neither way placed (e.g. compute the source does not have).

    Returns ``flops_total``, ``flops_integer``, ``share`` (None without FLOPs), ``ops_total``,
    ``ops_integer``, ``float_ops`` (source node names, graph order), ``float_flops`` (name ->
    FLOPs, largest first), ``nodes`` (per source node: name, op_type, flops, kernel),
    ``matched_by``, ``unmatched_integer_kernels``, ``flops_unknown`` and
    ``ort_float_compute_kernels`` (float Conv/Gemm/MatMul-like nodes in ORT's graph, a cross-check
    against ``ops_total - ops_integer``).
    """
    import os
    import tempfile

    from .onnxruntime import SessionFromOnnx

    # ---- FLOPs of the source graph
    g = fp32_model.graph
    from ..frontend.onnx_names import node_names  # the IR's node names (torch-free)

    keys = node_names(g)
    compute = [(k, n) for k, n in zip(keys, g.node) if n.op_type in _FLOP_OPS and n.domain in ("", "ai.onnx")]
    concrete = _with_input_shapes(fp32_model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to running it
        inferred = concrete
    shapes = _known_shapes(inferred)
    needed = sorted({t for _, n in compute for t in list(n.input[:2]) + [n.output[0]] if t and t not in shapes})
    if needed:
        shapes.update(_shapes_by_running(concrete, needed, input_shapes))
    flops = {}
    unknown = []
    for k, n in compute:
        m = _macs(n, shapes)
        if m is None:
            unknown.append(k)
        flops[k] = 2 * m if m is not None else 0

    # ---- ORT's optimized graph of the INT8 file
    if optimized is None:
        if isinstance(int8_model, onnx.ModelProto):
            data = int8_model.SerializeToString()
        elif isinstance(int8_model, (bytes, bytearray)):
            data = bytes(int8_model)
        else:
            data = os.fspath(int8_model)
        with tempfile.TemporaryDirectory() as td:
            path = os.path.join(td, "optimized.onnx")
            SessionFromOnnx(data, threads, optimized_model_path=path, allow_spinning=False)()
            optimized = onnx.load(path)
    og = optimized.graph
    oshapes = {i.name: tuple(i.dims) for i in og.initializer}
    oshapes.update(_known_shapes(optimized))

    by_key = {k: n for k, n in compute}
    kernel: dict[str, str] = {}
    how: dict[str, str] = {}
    # The QDQ exporter's "<IR name>/<op>" first, then the name itself (a file that keeps source
    # names): "a/MatMul" is the exporter's name for source "a" even where a source node is
    # itself called "a/MatMul" (two matmuls of one attention module: "a" and "a/MatMul").
    pending = []
    for on in og.node:
        if on.op_type not in _INTEGER_KERNEL_WEIGHT:
            continue
        base = _strip_ort_suffix(on.name)
        head, _, tail = base.rpartition("/")
        if head in by_key and tail in _FLOP_OPS and head not in kernel:
            kernel[head], how[head] = on.op_type, "name"
        else:
            pending.append((on, base))
    leftover = []
    for on, base in pending:
        if base in by_key and base not in kernel:
            kernel[base], how[base] = on.op_type, "name"
        else:
            leftover.append(on)
    unmatched = []
    for on in leftover:  # fall back to weight shapes, in graph order
        widx = _INTEGER_KERNEL_WEIGHT[on.op_type]
        sig = _weight_signature(on.op_type, oshapes.get(on.input[widx]) if len(on.input) > widx else None)
        hit = None
        if sig is not None:
            for k, n in compute:
                if k in kernel or len(n.input) < 2:
                    continue
                s = _weight_signature(n.op_type, shapes.get(n.input[1]))
                if s is not None and s[0] == sig[0] and _same_or_padded(s[1], sig[1]):
                    hit = k
                    break
        if hit is None:
            unmatched.append(f"{on.name} ({on.op_type})")
        else:
            kernel[hit], how[hit] = on.op_type, "weights"

    total = sum(flops.values())
    integer = sum(flops[k] for k in kernel)
    float_ops = [k for k, _ in compute if k not in kernel]
    return dict(
        flops_total=int(total), flops_integer=int(integer), share=(integer / total) if total else None,
        ops_total=len(compute), ops_integer=len(kernel), float_ops=float_ops,
        float_flops=dict(sorted(((k, int(flops[k])) for k in float_ops), key=lambda kv: -kv[1])),
        nodes=[dict(name=k, op_type=n.op_type, flops=int(flops[k]), kernel=kernel.get(k)) for k, n in compute],
        matched_by={"name": sum(v == "name" for v in how.values()), "weights": sum(v == "weights" for v in how.values())},
        unmatched_integer_kernels=unmatched, flops_unknown=unknown,
        ort_float_compute_kernels=sum(n.op_type in _FLOAT_FLOP_KERNELS for n in og.node))
