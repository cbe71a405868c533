"""Rewrite each FP16 compute node (a TensorRT-target QwT branch) into FP32 arithmetic on
FP16-rounded values, so ONNX Runtime's CPU provider can check it against the simulation.

For checking only: the shipped graph is never rewritten. An FP16 node

    Conv(x16, W16, b16) -> y16

becomes

    Cast(x16 -> float) -> Conv(float(W16), float(b16)) -> Cast(-> float16) -> y16

Every value the node reads is still exactly the FP16 value, the product sums are FP32 and
the result is rounded once to FP16: what TensorRT's FP16 tensor-core kernels compute (FP16
operands, FP32 accumulation, FP16 output) and what ``qwt_deploy.calibration.qwt_branch.BranchFit.apply``
simulates. Why a rewrite: ONNX Runtime 1.32's x86 CPU provider has no FP16 Conv/MatMul
kernels; it inserts "precision free" Casts around the node and then drops them together
with the graph's own ``Cast(-> float16)``, so the FP16 rounding of the input and of the
output disappears (measured: every output element differs from the FP16 arithmetic).
Explicit FP32 -> FP16 -> FP32 Cast pairs, as written here, are kept and rounded.

Preconditions: FP16 values come only from ``Cast(to=FLOAT16)`` nodes or float16 constants;
the selected ops (:data:`TYPE_PRESERVING_OPS`) give their output the type of their float
inputs. Other nodes that read an FP16 value (a Cast, say) are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .helpers import const
from .scaffold import apply_all, run_pass

# element-wise / linear ops whose output type is their input type (ONNX type constraint T)
TYPE_PRESERVING_OPS = frozenset({"Conv", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Clip"})


@dataclass
class _Match:
    node: gs.Node
    fp16_inputs: list[int]  # input indices that carry an FP16 value


def _is_fp16_constant(t) -> bool:
    v = const(t)
    return v is not None and v.dtype == np.float16


def fp16_values(graph: gs.Graph) -> set[str]:
    """Names of the tensors that hold FP16 values, propagated in topological order from
    ``Cast(to=FLOAT16)`` outputs and float16 constants through :data:`TYPE_PRESERVING_OPS`."""
    half: set[str] = set()
    for n in graph.nodes:
        if n.op == "Cast":
            if int(n.attrs.get("to", 0)) == onnx.TensorProto.FLOAT16:
                half.update(t.name for t in n.outputs)
        elif n.op in TYPE_PRESERVING_OPS and any(_is_fp16_constant(t) or t.name in half for t in n.inputs):
            half.update(t.name for t in n.outputs)
    return half


def select_fp16_compute(node: gs.Node, half: set[str]) -> _Match | None:
    """Selector: a type-preserving op (Conv, MatMul, Add...) with an FP16 input."""
    if node.op not in TYPE_PRESERVING_OPS:
        return None
    idx = [i for i, t in enumerate(node.inputs) if _is_fp16_constant(t) or (t.name and t.name in half)]
    return _Match(node, idx) if idx else None


def rewrite_match(graph: gs.Graph, m: _Match, widened: dict[str, gs.Constant]) -> None:
    """Action: widen each FP16 input to FP32 (constants exactly, by value; ``widened`` shares
    one FP32 copy per constant), compute in FP32, round the output to FP16 into the original
    output tensor."""
    n = m.node
    name = n.name or n.outputs[0].name
    for i in m.fp16_inputs:
        t = n.inputs[i]
        if isinstance(t, gs.Constant):
            if t.name not in widened:
                widened[t.name] = gs.Constant(f"{t.name}/fp32", np.asarray(t.values).astype(np.float32))
            n.inputs[i] = widened[t.name]
        else:
            wide = gs.Variable(f"{name}/fp32_in{i}", dtype=np.float32, shape=t.shape)
            graph.nodes.append(gs.Node("Cast", f"{name}/fp32_in{i}", {"to": onnx.TensorProto.FLOAT}, [t], [wide]))
            n.inputs[i] = wide
    out = n.outputs[0]
    acc = gs.Variable(f"{name}/fp32_out", dtype=np.float32, shape=out.shape)
    n.outputs[0] = acc
    out.dtype = np.float16
    graph.nodes.append(gs.Node("Cast", f"{name}/fp16_round", {"to": onnx.TensorProto.FLOAT16}, [acc], [out]))


# Pass emulate_fp16_in_fp32 (check copies only):
#   selector select_fp16_compute: a TYPE_PRESERVING_OPS node with an FP16 input, FP16-ness
#     propagated by fp16_values over the topologically sorted graph;
#   action rewrite_match: Cast each FP16 input to FP32 (constants widened once, by value),
#     compute in FP32, Cast(-> float16) into the original output tensor.
# Preconditions: see the module docstring (FP16 values come from Cast(to=FLOAT16) or float16
# constants; the selected ops give their output their float inputs' type).
def emulate_fp16_in_fp32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The rewritten copy of ``model`` and how many FP16 nodes were rewritten."""
    def emulate_all(graph: gs.Graph) -> int:
        graph.toposort()  # fp16_values propagates in graph order
        half = fp16_values(graph)
        widened: dict[str, gs.Constant] = {}
        return len(apply_all(graph, lambda n: select_fp16_compute(n, half),
                             lambda g, m: rewrite_match(g, m, widened)))

    return run_pass(model, emulate_all)
