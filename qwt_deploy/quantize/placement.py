"""Where activation quantizers go, per target backend.

A quantizer sits on a *value* (a tensor of the IR); every reader of that value sees the
quantized version, in the simulation and in the exported graph alike.

ONNX Runtime CPU layout (``--target ort``). ORT fuses a node unit "DequantizeLinear inputs
-> op -> QuantizeLinear output" into one integer kernel (QLinearConv, QGemm, QLinearAdd,
QLinearGlobalAveragePool...). A Conv whose output is not followed by a Q stays float, so
this layout quantizes op *outputs*:

- the graph input;
- the output of every WEIGHTED and INTEGER op (after its fused ReLU/Clip, which the
  uint8 Q then makes redundant), except graph outputs, which stay float;
- MOVEMENT ops (flatten, reshape, max-pool) inherit their input's parameters, so ORT can
  drop the Q/DQ around them;
- any remaining value read by a WEIGHTED or INTEGER op (e.g. the output of a float op)
  gets its own quantizer, because those kernels need every input to come from a DQ.

Activations are uint8 asymmetric: on x86 ORT converts int8 activations to uint8 anyway,
and only zero_point == 0 == qmin lets a ReLU be removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..graph.ir import Graph
from ..graph.ops import OPS, Role


@dataclass
class QuantPlan:
    target: str
    # value -> None (observe its own range) or the value whose parameters it inherits
    activations: dict[str, str | None] = field(default_factory=dict)
    weighted: list[str] = field(default_factory=list)  # node names with INT8 weights

    def is_quantized(self, value: str) -> bool:
        return value in self.activations

    def root(self, value: str) -> str:
        """The value whose observer defines this value's parameters."""
        while self.activations.get(value) is not None:
            value = self.activations[value]
        return value


def plan_for_ort(graph: Graph) -> QuantPlan:
    plan = QuantPlan(target="ort")
    outputs = set(graph.outputs)
    for v in graph.inputs:
        plan.activations[v] = None
    for n in graph.nodes:
        role = OPS[n.op].role
        if role in (Role.WEIGHTED, Role.INTEGER):
            for v in n.inputs:
                plan.activations.setdefault(v, None)
            if role is Role.WEIGHTED:
                plan.weighted.append(n.name)
            if n.output not in outputs:
                plan.activations[n.output] = None
        elif role is Role.MOVEMENT and plan.is_quantized(n.inputs[0]):
            plan.activations[n.output] = n.inputs[0]
    return plan


PLANNERS = {"ort": plan_for_ort}
