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
    """``torch.export`` a module in eval mode, with a readable error when it cannot be traced."""
    model = model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,))
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

    def _emit(self, fx_node, op: str, inputs: list[str], **kw) -> Node:
        name = self._unique(_module_path(fx_node) if OPS[op].role is Role.WEIGHTED else fx_node.name)
        n = Node(name=name, op=op, inputs=inputs, output=fx_node.name, **kw)
        self.nodes.append(n)
        self.by_output[n.output] = n
        return n

    def _sole_user(self, fx_node):
        users = list(fx_node.users)
        return users[0] if len(users) == 1 else None

    def _unsupported(self, fx_node, why: str = "") -> QwtError:
        where = _module_path(fx_node)
        supported = "conv2d, linear, batch_norm (after conv/linear), relu/relu6/hardtanh/clamp, add, mul, " \
                    "sigmoid, silu, adaptive_avg_pool2d/mean, avg/max_pool2d, cat, flatten/view/reshape, pad, dropout"
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
                self.shapes[n.name] = tuple(val.shape)
                self.batch = val.shape[0]
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
                    self.out_shapes[self._val(o)] = tuple(o.meta["val"].shape)
        if len(self.inputs) != 1:
            raise QwtError(f"the model takes {len(self.inputs)} tensor inputs", "qwt-export supports models with exactly one input tensor")
        g = Graph(inputs=self.inputs, input_shapes=self.shapes, nodes=self.nodes, outputs=outputs,
                  output_shapes=self.out_shapes)
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
            return  # only used to compute a batch-preserving reshape; handled there
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
            if w.dim() != 2 or len(n.args[0].meta["val"].shape) != 2:
                raise self._unsupported(n, "linear on a tensor of rank != 2 (transformer support is planned)")
            self._emit(n, "linear", [self._val(args[0])], weight=w, bias=b)
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
            lo = float(args[1]) if len(args) > 1 and args[1] is not None else None
            hi = float(args[2]) if len(args) > 2 and args[2] is not None else None
            self._emit(n, "clip", [self._val(args[0])], attrs=dict(lo=lo, hi=hi))
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
            if start % rank != 1 or end % rank != rank - 1:
                raise self._unsupported(n, "only flatten(x, 1)")
            self._emit(n, "flatten", [self._val(args[0])])
            return
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            shape = list(args[1])
            in_shape = n.args[0].meta["val"].shape
            first = shape[0]
            is_batch = isinstance(first, torch.fx.Node) or first == in_shape[0]
            rest = shape[1:]
            if not is_batch or any(isinstance(d, torch.fx.Node) for d in rest):
                raise self._unsupported(n, "only reshapes that keep the batch dimension first")
            if len(rest) == 1 and rest[0] == -1 or (len(rest) == 1 and len(in_shape) > 1 and rest[0] == int(torch.tensor(in_shape[1:]).prod())):
                self._emit(n, "flatten", [self._val(args[0])])
            else:
                self._emit(n, "reshape", [self._val(args[0])], attrs=dict(shape=[int(d) for d in rest]))
            return
        raise self._unsupported(n)

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
