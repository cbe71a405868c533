"""INT8 kernel coverage: which compute ops ONNX Runtime runs as integer kernels.

Read from ORT's *optimized* graph (``SessionOptions.optimized_model_filepath``), because the
QDQ file itself says what was asked for, not what the runtime fused."""

from __future__ import annotations

import collections

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
