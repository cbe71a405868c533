"""Capture a PyTorch model as the graph IR, through ``torch.export``.

``torch.export`` gives a complete aten-level graph without running Python control flow at
export time, and it is the recommended self-contained model format. This module translates
its ops into the IR and folds what deployment folds anyway:

- BatchNorm after a Conv/Linear is folded into its weights (inference statistics).
- A zero ``pad`` feeding a Conv becomes the Conv's (possibly asymmetric) padding. Without
  this, a Pad node would sit between DequantizeLinear and Conv and ONNX Runtime could not
  fuse the Conv into QLinearConv; TensorRT likewise wants no Q/DQ between Pad and Conv.
- ReLU/ReLU6/hardtanh/clamp after a Conv, Linear or Add is fused into it, because the
  quantizer that follows makes it free in both backends.
- Dropout and other identities are dropped (inference).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..errors import QwtError
from ..graph.ir import Activation, Graph, Node
from ..graph.ops import OPS, Role

aten = torch.ops.aten

_IDENTITY = {
    aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.feature_dropout.default,
}
_SKIP = {"_guards_fn"}
_SKIP_FUNCS = {aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}


def export_program(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` a module in eval mode, with a readable error when it cannot be traced.

    A module whose inputs are not one float image tensor (token ids and an attention mask)
    says how to trace it: ``model.example_inputs()`` returns ``(args, dynamic_shapes)`` for
    ``torch.export.export``; ``example`` is then unused. Why a method and not flags: only the
    model knows its input dtypes and which axes are dynamic (batch, sequence)."""
    model = model.eval()
    args, dynamic = ((example,), None)
    if callable(getattr(model, "example_inputs", None)):
        args, dynamic = model.example_inputs()
    try:
        with torch.no_grad():
            return torch.export.export(model, tuple(args), dynamic_shapes=dynamic)
    except Exception as e:  # torch raises many types here; all mean "not exportable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QwtError(
            f"torch.export could not trace the model ({type(e).__name__}: {first[:200]})",
            "make the forward traceable by torch.export (no data-dependent Python control flow), "
            "or save a torch.export program yourself with torch.export.save and pass that file",
        ) from None


def capture(program: torch.export.ExportedProgram) -> Graph:
    """Translate an exported program into the IR (single tensor input, tensor outputs)."""
    gm = program.module()
    return _Translator(gm).run()


def _hint_shape(shape) -> tuple[int, ...]:
    """Example sizes of a possibly symbolic shape (dynamic axes take their traced size)."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            hint = getattr(getattr(d, "node", None), "hint", None)
            out.append(int(hint) if hint is not None else 1)
    return tuple(out)


def _module_path(fx_node) -> str:
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return fx_node.name
    path = list(stack.values())[-1][0]
    return path or fx_node.name


class _Translator:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}  # fx value name -> IR value name
        self.consts: dict[str, torch.Tensor] = {}
        self.by_output: dict[str, Node] = {}
        self.use_count: dict[str, int] = {}
        self.names: set[str] = set()
        self.inputs: list[str] = []
        self.shapes: dict[str, tuple] = {}
        self.batch: Any = None
        self.out_shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.dim_names: dict[str, tuple] = {}
        self.sym_names: dict[str, str] = {}  # symbolic size (str) -> axis name
        self.sym: dict[str, tuple[str, int]] = {}  # fx sym_size node -> (IR value, dim)
        # IR values computed only from integer inputs (ids, masks) and constants, e.g. the
        # additive attention mask; every other value is an activation
        self.aux: set[str] = set()

    # -- helpers -------------------------------------------------------------------------
    def _get_attr(self, target: str) -> torch.Tensor:
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj.detach().clone().float() if obj.is_floating_point() else obj.detach().clone()

    def _val(self, a) -> str:
        return self.alias.get(a.name, a.name)

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}#{i}"
        self.names.add(name)
        return name

    def _emit(self, fx_node, op: str, inputs: list[str], suffix: str = "", **kw) -> Node:
        """``suffix``: one fx op that becomes several IR nodes names the inner values fx.name+suffix."""
        name = self._unique(_module_path(fx_node) if OPS[op].role is Role.WEIGHTED else fx_node.name + suffix)
        n = Node(name=name, op=op, inputs=inputs, output=fx_node.name + suffix, **kw)
        self.nodes.append(n)
        self.by_output[n.output] = n
        if op != "embedding" and inputs and all(v in self.aux for v in inputs):
            self.aux.add(n.output)
        return n

    def _record_dims(self, value: str, shape) -> None:
        """Name the symbolic (dynamic) axes of a graph input/output: the first input's dim 0
        is "batch", the next new symbol "seq", then "dim2", ... Static shapes record nothing."""
        if all(isinstance(d, int) for d in shape):
            return
        dims = []
        for i, d in enumerate(shape):
            if isinstance(d, int):
                dims.append(int(d))
                continue
            key = str(d)
            if key not in self.sym_names:
                k = len(self.sym_names)
                self.sym_names[key] = "batch" if k == 0 and i == 0 else ("seq" if "seq" not in self.sym_names.values()
                                                                          else f"dim{k}")
            dims.append(self.sym_names[key])
        self.dim_names[value] = tuple(dims)

    def _is_act(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and a.name not in self.consts and self._val(a) not in self.aux

    def _sole_user(self, fx_node):
        users = list(fx_node.users)
        return users[0] if len(users) == 1 else None

    def _unsupported(self, fx_node, why: str = "") -> QwtError:
        where = _module_path(fx_node)
        supported = "conv2d, linear, batch_norm (after conv/linear), relu/relu6/hardtanh/clamp, add, mul, " \
                    "sigmoid, silu, adaptive_avg_pool2d/mean, avg/max_pool2d, cat, flatten/view/reshape, pad, dropout; " \
                    "transformers: linear on (batch, tokens, dim), matmul/bmm, transpose/permute, layer_norm, softmax, " \
                    "gelu, embedding, unsqueeze, sum, div, linalg_vector_norm, add/mul of constants"
        return QwtError(
            f"unsupported operator {fx_node.target} at '{where}'{': ' + why if why else ''}",
            f"replace it with supported ops ({supported}) or open an issue with the model",
        )

    # -- translation ----------------------------------------------------------------------
    def run(self) -> Graph:
        outputs: list[str] = []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                val = n.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    raise QwtError(f"model input '{n.name}' is not a tensor", "export a model whose forward takes one tensor")
                self.inputs.append(n.name)
                self.shapes[n.name] = _hint_shape(val.shape)
                self.batch = val.shape[0]
                if val.dtype != torch.float32:
                    self.dtypes[n.name] = val.dtype
                if not val.dtype.is_floating_point:
                    self.aux.add(n.name)
                self._record_dims(n.name, val.shape)
            elif n.op == "get_attr":
                self.consts[n.name] = self._get_attr(n.target)
            elif n.op == "call_module":
                if n.target not in _SKIP:
                    raise self._unsupported(n, "call_module")
            elif n.op == "call_function":
                self._call(n)
            elif n.op == "output":
                for o in torch.utils._pytree.tree_leaves(n.args[0]):
                    if o is None:
                        continue
                    outputs.append(self._val(o))
                    self.out_shapes[self._val(o)] = _hint_shape(o.meta["val"].shape)
                    self._record_dims(self._val(o), o.meta["val"].shape)
        if not self.inputs:
            raise QwtError("the model takes no tensor input", "export a model whose forward takes tensors")
        g = Graph(inputs=self.inputs, input_shapes=self.shapes, nodes=self.nodes, outputs=outputs,
                  output_shapes=self.out_shapes, input_dtypes=self.dtypes, dim_names=self.dim_names)
        _fuse_activations(g)
        return g

    def _is_const(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and a.name in self.consts

    def _call(self, n) -> None:
        t, args = n.target, n.args
        if t in _SKIP_FUNCS:
            return
        if t in _IDENTITY:
            self.alias[n.name] = self._val(args[0])
            return
        if t is aten.sym_size.int:
            self.sym[n.name] = (self._val(args[0]), int(args[1]))
            return  # only used by reshapes and sequence-length slices; handled there
        if self._fold_constant(n):
            return
        if t is aten.conv2d.default:
            x, w = args[0], self.consts[args[1].name]
            b = self.consts[args[2].name] if len(args) > 2 and args[2] is not None else None
            stride = list(args[3]) if len(args) > 3 else [1, 1]
            pad = list(args[4]) if len(args) > 4 else [0, 0]
            if isinstance(pad, str) or isinstance(args[4] if len(args) > 4 else 0, str):
                raise self._unsupported(n, "string padding")
            dil = list(args[5]) if len(args) > 5 else [1, 1]
            groups = args[6] if len(args) > 6 else 1
            pads = [pad[0], pad[1], pad[0], pad[1]]
            src = self._val(x)
            prev = self.by_output.get(src)
            if prev is not None and prev.op == "pad_pending" and self.use_count.get(src, 0) <= 1:
                t0, l0, b0, r0 = prev.attrs["pads"]
                pads = [pads[0] + t0, pads[1] + l0, pads[2] + b0, pads[3] + r0]
                src = prev.inputs[0]
                self.nodes.remove(prev)
            self._emit(n, "conv", [src], weight=w, bias=b,
                       attrs=dict(stride=stride, pads=pads, dilation=dil, groups=groups))
            return
        if t is aten.linear.default:
            w = self.consts[args[1].name]
            b = self.consts[args[2].name] if len(args) > 2 and args[2] is not None else None
            rank = len(n.args[0].meta["val"].shape)
            if w.dim() != 2 or rank < 2:
                raise self._unsupported(n, "linear needs a 2-D weight and an input of rank >= 2")
            # rank 2: Gemm (unchanged); rank >= 3 (batch, tokens, dim): MatMul, see ops.linear_as_matmul
            self._emit(n, "linear", [self._val(args[0])], weight=w, bias=b, attrs=dict(rank=rank) if rank > 2 else {})
            return
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            self._batch_norm(n)
            return
        if t is operator.getitem:
            # only BatchNorm's tuple output reaches here (element 0 = the normalized tensor)
            if args[1] != 0:
                raise self._unsupported(n)
            self.alias[n.name] = self._val(args[0])
            return
        if t in (aten.pad.default, aten.constant_pad_nd.default):
            pad = list(args[1])
            mode = args[2] if t is aten.pad.default and len(args) > 2 else "constant"
            value = (args[3] if len(args) > 3 else None) if t is aten.pad.default else (args[2] if len(args) > 2 else 0)
            user = self._sole_user(n)
            if mode == "constant" and not value and len(pad) == 4 and user is not None and user.target is aten.conv2d.default:
                l, r, tp, btm = pad
                node = Node(name=n.name, op="pad_pending", inputs=[self._val(args[0])], output=n.name,
                            attrs=dict(pads=[tp, l, btm, r]))
                self.nodes.append(node)
                self.by_output[n.name] = node
                return
            raise self._unsupported(n, "only zero padding that feeds a conv is supported")
        if t in (aten.relu.default, aten.relu_.default):
            self._emit(n, "clip", [self._val(args[0])], attrs=dict(lo=0.0, hi=None))
            return
        if t in (aten.hardtanh.default, aten.hardtanh_.default, aten.relu6.default):
            lo, hi = (0.0, 6.0) if t is aten.relu6.default else (float(args[1]) if len(args) > 1 else -1.0, float(args[2]) if len(args) > 2 else 1.0)
            self._emit(n, "clip", [self._val(args[0])], attrs=dict(lo=lo, hi=hi))
            return
        if t is aten.clamp.default:
            lo = args[1] if len(args) > 1 else n.kwargs.get("min")
            hi = args[2] if len(args) > 2 else n.kwargs.get("max")
            lo, hi = (float(lo) if lo is not None else None), (float(hi) if hi is not None else None)
            self._emit(n, "clip", [self._val(args[0])], attrs=dict(lo=lo, hi=hi))
            return
        if t in (aten.add.Tensor, aten.mul.Tensor) and not (self._is_act(args[0]) and self._is_act(args[1])):
            self._float_binary(n)
            return
        if t in (aten.add.Tensor, aten.mul.Tensor):
            a, b = args[0], args[1]
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or self._is_const(a) or self._is_const(b):
                raise self._unsupported(n, "only tensor-tensor add/mul of activations is supported")
            if t is aten.add.Tensor and n.kwargs.get("alpha", 1) != 1:
                raise self._unsupported(n, "add with alpha != 1")
            self._emit(n, "add" if t is aten.add.Tensor else "mul", [self._val(a), self._val(b)])
            return
        if t is aten.sigmoid.default:
            self._emit(n, "sigmoid", [self._val(args[0])])
            return
        if t is aten.silu.default:
            self._emit(n, "silu", [self._val(args[0])])
            return
        if t is aten.adaptive_avg_pool2d.default:
            if list(args[1]) != [1, 1]:
                raise self._unsupported(n, "only global (1x1) adaptive average pooling")
            self._emit(n, "gap", [self._val(args[0])])
            return
        if t is aten.mean.dim:
            dims = sorted(d % 4 for d in args[1])
            keep = args[2] if len(args) > 2 else n.kwargs.get("keepdim", False)
            in_rank = len(n.args[0].meta["val"].shape)
            if in_rank != 4 and 0 not in [d % in_rank for d in args[1]]:  # token mean-pool (batch, tokens, dim)
                self._emit(n, "mean", [self._val(args[0])],
                           attrs=dict(dims=sorted(d % in_rank for d in args[1]), keepdim=bool(keep)))
                return
            if len(n.args[0].meta["val"].shape) != 4 or dims != [2, 3]:
                raise self._unsupported(n, "only mean over the spatial dims of an NCHW tensor")
            if keep:
                self._emit(n, "gap", [self._val(args[0])])
            else:
                gap = Node(name=self._unique(n.name + "_gap"), op="gap", inputs=[self._val(args[0])], output=n.name + "_gap")
                self.nodes.append(gap)
                self._emit(n, "flatten", [gap.output])
            return
        if t in (aten.max_pool2d.default, aten.avg_pool2d.default):
            k = list(args[1])
            s = list(args[2]) if len(args) > 2 and args[2] else k
            p = list(args[3]) if len(args) > 3 else [0, 0]
            if t is aten.max_pool2d.default:
                if (len(args) > 4 and list(args[4]) != [1, 1]) or (len(args) > 5 and args[5]):
                    raise self._unsupported(n, "dilated or ceil-mode max pooling")
                self._emit(n, "maxpool", [self._val(args[0])], attrs=dict(kernel=k, stride=s, padding=p))
            else:
                if len(args) > 4 and args[4]:
                    raise self._unsupported(n, "ceil-mode average pooling")
                cip = args[5] if len(args) > 5 else True
                self._emit(n, "avgpool", [self._val(args[0])], attrs=dict(kernel=k, stride=s, padding=p, count_include_pad=cip))
            return
        if t is aten.cat.default:
            axis = args[1] if len(args) > 1 else 0
            rank = len(n.meta["val"].shape)
            self._emit(n, "concat", [self._val(a) for a in args[0]], attrs=dict(axis=axis % rank))
            return
        if t is aten.flatten.using_ints:
            rank = len(n.args[0].meta["val"].shape)
            start = args[1] if len(args) > 1 else 0
            end = args[2] if len(args) > 2 else -1
            if start % rank != 1 or end % rank != rank - 1:  # e.g. ViT patches: flatten(2) of B x D x H x W
                in_shape = n.args[0].meta["val"].shape
                after = [in_shape[j] for j in range(end % rank + 1, rank)]
                if start % rank == 0 or not all(isinstance(d, int) for d in after):
                    raise self._unsupported(n, "flatten of the batch dim or before a dynamic dim")
                self._emit(n, "reshape_nd", [self._val(args[0])],
                           attrs=dict(shape=[0] * (start % rank) + [-1] + [int(d) for d in after]))
                return
            self._emit(n, "flatten", [self._val(args[0])])
            return
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            shape = list(args[1])
            in_shape = n.args[0].meta["val"].shape
            first = shape[0]
            is_batch = isinstance(first, torch.fx.Node) or first == in_shape[0]
            rest = shape[1:]
            if not is_batch or any(isinstance(d, torch.fx.Node) for d in rest):
                self._emit(n, "reshape_nd", [self._val(args[0])], attrs=dict(shape=self._onnx_shape(n, shape)))
                return
            if len(rest) == 1 and rest[0] == -1 or (len(rest) == 1 and len(in_shape) > 1 and rest[0] == int(torch.tensor(in_shape[1:]).prod())):
                self._emit(n, "flatten", [self._val(args[0])])
            else:
                self._emit(n, "reshape", [self._val(args[0])], attrs=dict(shape=[int(d) for d in rest]))
            return
        if self._transformer_op(n):
            return
        raise self._unsupported(n)

    # -- transformer ops ---------------------------------------------------------------
    def _fold_constant(self, n) -> bool:
        """Evaluate an op whose tensor arguments are all constants (e.g. selecting the
        token-type-0 row of an embedding table) once, at capture time."""
        nodes = [a for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, torch.fx.Node)]
        if not nodes or not all(a.name in self.consts for a in nodes):
            return False
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: self.consts[a.name] if isinstance(a, torch.fx.Node) else a, (n.args, n.kwargs))
        out = n.target(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return False
        self.consts[n.name] = out.detach().clone()
        return True

    def _scalar_or_const(self, a) -> torch.Tensor | None:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return torch.tensor(float(a))
        if isinstance(a, torch.fx.Node) and a.name in self.consts:
            return self.consts[a.name].float()
        return None

    def _float_binary(self, n) -> None:
        """add/mul where an operand is a constant or mask-derived: runs in float."""
        a, b = n.args[0], n.args[1]
        if n.target is aten.add.Tensor and n.kwargs.get("alpha", 1) != 1:
            raise self._unsupported(n, "add with alpha != 1")
        add = n.target is aten.add.Tensor
        ca, cb = self._scalar_or_const(a), self._scalar_or_const(b)
        if ca is not None and cb is None:
            a, b, ca, cb = b, a, cb, ca  # both ops commute
        if cb is not None:
            self._emit(n, "add_const" if add else "mul_const", [self._val(a)], weight=cb)
            return
        self._emit(n, "add_float" if add else "mul_float", [self._val(a), self._val(b)])

    def _onnx_shape(self, n, shape) -> list[int]:
        """A reshape target in ONNX Reshape terms: 0 copies the input's dim at that position
        (how the dynamic batch and sequence axes survive), -1 is inferred."""
        in_shape = n.args[0].meta["val"].shape
        out = []
        for i, d in enumerate(shape):
            if isinstance(d, torch.fx.Node):
                sym = d.meta.get("val")
                same = i < len(in_shape) and str(in_shape[i]) == str(sym)
                out.append(0 if same else -1)
            elif i == 0 and d == in_shape[0]:
                out.append(0)  # the batch axis stays dynamic in the exported graph
            else:
                out.append(int(d))
        if out.count(-1) > 1:
            raise self._unsupported(n, "reshape with more than one size computed from the input shape")
        return out

    def _transformer_op(self, n) -> bool:
        t, args, kw = n.target, n.args, n.kwargs
        rank = len(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
        x = self._val(args[0]) if args and isinstance(args[0], torch.fx.Node) else None
        if t is aten.layer_norm.default:
            shape = list(args[1])
            if len(shape) != 1:
                raise self._unsupported(n, "layer_norm over more than the last dim")
            w = self.consts[args[2].name] if len(args) > 2 and args[2] is not None else None
            b = self.consts[args[3].name] if len(args) > 3 and args[3] is not None else None
            eps = args[4] if len(args) > 4 else 1e-5
            self._emit(n, "layer_norm", [x], weight=w, bias=b, attrs=dict(eps=float(eps), dim=int(shape[0])))
        elif t is aten.gelu.default:
            self._emit(n, "gelu", [x], attrs=dict(approximate=kw.get("approximate", args[1] if len(args) > 1 else "none")))
        elif t in (aten.softmax.int, aten._softmax.default):
            self._emit(n, "softmax", [x], attrs=dict(axis=int(args[1]) % rank))
        elif t in (aten.matmul.default, aten.bmm.default):
            if not (self._is_act(args[0]) and self._is_act(args[1])):
                raise self._unsupported(n, "matmul with a constant operand (use nn.Linear)")
            self._emit(n, "matmul", [x, self._val(args[1])])
        elif t is aten.transpose.int:
            perm = list(range(rank))
            d0, d1 = args[1] % rank, args[2] % rank
            perm[d0], perm[d1] = perm[d1], perm[d0]
            self._emit(n, "transpose", [x], attrs=dict(perm=perm))
        elif t is aten.permute.default:
            self._emit(n, "transpose", [x], attrs=dict(perm=[d % rank for d in args[1]]))
        elif t is aten.scaled_dot_product_attention.default:
            self._sdpa(n)
        elif t is aten.t.default:
            self._emit(n, "transpose", [x], attrs=dict(perm=[1, 0]))
        elif t is aten.embedding.default:
            self._emit(n, "embedding", [self._val(args[1])], weight=self.consts[args[0].name])
        elif t is aten.slice.Tensor and args[0].name in self.consts:
            dim = args[1] if len(args) > 1 else 0
            start = args[2] if len(args) > 2 else None
            end = args[3] if len(args) > 3 else None
            step = args[4] if len(args) > 4 else 1
            if dim != 0 or start not in (None, 0) or step != 1 or not (isinstance(end, torch.fx.Node) and end.name in self.sym):
                raise self._unsupported(n, "only table[:seq_len] slices of a constant (position embeddings)")
            ref, ref_dim = self.sym[end.name]
            self._emit(n, "slice_rows", [ref], weight=self.consts[args[0].name], attrs=dict(dim=ref_dim))
        elif t is aten.unsqueeze.default:
            self._emit(n, "unsqueeze", [x], attrs=dict(axes=[int(args[1]) % rank]))
        elif t in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout):
            dtype = kw.get("dtype", args[1] if len(args) > 1 and t is aten.to.dtype else None)
            if dtype not in (None, torch.float32):
                raise self._unsupported(n, f"cast to {dtype}")
            if args[0].meta["val"].dtype == torch.float32:
                self.alias[n.name] = x
            else:
                self._emit(n, "cast_float", [x])
        elif t is aten.rsub.Scalar:
            if kw.get("alpha", args[2] if len(args) > 2 else 1) != 1:
                raise self._unsupported(n, "rsub with alpha != 1")
            self._emit(n, "rsub_const", [x], attrs=dict(value=float(args[1])))
        elif t is aten.sum.dim_IntList:
            in_rank = len(args[0].meta["val"].shape)
            keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
            self._emit(n, "sum", [x], attrs=dict(dims=sorted(d % in_rank for d in args[1]), keepdim=bool(keep)))
        elif t is aten.div.Tensor and isinstance(args[1], torch.fx.Node) and not kw.get("rounding_mode"):
            self._emit(n, "div", [x, self._val(args[1])])
        elif t is aten.linalg_vector_norm.default:
            order = args[1] if len(args) > 1 else kw.get("ord", 2)
            dims = args[2] if len(args) > 2 else kw.get("dim")
            keep = args[3] if len(args) > 3 else kw.get("keepdim", False)
            in_rank = len(args[0].meta["val"].shape)
            if order != 2 or dims is None:
                raise self._unsupported(n, "only the L2 norm over given dims")
            self._emit(n, "l2norm", [x], attrs=dict(dims=sorted(d % in_rank for d in dims), keepdim=bool(keep)))
        else:
            return False
        return True

    def _sdpa(self, n) -> None:
        """scaled_dot_product_attention as the eager ops it stands for, so that Q.K^T and P.V
        become activation x activation INT8 MatMuls: softmax(Q.K^T * scale + mask) . V."""
        args, kw = n.args, n.kwargs
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args), **kw)
        if a.get("is_causal") or a.get("dropout_p") or a.get("enable_gqa"):
            raise self._unsupported(n, "causal / dropout / grouped-query attention")
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        if mask is not None and mask.meta["val"].dtype == torch.bool:
            raise self._unsupported(n, "boolean attention mask; pass an additive float mask")
        rank = len(q.meta["val"].shape)
        head_dim = q.meta["val"].shape[-1]
        if not isinstance(head_dim, int):
            raise self._unsupported(n, "dynamic head dimension")
        scale = a.get("scale") or head_dim ** -0.5
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        kt = self._emit(n, "transpose", [self._val(k)], suffix="/k_t", attrs=dict(perm=perm))
        s = self._emit(n, "matmul", [self._val(q), kt.output], suffix="/scores")
        s = self._emit(n, "mul_const", [s.output], suffix="/scaled", weight=torch.tensor(float(scale)))
        if mask is not None:
            s = (self._emit(n, "add_const", [s.output], suffix="/masked", weight=self.consts[mask.name].float())
                 if mask.name in self.consts else self._emit(n, "add_float", [s.output, self._val(mask)], suffix="/masked"))
        p = self._emit(n, "softmax", [s.output], suffix="/probs", attrs=dict(axis=rank - 1))
        self._emit(n, "matmul", [p.output, self._val(v)])

    def _batch_norm(self, n) -> None:
        args = n.args
        if n.target is aten.batch_norm.default:
            x, g, b, mean, var = args[:5]
            training, eps = args[5], args[7]
        else:
            x, g, b, mean, var = args[:5]
            training, eps = False, args[6]
        if training:
            raise self._unsupported(n, "BatchNorm in training mode; call model.eval() before export")
        gamma = self.consts[g.name] if g is not None else None
        beta = self.consts[b.name] if b is not None else None
        mu, v = self.consts[mean.name], self.consts[var.name]
        inv = 1.0 / torch.sqrt(v.double() + eps)
        scale = (gamma.double() if gamma is not None else 1.0) * inv
        shift = (beta.double() if beta is not None else 0.0) - mu.double() * scale
        src = self._val(x)
        prev = self.by_output.get(src)
        if prev is not None and prev.op in ("conv", "linear") and len(x.users) == 1:
            w = prev.weight.double()
            prev.weight = (w * scale.reshape((-1,) + (1,) * (w.dim() - 1))).float()
            b0 = prev.bias.double() if prev.bias is not None else torch.zeros_like(scale)
            prev.bias = (b0 * scale + shift).float()
            self.alias[n.name] = src
            return
        rank = len(n.args[0].meta["val"].shape)
        self._emit(n, "channel_affine", [src], weight=scale.float(), bias=shift.float(), attrs=dict(rank=rank))


def _fuse_activations(g: Graph) -> None:
    """Fold a clip/relu into the Conv/Linear/Add that feeds it when it is the sole reader."""
    consumers = g.consumers()
    producer = g.producer()
    for n in list(g.nodes):
        if n.op != "clip":
            continue
        src = producer.get(n.inputs[0])
        if src is None or src.activation is not None or len(consumers[src.output]) != 1 or src.output in g.outputs:
            continue
        if OPS[src.op].role is Role.WEIGHTED or src.op == "add":
            src.activation = Activation(n.attrs.get("lo"), n.attrs.get("hi"))
            # the fused node now produces the clip's output value
            old = src.output
            src.output = n.output
            g.nodes.remove(n)
            del producer[old]
            producer[src.output] = src
    for n in g.nodes:
        if n.op == "pad_pending":
            raise QwtError(f"padding '{n.name}' could not be folded into a conv", "use Conv2d padding instead of a separate pad")
