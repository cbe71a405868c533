"""An FP32 ONNX graph -> the IR: the front end for "any model that exports to ONNX".

Quantizable nodes become the IR's own ops, which the simulation emulates exactly and the
exporter writes as QDQ node units:

- Conv (2-D, constant weight) -> ``conv``, a following BatchNormalization folded in and a
  Relu/Clip with constant bounds fused when the conv output has no other reader;
- Gemm (constant B, alpha = beta = 1, transA = 0) and MatMul by a constant 2-D matrix (plus a
  constant bias Add) -> ``linear``;
- float Add/Mul of two activations -> ``add``/``mul``; Concat -> ``concat``; Sigmoid;
  GlobalAveragePool or ReduceMean over H, W (keepdims) -> ``gap``; AveragePool with
  symmetric pads, no ceil mode, no dilation -> ``avgpool``;
- MatMul of two float activations (attention) -> ``matmul``; Gather of a constant float table
  by integer ids -> ``embedding`` (INT8 rows);
- nodes that only move or select values (Reshape, Transpose, Slice, nearest Resize, ...:
  :data:`MOVEMENT_OPS`) -> ``onnx_movement``: copied verbatim like float nodes, but they pass
  their input's quantizer through.

**Every other node is a float node** (IR op ``onnx``): the simulation runs it through
:class:`~qwt_deploy.frontend.onnx_ops.FloatNodeRunner` (onnx2torch, or ONNX Runtime for that
one node) and the exporter copies it verbatim: op type, attributes, subgraphs, domain, name.
A node with several outputs gets one ``onnx_output`` IR node per output it feeds on.

Value dtypes come from ONNX shape inference: an integer tensor (a shape computation) is never
given to an op the placement could quantize. Graph inputs and outputs keep their ONNX names and
dynamic axes (``Graph.keep_io_names``), and the export keeps the source opset when it is above
the exporter's own (``Graph.opset``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import QwtError
from ..graph.ir import Activation, Graph, Node

FLOAT_TYPES = {TensorProto.FLOAT}
# ONNX ops whose output is a rearrangement or selection of their first input's values
# (IR op ``onnx_movement``): exact on a quantized input, whatever the other inputs say.
MOVEMENT_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "GatherElements",
    "GatherND", "Expand", "Tile", "Identity", "DepthToSpace", "SpaceToDepth", "Resize",
    # max pooling selects input values (its padding is -inf, never an output): any pads, ceil
    # mode and dilation included
    "MaxPool", "GlobalMaxPool",
})


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Translator:
    def __init__(self, model: onnx.ModelProto, runner):
        from .onnx_names import node_names

        self.model = model
        self.runner = runner
        g = model.graph
        self.names = node_names(g)  # unique node names, as the runner keys them
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        self.types: dict[str, onnx.TypeProto] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            self.types[vi.name] = vi.type
        self.readers: dict[str, int] = {}
        for n in g.node:
            for t in n.input:
                if t:
                    self.readers[t] = self.readers.get(t, 0) + 1
        self.graph_outputs = {o.name for o in g.output}
        self.nodes: list[Node] = []
        self.value: dict[str, str] = {}  # ONNX tensor -> IR value
        self.used_names: set[str] = set()
        # values computed only from integer graph inputs and constants (an attention mask and
        # the additive bias made from it): side values, never quantized
        self.aux: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def elem_type(self, t: str) -> Optional[int]:
        ty = self.types.get(t)
        return ty.tensor_type.elem_type if ty is not None and ty.HasField("tensor_type") else None

    def rank(self, t: str) -> Optional[int]:
        ty = self.types.get(t)
        if ty is None or not ty.tensor_type.HasField("shape"):
            return None
        return len(ty.tensor_type.shape.dim)

    def is_float(self, t: str) -> bool:
        return self.elem_type(t) in FLOAT_TYPES

    def const(self, t: str) -> Optional[np.ndarray]:
        return self.consts.get(t) if t else None

    def sole_reader(self, t: str) -> bool:
        return self.readers.get(t, 0) == 1 and t not in self.graph_outputs

    def unique(self, name: str) -> str:
        base, i = name or "node", 1
        while name in self.used_names:
            i += 1
            name = f"{base}#{i}"
        self.used_names.add(name)
        return name

    def emit(self, onnx_name: str, op: str, inputs: list[str], out: str, **kw) -> Node:
        node = Node(name=self.unique(onnx_name), op=op, inputs=[self.value[i] for i in inputs], output=out, **kw)
        self.value[out] = out
        self.nodes.append(node)
        return node

    # ------------------------------------------------------------------ translation
    def run(self) -> Graph:
        g = self.model.graph
        inits = set(self.consts)
        inputs, shapes, dtypes, dims = [], {}, {}, {}
        for vi in g.input:
            if vi.name in inits:
                continue
            inputs.append(vi.name)
            self.value[vi.name] = vi.name
            self.used_names.add(vi.name)
            d = [x.dim_param or (x.dim_value if x.HasField("dim_value") else f"{vi.name}_dim{k}")
                 for k, x in enumerate(vi.type.tensor_type.shape.dim)]
            dims[vi.name] = tuple(d)
            shapes[vi.name] = tuple(v if isinstance(v, int) else 1 for v in d)
            if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                self.aux.add(vi.name)
                dtypes[vi.name] = torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(
                    vi.type.tensor_type.elem_type))).dtype
        nodes = list(g.node)
        skip: set[int] = set()
        for i, n in enumerate(nodes):
            if i in skip:
                continue
            name = self.names[i]
            if n.op_type == "Constant":
                self.consts[n.output[0]] = self.runner.run(name, [])[0].numpy()
                continue
            if all(t in self.consts or not t for t in n.input) and n.input:  # constant folding at load
                outs = self.runner.run(name, [torch.from_numpy(np.array(self.consts[t])) if t else None for t in n.input])
                for t, v in zip(n.output, outs):
                    self.consts[t] = v.numpy()
                continue
            handled = self.quantizable(i, n, name, nodes, skip)
            if not handled:
                self.float_node(n, name)
        outputs, out_shapes = [], {}
        for vi in g.output:
            if vi.name not in self.value:
                raise QwtError(f"graph output {vi.name} is a constant", "export a model whose outputs depend on its inputs")
            outputs.append(self.value[vi.name])
            d = [x.dim_param or (x.dim_value if x.HasField("dim_value") else f"{vi.name}_dim{k}")
                 for k, x in enumerate(vi.type.tensor_type.shape.dim)]
            dims[self.value[vi.name]] = tuple(d)
            out_shapes[self.value[vi.name]] = tuple(v if isinstance(v, int) else 1 for v in d)
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)
        return Graph(inputs=inputs, input_shapes=shapes, nodes=self.nodes, outputs=outputs, output_shapes=out_shapes,
                     input_dtypes=dtypes, dim_names=dims, keep_io_names=True, opset=max(17, opset))

    def movement(self, n: onnx.NodeProto, a: dict, acts: list, float_out: bool) -> bool:
        """Does ``n`` only move or select the values of its first input (a float activation)?
        Such a node passes a quantized input's grid through unchanged, so the placement lets it
        inherit its input's quantizer (ONNX Runtime and TensorRT drop Q/DQ around it) instead of
        re-quantizing behind a float node. A nearest-neighbour Resize copies values too."""
        if n.op_type not in MOVEMENT_OPS or len(n.output) != 1 or not float_out:
            return False
        if not n.input or n.input[0] in self.consts or not self.is_float(n.input[0]):
            return False
        if n.op_type == "Resize":
            mode = a.get("mode", b"nearest")
            return (mode.decode() if isinstance(mode, bytes) else mode) == "nearest"
        return True

    def embedding(self, n: onnx.NodeProto, name: str, a: dict) -> bool:
        """Gather of rows of a constant float table by integer ids: an ``embedding`` node,
        whose table the placement may store INT8 per row (most of a small transformer's file)."""
        table = self.const(n.input[0])
        ids = n.input[1] if len(n.input) > 1 else ""
        if table is None or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating) or \
                int(a.get("axis", 0)) != 0 or ids in self.consts or ids not in self.value or \
                self.elem_type(ids) not in (TensorProto.INT64, TensorProto.INT32):
            return False
        self.emit(name, "embedding", [ids], n.output[0], weight=torch.from_numpy(np.array(table, np.float32)))
        return True

    def float_node(self, n: onnx.NodeProto, name: str, op: str = "onnx") -> None:
        """A node the pipeline leaves in float: run by the FloatNodeRunner, exported verbatim."""
        # converted to tensors once here, not on every calibration batch
        const_inputs = {k: torch.from_numpy(np.array(self.consts[t])) for k, t in enumerate(n.input) if t in self.consts}
        act = [t for t in n.input if t and t not in self.consts]
        missing = [t for t in act if t not in self.value]
        if missing:
            raise QwtError(f"node {name} ({n.op_type}) reads {missing[0]}, which no node produces",
                           "pass a valid ONNX graph (onnx.checker.check_model)")
        multi = len(n.output) > 1
        out = n.output[0] if not multi else self.unique(f"{name}:outputs")
        node = self.emit(name, op, act, out, attrs=dict(proto=n, runner=self.runner, runner_key=name,
                                                            const_inputs=const_inputs, multi=multi))
        if multi:
            for k, t in enumerate(n.output):
                if t:
                    self.nodes.append(Node(name=self.unique(f"{name}:{k}"), op="onnx_output", inputs=[node.output],
                                           output=t, attrs=dict(index=k)))
                    self.value[t] = t

    def quantizable(self, i: int, n: onnx.NodeProto, name: str, nodes: list, skip: set) -> bool:
        op, a = n.op_type, _attrs(n)
        if n.domain not in ("", "ai.onnx") or any(t and t not in self.value and t not in self.consts for t in n.input):
            return False
        if op == "Gather" and self.embedding(n, name, a):  # reads integer ids: before the side-value rule
            return True
        acts_in = [t for t in n.input if t and t not in self.consts]
        if acts_in and all(t in self.aux for t in acts_in):  # (integer shapes from the ids included)
            self.aux.update(t for t in n.output if t)
        if any(t in self.aux and self.is_float(t) for t in acts_in):
            # computed from integer inputs (the attention mask -> -1e4 bias): never quantized,
            # and what it touches (scores + mask) stays float, as a per-tensor scale can't hold it
            return False
        if op == "Conv":
            return self.conv(i, n, name, a, nodes, skip)
        if op in ("Gemm", "MatMul"):
            return self.linear(i, n, name, a, nodes, skip)
        float_out = all(self.is_float(t) for t in n.output)
        acts = [t for t in n.input if t and t not in self.consts]
        if self.movement(n, a, acts, float_out):
            self.float_node(n, name, op="onnx_movement")
            return True
        if not float_out or not all(self.is_float(t) for t in acts):
            return False
        if op in ("Add", "Mul") and len(acts) == 2 and self.broadcasts(acts[0], acts[1]):
            # a ReLU/Clip after a residual Add is fused as after a conv: free behind the uint8 Q
            act, out = self.fuse_activation(n.output[0], nodes, i, skip) if op == "Add" else (None, n.output[0])
            self.emit(name, op.lower(), acts, out, activation=act)
            return True
        if op in ("Add", "Mul") and len(acts) == 1:
            c = self.const(n.input[1] if n.input[0] == acts[0] else n.input[0])
            self.emit(name, "add_const" if op == "Add" else "mul_const", acts, n.output[0],
                      weight=torch.from_numpy(np.array(c, np.float32)))
            return True
        if op == "Concat" and len(acts) == len(n.input):
            self.emit(name, "concat", acts, n.output[0], attrs=dict(axis=int(a["axis"])))
            return True
        if op == "Sigmoid":
            self.emit(name, "sigmoid", acts, n.output[0])
            return True
        if op == "GlobalAveragePool" and self.rank(acts[0]) == 4:
            self.emit(name, "gap", acts, n.output[0])
            return True
        if op == "ReduceMean" and self.rank(acts[0]) == 4 and a.get("keepdims", 1) == 1:
            axes = a.get("axes")
            if axes is None and len(n.input) > 1:
                axes = self.const(n.input[1])
            if axes is not None and sorted(int(x) % 4 for x in np.atleast_1d(axes)) == [2, 3]:
                self.emit(name, "gap", acts, n.output[0])
                return True
            return False
        if op == "AveragePool" and self.rank(acts[0]) == 4 and len(n.output) == 1:  # (MaxPool: a movement node)
            pads = list(a.get("pads", [0, 0, 0, 0]))
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("ceil_mode", 0) or \
                    any(d != 1 for d in a.get("dilations", [1, 1])) or pads[:2] != pads[2:]:
                return False
            attrs = dict(kernel=tuple(a["kernel_shape"]), stride=tuple(a.get("strides", [1, 1])), padding=tuple(pads[:2]),
                         count_include_pad=bool(a.get("count_include_pad", 0)))
            self.emit(name, "avgpool", acts, n.output[0], attrs=attrs)
            return True
        return False

    def broadcasts(self, a: str, b: str) -> bool:
        """Two activations of one rank whose shapes are known to broadcast (each axis equal or
        1): a residual Add, or a squeeze-excitation gate x * sigmoid(s) of shape [N, C, 1, 1].
        ONNX Runtime's QLinearAdd/QLinearMul broadcast too."""
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None or len(sa) != len(sb) or not sa:
            return False
        return all(x == y or x == 1 or y == 1 for x, y in zip(sa, sb))

    def shape(self, t: str):
        ty = self.types.get(t)
        if ty is None or not ty.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_param or d.dim_value for d in ty.tensor_type.shape.dim)

    def fuse_activation(self, out: str, nodes: list, i: int, skip: set) -> tuple[Optional[Activation], str]:
        """A Relu/Clip with constant bounds reading ``out`` alone, right after it: fused."""
        if not self.sole_reader(out):
            return None, out
        for j in range(i + 1, len(nodes)):
            m = nodes[j]
            if out not in m.input:
                continue
            if m.op_type == "Relu":
                skip.add(j)
                return Activation(0.0, None), m.output[0]
            if m.op_type == "Clip":
                a = _attrs(m)
                lo = a.get("min", None) if len(m.input) < 2 else self.const(m.input[1])
                hi = a.get("max", None) if len(m.input) < 3 else self.const(m.input[2])
                if (len(m.input) > 1 and m.input[1] and lo is None) or (len(m.input) > 2 and m.input[2] and hi is None):
                    return None, out  # bounds computed at run time: a float node
                skip.add(j)
                return Activation(None if lo is None else float(lo), None if hi is None else float(hi)), m.output[0]
            return None, out
        return None, out

    def channel_affine(self, m: onnx.NodeProto, x: str, channels: int):
        """(scale, shift) per output channel if ``m`` is BatchNormalization, or Mul/Add by a
        constant that broadcasts per channel (shape [C,1,1], [1,C,1,1] or a scalar), of ``x``."""
        if m.op_type == "BatchNormalization" and len(m.output) == 1 and m.input[0] == x and \
                all(self.const(t) is not None for t in m.input[1:5]):
            gamma, beta, mean, var = (self.const(t).astype(np.float64).reshape(-1) for t in m.input[1:5])
            k = gamma / np.sqrt(var + float(_attrs(m).get("epsilon", 1e-5)))
            return k, beta - mean * k
        if m.op_type not in ("Mul", "Add") or len(m.input) != 2:
            return None
        c = self.const(m.input[1] if m.input[0] == x else m.input[0])
        if c is None or not np.issubdtype(c.dtype, np.floating) or c.ndim > 4:
            return None
        shape = (1,) * (4 - c.ndim) + c.shape
        if c.size not in (1, channels) or (c.size == channels and channels > 1 and shape != (1, channels, 1, 1)):
            return None
        v = np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,))
        return (v, np.zeros(channels)) if m.op_type == "Mul" else (np.ones(channels), v)

    def conv(self, i, n, name, a, nodes, skip) -> bool:
        w = self.const(n.input[1]) if len(n.input) > 1 else None
        if w is None or w.ndim != 4 or self.rank(n.input[0]) != 4 or not self.is_float(n.input[0]):
            return False
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            return False
        b = self.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if len(n.input) > 2 and n.input[2] and b is None:
            return False
        w, b = w.astype(np.float32), None if b is None else b.astype(np.float32)
        out = n.output[0]
        # BatchNormalization, and per-channel constant Mul/Add (BatchNorm as Paddle2ONNX writes it),
        # folded into the conv while each alone reads the output before it: one INT8 conv kernel
        # instead of a float tail (and exact: the fold is what a BatchNorm-folding export does)
        c_out = w.shape[0]
        while self.sole_reader(out):
            j, m = next(((j, m) for j, m in enumerate(nodes[i + 1:], i + 1) if out in m.input), (None, None))
            if m is None:
                break
            k = self.channel_affine(m, out, c_out)
            if k is None:
                break
            scale, shift = k
            w = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
            b = ((np.zeros(c_out) if b is None else b.astype(np.float64)) * scale + shift).astype(np.float32)
            skip.add(j)
            out, i = m.output[0], j
        act, out = self.fuse_activation(out, nodes, i, skip)
        pads = tuple(a.get("pads", [0, 0, 0, 0])) if auto == "NOTSET" else (0, 0, 0, 0)
        self.emit(name, "conv", [n.input[0]], out, weight=torch.from_numpy(np.array(w, order="C")),
                  bias=None if b is None else torch.from_numpy(np.array(b, order="C")), activation=act,
                  attrs=dict(stride=tuple(a.get("strides", [1, 1])), pads=pads, dilation=tuple(a.get("dilations", [1, 1])),
                             groups=int(a.get("group", 1))))
        return True

    def linear(self, i, n, name, a, nodes, skip) -> bool:
        x, wn = n.input[0], n.input[1]
        w = self.const(wn)
        if n.op_type == "MatMul" and w is None and x not in self.consts and self.is_float(x) and \
                self.is_float(wn) and self.is_float(n.output[0]) and (self.rank(x) or 0) >= 2 and (self.rank(wn) or 0) >= 2:
            # activation x activation (attention Q.K^T and P.V): an integer kernel with both inputs quantized
            self.emit(name, "matmul", [x, wn], n.output[0])
            return True
        if w is None or w.ndim != 2 or x in self.consts or not self.is_float(x):
            return False
        rank = self.rank(x)
        bias = None
        out = n.output[0]
        if n.op_type == "Gemm":
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0) or rank != 2:
                return False
            weight = w if a.get("transB", 0) else w.T
            if len(n.input) > 2 and n.input[2]:
                bias = self.const(n.input[2])
                if bias is None or bias.size != weight.shape[0]:
                    return False
                bias = bias.reshape(-1)
        else:  # MatMul: x @ W
            if rank is None or rank < 2:
                return False
            weight = w.T
            if self.sole_reader(out):  # a constant bias Add right after it
                for j in range(i + 1, len(nodes)):
                    m = nodes[j]
                    if out in m.input:
                        other = m.input[1] if m.input[0] == out else m.input[0]
                        c = self.const(other)
                        if m.op_type == "Add" and c is not None and c.size == weight.shape[0] and c.ndim <= rank:
                            bias = c.reshape(-1)
                            skip.add(j)
                            out = m.output[0]
                            i = j
                        break
        act, out = self.fuse_activation(out, nodes, i, skip)
        self.emit(name, "linear", [x], out, weight=torch.from_numpy(np.array(weight, np.float32, order="C")),
                  bias=None if bias is None else torch.from_numpy(np.array(bias, np.float32, order="C")),
                  activation=act, attrs=dict(rank=rank))
        return True


def graph_from_onnx(model: onnx.ModelProto, runner=None) -> Graph:
    """The IR of an FP32 ONNX model. ``runner`` (default: a FloatNodeRunner for ``model``)
    runs the float nodes in the simulation."""
    from .onnx_ops import FloatNodeRunner, load_model

    model = load_model(model)
    runner = runner or FloatNodeRunner(model)
    return _Translator(model, runner).run()
