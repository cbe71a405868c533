"""A small, explicit graph IR.

Why not work on the torch.fx graph directly? The fx graph from ``torch.export`` holds
aten-level ops with BatchNorm, padding, dropout and activations as separate nodes. The
quantized graph we deploy is coarser: a Conv owns its folded BatchNorm, its "same" padding
and its activation, because that is the unit an INT8 kernel executes (ORT's QLinearConv,
TensorRT's fused conv). Both the PyTorch simulation and the ONNX emitter walk *this* IR, so
quantizers sit in exactly the same places in both by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Activation:
    """An element-wise clamp fused into the op before it (ReLU, ReLU6, hardtanh, clamp)."""

    lo: Optional[float]  # None = unbounded
    hi: Optional[float]

    @property
    def is_relu(self) -> bool:
        return self.lo == 0.0 and self.hi is None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=self.lo, max=self.hi)


@dataclass
class Node:
    """One op. ``inputs``/``output`` are value names; weights live on the node."""

    name: str  # readable and unique, e.g. "_blocks.1._expand_conv"
    op: str  # key of qwt_deploy.graph.ops.OPS
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    activation: Optional[Activation] = None


@dataclass
class Graph:
    """Nodes in topological order; one batch-first tensor input per ``inputs`` entry."""

    inputs: list[str]
    input_shapes: dict[str, tuple[int, ...]]  # example shape, dim 0 is the batch
    nodes: list[Node]
    outputs: list[str]
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # example shapes
    # non-float inputs (token ids, attention masks: torch.int64); absent = float32
    input_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    # inputs/outputs with dynamic axes: per dim a name ("batch", "seq") or a fixed size;
    # absent = dim 0 is "batch", the rest fixed (CNN captures)
    dim_names: dict[str, tuple] = field(default_factory=dict)
    # an ONNX source (frontend.onnx_graph): inputs/outputs keep their ONNX names (else "input",
    # "output"), and the export uses the source's opset when it is above the exporter's own
    keep_io_names: bool = False
    opset: Optional[int] = None

    def is_float_input(self, value: str) -> bool:
        return self.input_dtypes.get(value, torch.float32).is_floating_point

    def dims(self, value: str) -> list:
        """ONNX shape of a graph input/output: dim names for dynamic axes, ints otherwise."""
        if value in self.dim_names:
            return list(self.dim_names[value])
        shape = self.input_shapes.get(value) or self.output_shapes[value]
        return ["batch"] + [int(d) for d in shape[1:]]

    def producer(self) -> dict[str, Node]:
        return {n.output: n for n in self.nodes}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {v: [] for v in self.inputs}
        for n in self.nodes:
            out.setdefault(n.output, [])
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def last_use(self) -> dict[str, int]:
        """Index of the last node that reads each value (graph outputs live forever)."""
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                last[v] = i
        for v in self.outputs:
            last[v] = len(self.nodes)
        return last
