"""The operator set: PyTorch semantics and ONNX emission side by side.

Each op states its PyTorch forward and its ONNX form in one place, so the simulation and
the exported graph cannot drift apart. ``role`` tells the quantizer placement what kind of
op it is:

- WEIGHTED: Conv/Linear. Per-channel INT8 weights; CWAC compensates its output.
- INTEGER: element-wise or pooling ops that ONNX Runtime runs as integer kernels when
  they sit between DequantizeLinear inputs and a QuantizeLinear output (QLinearAdd,
  QLinearGlobalAveragePool, ...).
- MOVEMENT: data movement that commutes with Q/DQ (reshape, flatten, max-pool). Its
  output keeps its input's quantization parameters.
- FLOAT: everything else; runs in float between DequantizeLinear and QuantizeLinear.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .ir import Node


class Role(enum.Enum):
    WEIGHTED = "weighted"
    INTEGER = "integer"
    MOVEMENT = "movement"
    FLOAT = "float"


# forward(node, inputs, weight, bias) -> tensor (before the fused activation)
Forward = Callable[[Node, list, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]
# emit(builder, node, input_names, weight_name, bias_name) -> output tensor name
Emit = Callable[..., str]


@dataclass(frozen=True)
class OpSpec:
    name: str
    role: Role
    forward: Forward
    emit: Emit


def _conv_forward(node, xs, w, b):
    x = xs[0]
    t, l, btm, r = node.attrs["pads"]
    if (t, l) != (btm, r):  # asymmetric "same" padding: pad explicitly, as ONNX Conv does
        x = F.pad(x, (l, r, t, btm))
        padding = 0
    else:
        padding = (t, l)
    return F.conv2d(x, w, b, node.attrs["stride"], padding, node.attrs["dilation"], node.attrs["groups"])


def _conv_emit(g, node, ins, w, b):
    k = node.weight.shape[2:]
    attrs = dict(
        kernel_shape=list(k),
        strides=list(node.attrs["stride"]),
        pads=list(node.attrs["pads"][:2]) + list(node.attrs["pads"][2:]),
        dilations=list(node.attrs["dilation"]),
        group=node.attrs["groups"],
    )
    return g.op("Conv", [ins[0], w] + ([b] if b else []), node.name, **attrs)


def _linear_forward(node, xs, w, b):
    return F.linear(xs[0], w, b)


def _linear_emit(g, node, ins, w, b):
    return g.op("Gemm", [ins[0], w] + ([b] if b else []), node.name, transB=1)


def _binary(torch_fn, onnx_op):
    return (
        lambda node, xs, w, b: torch_fn(xs[0], xs[1]),
        lambda g, node, ins, w, b: g.op(onnx_op, ins, node.name),
    )


def _gap_forward(node, xs, w, b):
    return xs[0].mean(dim=(2, 3), keepdim=True)


def _flatten_forward(node, xs, w, b):
    return torch.flatten(xs[0], 1)


def _reshape_forward(node, xs, w, b):
    return xs[0].reshape(xs[0].shape[0], *node.attrs["shape"])


def _reshape_emit(g, node, ins, w, b):
    import numpy as np

    shape = g.const(f"{node.name}.shape", np.array([0] + list(node.attrs["shape"]), dtype=np.int64))
    return g.op("Reshape", [ins[0], shape], node.name)


def _pool_attrs(node):
    return dict(
        kernel_shape=list(node.attrs["kernel"]),
        strides=list(node.attrs["stride"]),
        pads=list(node.attrs["padding"]) * 2,
    )


def _maxpool_forward(node, xs, w, b):
    return F.max_pool2d(xs[0], node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"])


def _avgpool_forward(node, xs, w, b):
    return F.avg_pool2d(xs[0], node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"],
                        count_include_pad=node.attrs.get("count_include_pad", True))


def _avgpool_emit(g, node, ins, w, b):
    return g.op("AveragePool", ins, node.name, count_include_pad=int(node.attrs.get("count_include_pad", True)),
                **_pool_attrs(node))


def _clip_forward(node, xs, w, b):
    return torch.clamp(xs[0], node.attrs.get("lo"), node.attrs.get("hi"))


def _clip_emit(g, node, ins, w, b):
    return g.clip(ins[0], node.attrs.get("lo"), node.attrs.get("hi"), node.name)


def _channel_affine_forward(node, xs, w, b):
    shape = (1, -1) + (1,) * (xs[0].dim() - 2)
    return xs[0] * w.reshape(shape) + b.reshape(shape)


def _channel_affine_emit(g, node, ins, w, b):
    import numpy as np

    rank = node.attrs["rank"]
    shape = (1, -1) + (1,) * (rank - 2)
    s = g.const(f"{node.name}.scale", node.weight.detach().numpy().astype(np.float32).reshape(shape))
    t = g.const(f"{node.name}.shift", node.bias.detach().numpy().astype(np.float32).reshape(shape))
    return g.op("Add", [g.op("Mul", [ins[0], s], node.name + "/mul"), t], node.name)


_add = _binary(torch.add, "Add")
_mul = _binary(torch.mul, "Mul")

OPS: dict[str, OpSpec] = {
    s.name: s
    for s in [
        OpSpec("conv", Role.WEIGHTED, _conv_forward, _conv_emit),
        OpSpec("linear", Role.WEIGHTED, _linear_forward, _linear_emit),
        OpSpec("add", Role.INTEGER, *_add),
        OpSpec("mul", Role.INTEGER, *_mul),
        OpSpec("gap", Role.INTEGER, _gap_forward, lambda g, n, ins, w, b: g.op("GlobalAveragePool", ins, n.name)),
        OpSpec("avgpool", Role.INTEGER, _avgpool_forward, _avgpool_emit),
        OpSpec("concat", Role.INTEGER, lambda n, xs, w, b: torch.cat(xs, n.attrs["axis"]),
               lambda g, n, ins, w, b: g.op("Concat", ins, n.name, axis=n.attrs["axis"])),
        OpSpec("sigmoid", Role.INTEGER, lambda n, xs, w, b: torch.sigmoid(xs[0]),
               lambda g, n, ins, w, b: g.op("Sigmoid", ins, n.name)),
        OpSpec("flatten", Role.MOVEMENT, _flatten_forward,
               lambda g, n, ins, w, b: g.op("Flatten", ins, n.name, axis=1)),
        OpSpec("reshape", Role.MOVEMENT, _reshape_forward, _reshape_emit),
        OpSpec("maxpool", Role.MOVEMENT, _maxpool_forward,
               lambda g, n, ins, w, b: g.op("MaxPool", ins, n.name, **_pool_attrs(n))),
        OpSpec("clip", Role.FLOAT, _clip_forward, _clip_emit),
        OpSpec("silu", Role.FLOAT, lambda n, xs, w, b: F.silu(xs[0]),
               lambda g, n, ins, w, b: g.op("Mul", [ins[0], g.op("Sigmoid", ins, n.name + "/sigmoid")], n.name)),
        OpSpec("channel_affine", Role.FLOAT, _channel_affine_forward, _channel_affine_emit),
    ]
}
