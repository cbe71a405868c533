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

import numpy as np
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


def linear_as_matmul(node) -> bool:
    """A linear on (batch, tokens, dim) activations, emitted as MatMul + bias Add.

    ONNX Gemm is 2-D only. The weight is stored pre-transposed as [in, out], so its
    per-output-channel DequantizeLinear axis is 1; the bias stays a float Add (QLinearMatMul
    has no bias input). ONNX Runtime fuses DQ(x), DQ(W) -> MatMul into an integer kernel
    (MatMulIntegerToFloat / QLinearMatMul).
    """
    return node.op == "linear" and node.attrs.get("rank", 2) > 2


def _linear_emit(g, node, ins, w, b):
    if linear_as_matmul(node):
        y = g.op("MatMul", [ins[0], w], node.name)
        return g.op("Add", [y, b], node.name + "/bias") if b else y
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


# -- transformer ops ------------------------------------------------------------------------
# Token activations are (batch, tokens, dim); attention tensors (batch, heads, tokens, ...).
# Constants that an op needs (LayerNorm gamma/beta, an embedding table, an added position
# table, a scalar) live on the node as ``weight``/``bias``, so no IR node is ever input-less.


def _np(t):
    import numpy as np

    return t.detach().numpy().astype(np.float32) if t.is_floating_point() else t.detach().numpy()


def _reshape_nd_forward(node, xs, w, b):
    x = xs[0]
    shape = [x.shape[i] if d == 0 else d for i, d in enumerate(node.attrs["shape"])]  # ONNX: 0 copies the dim
    return x.reshape(shape)


def _reshape_nd_emit(g, node, ins, w, b):
    import numpy as np

    shape = g.const(f"{node.name}.shape", np.array(node.attrs["shape"], dtype=np.int64))
    return g.op("Reshape", [ins[0], shape], node.name)


def _unsqueeze_forward(node, xs, w, b):
    x = xs[0]
    for a in node.attrs["axes"]:  # sorted, in output coordinates
        x = x.unsqueeze(a)
    return x


def _unsqueeze_emit(g, node, ins, w, b):
    import numpy as np

    axes = g.const(f"{node.name}.axes", np.array(node.attrs["axes"], dtype=np.int64))
    return g.op("Unsqueeze", [ins[0], axes], node.name)


def _layer_norm_forward(node, xs, w, b):
    return F.layer_norm(xs[0], (xs[0].shape[-1],), w, b, node.attrs["eps"])


def _layer_norm_emit(g, node, ins, w, b):
    d = node.attrs["dim"]
    gamma = node.weight if node.weight is not None else torch.ones(d)
    beta = node.bias if node.bias is not None else torch.zeros(d)
    return g.op("LayerNormalization", [ins[0], g.const(f"{node.name}.weight", _np(gamma)),
                                       g.const(f"{node.name}.bias", _np(beta))],
                node.name, axis=-1, epsilon=float(node.attrs["eps"]))


def _gelu_emit(g, node, ins, w, b):
    """GELU as opset-17 primitives (Gelu is an ONNX op only from opset 20); ONNX Runtime
    fuses this exact pattern back into one Gelu kernel."""
    import numpy as np

    x = ins[0]
    c = lambda name, v: g.const(f"{node.name}.{name}", np.array(v, np.float32))  # noqa: E731
    if node.attrs.get("approximate", "none") == "tanh":
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [g.op("Pow", [x, c("three", 3.0)], node.name),
                                                           c("k", 0.044715)], node.name + "/cube")], node.name),
                             c("sqrt_2_over_pi", float(np.sqrt(2 / np.pi)))], node.name + "/inner")
        t = g.op("Tanh", [inner], node.name)
    else:
        t = g.op("Erf", [g.op("Div", [x, c("sqrt2", float(np.sqrt(2.0)))], node.name)], node.name)
    half = g.op("Mul", [x, c("half", 0.5)], node.name + "/half")
    return g.op("Mul", [half, g.op("Add", [t, c("one", 1.0)], node.name + "/one")], node.name)


def _embedding_emit(g, node, ins, w, b):
    return g.op("Gather", [g.const(f"{node.name}.weight", _np(node.weight)), ins[0]], node.name, axis=0)


def _slice_rows_forward(node, xs, w, b):
    return w[: xs[0].shape[node.attrs["dim"]]]


def _slice_rows_emit(g, node, ins, w, b):
    """table[:ref.shape[dim]] (position embeddings cut to the sequence length) with a
    dynamic end, so the sequence axis stays dynamic in the exported graph."""
    import numpy as np

    d = node.attrs["dim"]
    end = g.op("Shape", [ins[0]], node.name, start=d, end=d + 1)
    zero = g.const(f"{node.name}.starts", np.array([0], np.int64))
    return g.op("Slice", [g.const(f"{node.name}.weight", _np(node.weight)), zero, end, zero], node.name)


def _const_binary_emit(onnx_op):
    def emit(g, node, ins, w, b):
        return g.op(onnx_op, [ins[0], g.const(f"{node.name}.const", _np(node.weight))], node.name)
    return emit


def _rsub_emit(g, node, ins, w, b):
    import numpy as np

    return g.op("Sub", [g.const(f"{node.name}.const", np.array(node.attrs["value"], np.float32)), ins[0]], node.name)


def _sum_emit(g, node, ins, w, b):
    import numpy as np

    axes = g.const(f"{node.name}.axes", np.array(node.attrs["dims"], np.int64))
    return g.op("ReduceSum", [ins[0], axes], node.name, keepdims=int(node.attrs["keepdim"]))


def _l2norm_emit(g, node, ins, w, b):
    # opset 17: ReduceL2 takes its axes as an attribute (an input only from opset 18)
    return g.op("ReduceL2", [ins[0]], node.name, axes=list(node.attrs["dims"]), keepdims=int(node.attrs["keepdim"]))


def _mean_emit(g, node, ins, w, b):
    # opset 17: ReduceMean takes its axes as an attribute (an input only from opset 18)
    return g.op("ReduceMean", [ins[0]], node.name, axes=list(node.attrs["dims"]), keepdims=int(node.attrs["keepdim"]))


def _cast_emit(g, node, ins, w, b):
    from onnx import TensorProto

    return g.op("Cast", ins, node.name, to=TensorProto.FLOAT)


_div = _binary(torch.div, "Div")

OPS.update({
    s.name: s
    for s in [
        # activation x activation MatMul (attention Q.K^T and P.V): DQ, DQ -> MatMul -> Q is
        # what ONNX Runtime fuses into QLinearMatMul, so its inputs and output are quantized
        OpSpec("matmul", Role.INTEGER, lambda n, xs, w, b: torch.matmul(xs[0], xs[1]),
               lambda g, n, ins, w, b: g.op("MatMul", ins, n.name)),
        OpSpec("transpose", Role.MOVEMENT, lambda n, xs, w, b: xs[0].permute(n.attrs["perm"]),
               lambda g, n, ins, w, b: g.op("Transpose", ins, n.name, perm=list(n.attrs["perm"]))),
        OpSpec("reshape_nd", Role.MOVEMENT, _reshape_nd_forward, _reshape_nd_emit),
        OpSpec("unsqueeze", Role.MOVEMENT, _unsqueeze_forward, _unsqueeze_emit),
        # float by default (placement's keep-float list): no ONNX Runtime integer kernel for
        # LayerNorm/GELU, and Softmax's input carries the additive attention mask (-1e4)
        OpSpec("layer_norm", Role.FLOAT, _layer_norm_forward, _layer_norm_emit),
        OpSpec("gelu", Role.FLOAT, lambda n, xs, w, b: F.gelu(xs[0], approximate=n.attrs.get("approximate", "none")),
               _gelu_emit),
        OpSpec("softmax", Role.FLOAT, lambda n, xs, w, b: torch.softmax(xs[0], n.attrs["axis"]),
               lambda g, n, ins, w, b: g.op("Softmax", ins, n.name, axis=n.attrs["axis"])),
        OpSpec("embedding", Role.FLOAT, lambda n, xs, w, b: F.embedding(xs[0], w), _embedding_emit),
        OpSpec("slice_rows", Role.FLOAT, _slice_rows_forward, _slice_rows_emit),
        # element-wise ops with a constant or with a non-activation (mask-derived) operand:
        # they stay float; "add"/"mul" above are activation (+|x) activation
        OpSpec("add_const", Role.FLOAT, lambda n, xs, w, b: xs[0] + w, _const_binary_emit("Add")),
        OpSpec("mul_const", Role.FLOAT, lambda n, xs, w, b: xs[0] * w, _const_binary_emit("Mul")),
        OpSpec("rsub_const", Role.FLOAT, lambda n, xs, w, b: n.attrs["value"] - xs[0], _rsub_emit),
        OpSpec("add_float", Role.FLOAT, *_add),
        OpSpec("mul_float", Role.FLOAT, *_mul),
        OpSpec("div", Role.FLOAT, *_div),
        OpSpec("cast_float", Role.FLOAT, lambda n, xs, w, b: xs[0].float(), _cast_emit),
        OpSpec("sum", Role.FLOAT, lambda n, xs, w, b: xs[0].sum(dim=n.attrs["dims"], keepdim=n.attrs["keepdim"]),
               _sum_emit),
        OpSpec("mean", Role.FLOAT, lambda n, xs, w, b: xs[0].mean(dim=n.attrs["dims"], keepdim=n.attrs["keepdim"]),
               _mean_emit),
        OpSpec("l2norm", Role.FLOAT,
               lambda n, xs, w, b: torch.linalg.vector_norm(xs[0], 2, n.attrs["dims"], n.attrs["keepdim"]),
               _l2norm_emit),
    ]
})


# -- ONNX float nodes (frontend.onnx_graph) ---------------------------------------------------
# Any ONNX node the pipeline does not quantize: the simulation runs it through the model's
# FloatNodeRunner (onnx2torch, or ONNX Runtime for that one node: frontend.onnx_ops), and the
# exporter copies it verbatim. A node with several outputs yields a tuple; ``onnx_output``
# nodes pick its items.


def _onnx_inputs(node, xs):
    consts, it = node.attrs["const_inputs"], iter(xs)
    out = []
    for k, t in enumerate(node.attrs["proto"].input):
        if k in consts:
            out.append(consts[k])
        else:
            out.append(next(it) if t else None)
    return out


def _onnx_forward(node, xs, w, b):
    outs = node.attrs["runner"].run(node.attrs["runner_key"], _onnx_inputs(node, xs))
    return tuple(outs) if node.attrs["multi"] else outs[0]


def _onnx_emit(g, node, ins, w, b):
    import copy

    proto = copy.deepcopy(node.attrs["proto"])
    consts, it = node.attrs["const_inputs"], iter(ins)
    names = []
    for k, t in enumerate(proto.input):
        if k in consts:
            names.append(g.const(t, consts[k].numpy()))
        else:
            names.append(next(it) if t else "")
    del proto.input[:]
    proto.input.extend(names)
    outs = g.node(proto, node.name)
    return tuple(outs) if node.attrs["multi"] else outs[0]


OPS.update({
    s.name: s
    for s in [
        OpSpec("onnx", Role.FLOAT, _onnx_forward, _onnx_emit),
        # an ONNX node that only moves or selects its first input's values (Reshape,
        # Transpose, Slice, nearest Resize...: frontend.onnx_graph.MOVEMENT_OPS): it inherits
        # that input's quantizer, as the IR's own reshape/flatten/maxpool do
        OpSpec("onnx_movement", Role.MOVEMENT, _onnx_forward, _onnx_emit),
        OpSpec("onnx_output", Role.FLOAT, lambda n, xs, w, b: xs[0][n.attrs["index"]],
               lambda g, n, ins, w, b: ins[0][n.attrs["index"]]),
    ]
})
