"""The PyTorch fake-quant simulation of the exported graph.

``QuantParams`` holds everything calibration decided. ``SimulatedModel`` runs the IR with
those parameters, computing each node the way the unfolded QDQ ONNX graph does:

    DQ(x) -> op(DQ(W_int8), DQ(b_int32)) -> * alpha -> + beta -> ReLU/Clip -> [Clip a-bits] -> Q -> DQ

so ONNX Runtime on the exported file can be checked against it step for step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from calibration.cwac import AffineFit
from ..graph.ir import Graph, Node
from ..graph.ops import OPS
from .fake_quant import ActQuant, WeightQuant, bias_scale, quantize_bias_int32
from .placement import QuantPlan


@dataclass
class QuantParams:
    acts: dict[str, ActQuant] = field(default_factory=dict)  # per value (inherited ones included)
    weights: dict[str, WeightQuant] = field(default_factory=dict)  # per node name
    cwac: dict[str, AffineFit] = field(default_factory=dict)  # per node name, if compensated

    def bias_int32(self, node: Node) -> Optional[torch.Tensor]:
        if node.bias is None:
            return None
        return quantize_bias_int32(node.bias, self.acts[node.inputs[0]].scale, self.weights[node.name].scale)


def quantized_weights(node: Node, params: QuantParams) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dequantized INT8 weight and INT32 bias, exactly as the DequantizeLinear nodes produce them."""
    wq = params.weights[node.name]
    b = None
    if node.bias is not None:
        b = params.bias_int32(node).float() * bias_scale(params.acts[node.inputs[0]].scale, wq.scale)
    return wq.dequant(), b


def apply_affine(y: torch.Tensor, fit: AffineFit, channel_dim: int = 1) -> torch.Tensor:
    shape = [1] * y.dim()
    shape[channel_dim % y.dim()] = -1
    a = torch.from_numpy(fit.alpha).reshape(shape)
    b = torch.from_numpy(fit.beta).reshape(shape)
    return (y * a).add_(b)  # Mul then Add, two roundings, as the unfolded ONNX graph does


def channel_dim(node: Node) -> int:
    return 1


class SimulatedModel(torch.nn.Module):
    """Runs the IR in float (``params=None``) or as the fake-quant model of the QDQ graph."""

    def __init__(self, graph: Graph, plan: Optional[QuantPlan] = None, params: Optional[QuantParams] = None):
        super().__init__()
        self.graph, self.plan, self.params = graph, plan, params
        self._w = {}
        if params is not None:
            for n in graph.nodes:
                if n.name in params.weights:
                    self._w[n.name] = quantized_weights(n, params)

    def _quant(self, value: str, x: torch.Tensor) -> torch.Tensor:
        if self.params is None or value not in self.params.acts:
            return x
        return self.params.acts[value](x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.graph
        env = {g.inputs[0]: self._quant(g.inputs[0], x)}
        last = g.last_use()
        for i, n in enumerate(g.nodes):
            w, b = self._w.get(n.name, (n.weight, n.bias))
            y = OPS[n.op].forward(n, [env[v] for v in n.inputs], w, b)
            if self.params is not None and n.name in self.params.cwac:
                y = apply_affine(y, self.params.cwac[n.name], channel_dim(n))
            if n.activation is not None:
                y = n.activation.apply(y)
            env[n.output] = self._quant(n.output, y)
            for v in n.inputs:
                if last.get(v) == i:
                    del env[v]
        outs = [env[v] for v in g.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)
