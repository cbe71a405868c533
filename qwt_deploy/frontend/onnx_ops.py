"""Run any single ONNX node from PyTorch exactly as ONNX Runtime runs it.

When an FP32 ONNX graph is the pipeline's source, the quantizable nodes (Conv, ConvTranspose,
Gemm, MatMul, ORT's integer ops) get our own simulation; every other node is a *float node*
that the simulation runs here and the exporter copies verbatim. :class:`FloatNodeRunner` is
built once per model and gives, for every node, ``run(node_name, inputs) -> outputs`` on torch
tensors. :func:`compare_with_onnxruntime` runs a graph node by node through a runner and
compares every intermediate with ONNX Runtime: the tool that finds a silently wrong node.

Decision: by default every node runs in its own one-node ONNX Runtime session
(``prefer="onnxruntime"``). Measured on three real graphs (table below), against onnx2torch
with a shim plus the ORT fallback (``prefer="onnx2torch"``):

- exact, not just close: every intermediate is bit-identical to the whole graph in ONNX
  Runtime (optimizations off), where onnx2torch is off by up to 2.3e-6 of a tensor's scale
  per node and 4e-5 at PP-OCR's sigmoid output after 670 nodes. An INT8 simulation feeds
  these values to QuantizeLinear, where any difference can flip a rounding. (Same kernels,
  same process; a kernel that split one reduction across threads could still differ in the
  last bit, since small nodes get a 1-thread session. None did on these graphs.);
- not slower: the whole graph runs in 0.73-0.90x the hybrid's time; the float nodes alone
  (what the pipeline routes here) in 0.91-1.17x of onnx2torch's, within this shared machine's
  run-to-run noise;
- simpler and nothing to go silently wrong: no onnx2torch, torchvision stub, version aliases,
  converter shims or per-model verification. (onnx2torch returns training-mode modules: without
  ``.eval()`` PP-OCR det's output has cosine 0.45 to ORT's on the text image here; it converts
  Resize linear/asymmetric with only a warning, and is then off by 1.04 on unit-normal data.)

Costs: sessions are built on a node's first call (0.2-1.4 s per model, once per input dtypes
and ranks); a host copy per call for tensors on a GPU; no autograd; opaque to torch.fx. For
those, ``prefer="onnx2torch"`` keeps the torch path: all three graphs convert completely with
the shim below, and :meth:`FloatNodeRunner.verify` moves any node that disagrees with ONNX
Runtime on real inputs (or raises) to a session.

Measured on the 2-core AMD EPYC (shared; load ~1.4 from other jobs), torch 2.13.0+cpu, onnxruntime 1.32.0,
onnx2torch 1.5.15, 2 threads, one real image each, warm, min (median) of 11 interleaved runs, ms:

=========================== ============ ========= ============ ============= =========== =============
model, input                nodes        o2t / ORT graph ENABLE graph DISABLE hybrid      ORT (default)
=========================== ============ ========= ============ ============= =========== =============
PP-OCRv4 det, text 736x1920 672 (342 C.) 330 / 0   222 (231)    281 (286)     441 (465)   399 (411)
nudenet 320n, astronaut     323          323 / 0   11.3 (11.6)  24.6 (29.2)   50.1 (51.3) 40.9 (43.4)
EfficientNet-Lite0, coffee  94           94 / 0    4.9 (5.4)    21.5 (27.8)   37.4 (40.1) 27.4 (28.2)
=========================== ============ ========= ============ ============= =========== =============

"nodes": all, with Constant nodes (runner backend "constant") in brackets; "o2t / ORT": nodes
onnx2torch converts / gives to ORT in the hybrid; "graph": the whole model in one session;
"hybrid": the runner with prefer="onnx2torch"; "ORT": the default runner.

Float nodes only (no Conv/ConvTranspose/Gemm/MatMul), fed ONNX Runtime's intermediates, min of
5, onnx2torch vs ORT sessions: PP-OCR 266 nodes 258 vs 234 ms, nudenet 259 nodes 19.9 vs 18.1,
Lite0 44 nodes 6.3 vs 5.8 (an earlier run: 366 vs 373, 25.6 vs 27.5, 6.0 vs 7.0). Largest
difference from ONNX Runtime, relative to the output's max: ORT sessions 0 everywhere;
onnx2torch per node (ORT's inputs) 2.3e-6 / 1.0e-6 / 1.2e-6, at the outputs (own values
flowing) 4.0e-5 / 1.2e-6 / 4.1e-7. Per-session threads: one intra-op pool per session only
where the first inputs have >= 32k elements (2 threads made PP-OCR 1.5x faster than 1).

The ONNX Runtime sessions: a one-node ModelProto (graph-input types from the real inputs, ranks
kept and sizes symbolic; constant inputs as initializers, as in the whole graph; output types
from ``onnx.shape_inference``), one ``InferenceSession`` per (node, input dtypes and ranks),
graph optimizations off. Only empty input *names* are dropped, never empty tensors:
Resize-11/12 requires its (usually empty) ``roi``. Nodes with subgraphs (If, Loop, Scan) are
refused when the runner is built.

The shim over onnx2torch 1.5.15 (``prefer="onnx2torch"``; it registers converters only up to
old op versions):

- version aliases for schema bumps that only added types: Shape 19/21 -> 15, Cast 19/21 -> 13,
  LessOrEqual 16 -> 12, Unsqueeze/Transpose 21, Identity 19/21, Equal 19, ConstantOfShape
  20/21, IsInf/IsNaN 20;
- our own Reshape (every version; honours ``allowzero``), Flatten (any axis; onnx2torch's
  raises IndexError at ``axis == rank``), the opset-18 Reduce family (axes as an input,
  ``noop_with_empty_axes``, which still applies the element-wise part: ReduceSumSquare gives
  x*x) and Gelu-20;
- Resize only where F.interpolate reproduces ONNX (nearest asymmetric/floor, linear
  half_pixel/align_corners), the rest to ONNX Runtime;
- Constant nodes moved to initializers first (Paddle2ONNX stores every weight as a Constant
  node; onnx2torch's Conv converter then fails with ``KeyError``), every module ``.eval()``;
- onnx2torch hard-imports torchvision (for NonMaxSuppression and RoiAlign only), which does
  not import beside this torch: a stub stands in during ``import onnx2torch`` only, and those
  two ops always go to ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import types
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .onnx_names import node_names

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

TORCH = "onnx2torch"
ORT = "onnxruntime"
CONSTANT = "constant"

# NonMaxSuppression/RoiAlign: onnx2torch needs torchvision's C++ ops (stubbed here);
# the rest: onnx2torch has no converter, so don't spend a try on them.
_ALWAYS_ORT = {("", "NonMaxSuppression"), ("", "RoiAlign")}
_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}
# a one-node session gets its own intra-op pool only if its first inputs are this big
_PARALLEL_NUMEL = 1 << 15

# onnx2torch registers converters by the op's schema since_version. These later versions only
# added tensor types (or float8/int4 types torch lacks and the converter rejects), so the older
# converter is exact for them.
_VERSION_ALIASES = {
    ("Shape", 19): 15, ("Shape", 21): 15,
    ("Cast", 19): 13, ("Cast", 21): 13,
    ("LessOrEqual", 16): 12,
    ("Unsqueeze", 21): 13, ("Transpose", 21): 13,
    ("Identity", 19): 16, ("Identity", 21): 16,
    ("Equal", 19): 13,
    ("ConstantOfShape", 20): 9, ("ConstantOfShape", 21): 9,
    ("IsInf", 20): 10, ("IsNaN", 20): 13,
}

_TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
    torch.float64: TensorProto.DOUBLE, torch.bfloat16: TensorProto.BFLOAT16,
    torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.int16: TensorProto.INT16, torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
}


class Fallback(NamedTuple):
    """A node the runner gives to ONNX Runtime, for the export report."""

    node: str
    op_type: str
    reason: str


class NodeDiff(NamedTuple):
    """One node's worst output difference from ONNX Runtime.

    ``max_rel`` is normwise: max |diff| / max |ref| over the output (elementwise relative error
    is meaningless at zeros). A dtype or shape mismatch, or a node that raised, reads as inf.
    """

    node: str
    max_abs: float
    max_rel: float


# ----------------------------------------------------------------------------- loading

def load_model(model: ModelLike) -> onnx.ModelProto:
    """A ModelProto from a path (external data loaded) or a ModelProto (returned as is)."""
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model))


def _constant_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    """The value of a Constant node as a numpy array; None for strings and sparse values."""
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "value_float":
        return np.array(a.f, dtype=np.float32)
    if a.name == "value_floats":
        return np.array(list(a.floats), dtype=np.float32)
    if a.name == "value_int":
        return np.array(a.i, dtype=np.int64)
    if a.name == "value_ints":
        return np.array(list(a.ints), dtype=np.int64)
    return None


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with its (main-graph) Constant nodes moved to initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = []
    for n in m.graph.node:
        v = _constant_value(n) if n.op_type == "Constant" and n.domain in ("", "ai.onnx") else None
        if v is None:
            keep.append(n)
        else:
            m.graph.initializer.append(numpy_helper.from_array(v, n.output[0]))
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    ops = {o.domain: o.version for o in model.opset_import}
    if "ai.onnx" in ops:
        ops.setdefault("", ops["ai.onnx"])
    return ops


# ----------------------------------------------------------------------------- onnx2torch

@contextlib.contextmanager
def _torchvision_stub():
    """Let ``import onnx2torch`` succeed without torchvision (its nms/roialign converters
    import it at module level). Only the names they bind are stubbed; sys.modules is restored
    afterwards, so nothing else in the process sees the stub."""
    names = ("torchvision", "torchvision.ops")
    if "torchvision" in sys.modules:
        yield
        return
    saved = {k: sys.modules.get(k) for k in names}

    def unavailable(*args, **kwargs):
        raise NotImplementedError("torchvision is not available; this op runs in ONNX Runtime")

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = unavailable
    tv.ops = ops
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _import_onnx2torch():
    if "onnx2torch" not in sys.modules:
        with _torchvision_stub():
            import onnx2torch.node_converters  # noqa: F401
    import onnx2torch.node_converters as nc
    return nc


class _Reshape(torch.nn.Module):
    """ONNX Reshape, every version: a 0 copies the input's size unless ``allowzero=1``."""

    def __init__(self, allowzero: int = 0):
        super().__init__()
        self.allowzero = int(allowzero)

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(d) for d in shape.tolist()]
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)


class _Flatten(torch.nn.Module):
    """ONNX Flatten: (prod(shape[:axis]), prod(shape[axis:])) for any axis in [-rank, rank]."""

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = int(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis + x.dim() if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))


def _prod(x, dims, keepdim):
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


_REDUCE = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


# with no axes and noop_with_empty_axes=1 the reduction is skipped but not the element-wise
# part (ONNX Runtime and onnx.reference agree): ReduceSumSquare gives x*x, ReduceL1 |x|, ...
_NO_REDUCTION = {
    "ReduceSumSquare": lambda x: x * x,
    "ReduceL1": torch.abs,
    "ReduceL2": torch.abs,
    "ReduceLogSum": torch.log,
}


class _ReduceAxesInput(torch.nn.Module):
    """The Reduce ops from opset 18 (ReduceSum from 13): ``axes`` is an optional input; absent or
    empty axes reduce everything, or nothing if ``noop_with_empty_axes``."""

    def __init__(self, op: str, keepdims: int = 1, noop_with_empty_axes: int = 0):
        super().__init__()
        self.op, self.keepdims, self.noop = op, bool(keepdims), bool(noop_with_empty_axes)

    def forward(self, x: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        if axes is None or axes.numel() == 0:
            if self.noop:
                return _NO_REDUCTION.get(self.op, torch.clone)(x)
            dims = list(range(x.dim()))
        else:
            dims = [int(a) for a in axes.reshape(-1).tolist()]
        if not dims:  # a rank-0 input: nothing to reduce (torch would read dim=[] as "all")
            return _NO_REDUCTION.get(self.op, torch.clone)(x)
        return _REDUCE[self.op](x, dims, self.keepdims)


class _Gelu(torch.nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate=self.approximate)


def _shim_converter(op_type: str, since: int):
    """Our converter for (op_type, since_version), or None to use onnx2torch's."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def wrap(make):
        return lambda node, graph: OperationConverterResult(make(node.attributes), onnx_mapping_from_node(node))

    if op_type == "Reshape":
        return wrap(lambda a: _Reshape(a.get("allowzero", 0)))
    if op_type == "Flatten":
        return wrap(lambda a: _Flatten(a.get("axis", 1)))
    if op_type in _REDUCE and (since >= 18 or op_type == "ReduceSum" and since >= 13):
        return wrap(lambda a: _ReduceAxesInput(op_type, a.get("keepdims", 1), a.get("noop_with_empty_axes", 0)))
    if op_type == "Gelu":
        return wrap(lambda a: _Gelu(a.get("approximate", "none")))
    return None


def _check_resize(node: onnx.NodeProto, since: int):
    """onnx2torch converts every Resize-10/11/13 to F.interpolate and only *warns* where the
    result differs from ONNX; accept the configurations it reproduces, refuse the rest."""
    if since < 11:  # asymmetric coordinates, and nearest rounds up when downsampling
        raise NotImplementedError("Resize-10: onnx2torch is not exact")
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    a = {k: v.decode() if isinstance(v, bytes) else v for k, v in a.items()}
    mode = a.get("mode", "nearest")
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        ok = ctm == "asymmetric" and a.get("nearest_mode", "round_prefer_floor") == "floor"
    else:  # pytorch_half_pixel differs from torch where an output size is 1; cubic's borders differ
        ok = mode == "linear" and ctm in ("half_pixel", "align_corners") and not a.get("exclude_outside", 0)
    if not ok:
        raise NotImplementedError(f"Resize mode={mode} coordinate_transformation_mode={ctm} "
                                  f"nearest_mode={a.get('nearest_mode', 'round_prefer_floor')}: onnx2torch is not exact")


def _torch_converter(node: onnx.NodeProto, opset: int):
    """The converter for this node at this opset: ours, an aliased onnx2torch one, or
    onnx2torch's. Raises NotImplementedError when there is none."""
    nc = _import_onnx2torch()
    domain = node.domain if node.domain != "ai.onnx" else ""
    try:
        since = onnx.defs.get_schema(node.op_type, max_inclusive_version=opset, domain=domain).since_version
    except Exception:  # unknown op or domain: let onnx2torch say so
        since = opset
    if domain == "" and node.op_type == "Resize":
        _check_resize(node, since)
    shim = _shim_converter(node.op_type, since) if domain == "" else None
    if shim is not None:
        return shim
    since = _VERSION_ALIASES.get((node.op_type, since), since) if domain == "" else since
    return nc.get_converter(operation_type=node.op_type, version=since, domain=domain)


class _TorchNode:
    """One node as an onnx2torch module; constant inputs are baked in at conversion."""

    def __init__(self, node: onnx.NodeProto, module: torch.nn.Module, mapping, constants: Mapping[str, torch.Tensor]):
        import inspect

        self.module = module.eval()
        self.arg_sources = []  # per module argument: ("input", index) | ("const", tensor) | None
        for name in mapping.inputs:
            if name == "":
                self.arg_sources.append(None)
            elif name in constants:
                self.arg_sources.append(("const", constants[name]))
            else:
                self.arg_sources.append(("input", list(node.input).index(name)))
        self.params = tuple(inspect.signature(self.module.forward).parameters)
        outs = list(node.output)
        self.out_index = [list(mapping.outputs).index(o) if o in mapping.outputs else None for o in outs]
        missing = [o for o, i in zip(outs, self.out_index) if o and i is None]
        if missing:
            raise NotImplementedError(f"the converter does not produce output(s) {missing}")

    def to(self, device):
        self.module.to(device)
        self.arg_sources = [("const", s[1].to(device)) if s is not None and s[0] == "const" else s
                            for s in self.arg_sources]

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        args = []
        for s in self.arg_sources:
            if s is None:
                args.append(None)
            elif s[0] == "const":
                args.append(s[1])
            else:
                args.append(inputs[s[1]] if s[1] < len(inputs) else None)
        kwargs = {}
        if None in args:  # as onnx2torch.convert does: skipped optional args become kwargs
            first = args.index(None)
            kwargs = {p: v for p, v in zip(self.params[first:], args[first:]) if v is not None}
            args = args[:first]
        with torch.no_grad():
            y = self.module(*args, **kwargs)
        ys = list(y) if isinstance(y, (tuple, list)) else [y]
        return [ys[i] if i is not None else None for i in self.out_index]


# ----------------------------------------------------------------------------- ORT fallback

def _session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # hundreds of small sessions share two cores: idle pool threads must sleep, not spin
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """numpy -> torch without np.ascontiguousarray, which turns a 0-d array into a 1-d one."""
    return torch.from_numpy(a if a.flags.c_contiguous and a.flags.writeable else a.copy())


def _onnx_elem_type(t: torch.Tensor) -> int:
    try:
        return _TORCH_TO_ONNX[t.dtype]
    except KeyError:
        raise NotImplementedError(f"no ONNX type for {t.dtype}") from None


class _OrtNode:
    """One node as a one-node ONNX Runtime session, one per (input dtypes and ranks)."""

    def __init__(self, node: onnx.NodeProto, model: onnx.ModelProto, initializers: Mapping[str, onnx.TensorProto],
                 value_types: Mapping[str, onnx.TypeProto], threads: int):
        if node.op_type in _SUBGRAPH_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                for a in node.attribute):
            raise NotImplementedError(f"node {node.name!r} ({node.op_type}): nodes with subgraphs are not supported")
        self.node = node
        self.model = model
        self.initializers = initializers
        self.value_types = value_types
        self.threads = threads
        self.sessions: dict[tuple, Any] = {}

    def _build(self, inputs: Sequence[Optional[torch.Tensor]]):
        import onnxruntime as ort

        node = onnx.NodeProto()
        node.CopyFrom(self.node)
        ins = list(node.input)
        inits, graph_inputs, seen = [], [], set()
        while ins and ins[-1] == "":  # trailing optional inputs that are not given
            ins.pop()
        del node.input[:]
        node.input.extend(ins)
        for i, name in enumerate(ins):
            if name == "" or name in seen:
                continue
            seen.add(name)
            if name in self.initializers:
                inits.append(self.initializers[name])
                continue
            t = inputs[i] if i < len(inputs) else None
            if t is None:
                raise ValueError(f"node {self.node.name!r}: input {i} ({name!r}) is required")
            shape = [f"d{i}_{k}" for k in range(t.dim())]
            graph_inputs.append(helper.make_tensor_value_info(name, _onnx_elem_type(t), shape))
        outs = [o for o in node.output if o]
        graph = helper.make_graph([node], "node", graph_inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs],
                                  initializer=inits)
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import), functions=list(self.model.functions))
        m.ir_version = self.model.ir_version
        try:
            inferred = onnx.shape_inference.infer_shapes(m)
            types_ = {v.name: v.type for v in inferred.graph.output}
        except Exception:
            types_ = {}
        del m.graph.output[:]
        for o in outs:
            t = types_.get(o)
            if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
                t = self.value_types.get(o)
            vi = onnx.ValueInfoProto(name=o)
            if t is not None:
                vi.type.CopyFrom(t)
                if vi.type.HasField("tensor_type"):  # sizes may differ between calls
                    vi.type.tensor_type.ClearField("shape")
            m.graph.output.append(vi)
        # a pool thread per session adds up (one per node); only big tensors gain from one
        big = max((t.numel() for t in inputs if t is not None), default=0) >= _PARALLEL_NUMEL
        so = _session_options(self.threads if big else 1)
        try:
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises Fail/InvalidGraph/NotImplemented...: nothing can run this node
            raise self._unsimulatable(e) from None
        feeds = [(i, n.name) for n in graph_inputs for i in [ins.index(n.name)]]
        return sess, feeds, outs

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        key = tuple(None if t is None or n in self.initializers else (t.dtype, t.dim())
                    for n, t in zip(self.node.input, inputs))
        if key not in self.sessions:
            self.sessions[key] = self._build(inputs)
        sess, feeds, outs = self.sessions[key]
        device = next((t.device for t in inputs if t is not None), torch.device("cpu"))
        feed = {name: inputs[i].detach().cpu().contiguous().numpy() for i, name in feeds}
        try:
            ys = dict(zip(outs, sess.run(outs, feed)))
        except Exception as e:  # e.g. a Loop/If whose body fails on these inputs
            raise self._unsimulatable(e) from None
        return [_to_torch(ys[o]).to(device) if o else None for o in self.node.output]

    def _unsimulatable(self, e: Exception):
        from ..errors import QwtError

        op = f"{self.node.domain}:{self.node.op_type}" if self.node.domain else self.node.op_type
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why.split(" : ", 2)[-1][:200]  # drop ORT's "[ONNXRuntimeError] : 1 : FAIL :" prefix
        return QwtError(f"node {self.node.name!r} ({op}) cannot be run in float by ONNX Runtime, so the "
                        f"simulation cannot run it ({why})",
                        "replace the node with standard ONNX ops (a custom op needs its own library in every "
                        "backend that runs the file)")


# ----------------------------------------------------------------------------- the runner

class FloatNodeRunner:
    """Every node of one FP32 ONNX model as a PyTorch callable that matches ONNX Runtime.

    ``FloatNodeRunner(model)`` (a path or a ModelProto; external data is loaded from a path).
    ``prefer="onnxruntime"`` (default) runs every node in a one-node ONNX Runtime session:
    bit-identical to the whole graph in ONNX Runtime with optimizations off.
    ``prefer="onnx2torch"`` runs what onnx2torch converts as torch modules (for GPU tensors,
    autograd or torch.fx; check it with :meth:`verify`) and gives the rest to ONNX Runtime.
    ``ort_threads``: intra-op threads of each one-node session (default: torch's).

    - ``run(node_name, inputs)``: ``inputs[i]`` is the value of the node's i-th ONNX input
      (None for an empty name; initializer and Constant inputs may be None: the runner holds
      them and ignores a tensor passed for one); returns one tensor per ONNX output (None for
      an empty output name), on the first input's device.
    - ``names``: node keys in graph order (:func:`node_names`); ``nodes[name]``: its NodeProto.
    - ``backend(name)``: "onnx2torch", "onnxruntime" or "constant".
    - ``fallbacks``: with ``prefer="onnx2torch"``, the nodes given to ONNX Runtime instead,
      with the reason, for the export report (empty with the default); ``counts()``: nodes per
      backend.
    - ``run_graph(feeds)``: the whole graph through ``run``; ``verify(feeds)``: compare every
      node with ONNX Runtime and move the ones that disagree to it.
    """

    def __init__(self, model: ModelLike, *, prefer: str = ORT, ort_threads: Optional[int] = None):
        if prefer not in (TORCH, ORT):
            raise ValueError(f"prefer must be {TORCH!r} or {ORT!r}, not {prefer!r}")
        self.model = load_model(model)
        self.prefer = prefer
        self.ort_threads = ort_threads or torch.get_num_threads()
        self.names = node_names(self.model.graph)
        self.nodes: dict[str, onnx.NodeProto] = dict(zip(self.names, self.model.graph.node))
        self._folded = _constants_to_initializers(self.model)
        self._const_protos = {t.name: t for t in self._folded.graph.initializer}
        self.constants: dict[str, torch.Tensor] = {
            name: torch.from_numpy(np.array(numpy_helper.to_array(t))) for name, t in self._const_protos.items()
            if t.data_type != TensorProto.STRING}
        self.graph_inputs = [i.name for i in self.model.graph.input if i.name not in self._const_protos]
        self.graph_outputs = [o.name for o in self.model.graph.output]
        self._opset = _opsets(self.model)
        self._impl: dict[str, Any] = {}
        self._backend: dict[str, str] = {}
        self._reasons: dict[str, str] = {}
        self._value_types: dict[str, onnx.TypeProto] = {}
        self._build()

    # -- construction

    def _build(self):
        try:
            inferred = onnx.shape_inference.infer_shapes(self._folded)
        except Exception:  # > 2 GB or a broken model: no value types, the one-node inference decides
            inferred = self._folded
        g = inferred.graph
        self._value_types = {v.name: v.type for v in list(g.value_info) + list(g.input) + list(g.output)}
        torch_nodes = {}
        if self.prefer == TORCH:
            torch_nodes = self._convert_all(inferred)
        for name in self.names:
            node = self.nodes[name]
            if node.op_type == "Constant" and node.output[0] in self.constants:
                self._backend[name] = CONSTANT
            elif name in torch_nodes and isinstance(torch_nodes[name], _TorchNode):
                self._impl[name] = torch_nodes[name]
                self._backend[name] = TORCH
            else:
                self._to_ort(name, torch_nodes.get(name, ""))

    def _convert_all(self, inferred: onnx.ModelProto) -> dict[str, Union[_TorchNode, str]]:
        """onnx2torch modules for the nodes it converts; the reason for the others."""
        try:
            _import_onnx2torch()
            from onnx2torch.onnx_graph import OnnxGraph
        except Exception as e:  # not installed, or an import failure: everything goes to ORT
            return {n: f"onnx2torch unavailable ({type(e).__name__}: {e})" for n in self.names}
        graph = OnnxGraph(inferred.graph)
        onnx_nodes = iter(graph.nodes.values())  # same order as the folded graph's nodes
        out: dict[str, Union[_TorchNode, str]] = {}
        for name in self.names:
            node = self.nodes[name]
            if node.op_type == "Constant" and node.output[0] in self.constants:
                continue  # folded away, not in the OnnxGraph
            onnx_node = next(onnx_nodes)
            domain = node.domain if node.domain != "ai.onnx" else ""
            if (domain, node.op_type) in _ALWAYS_ORT:
                out[name] = "needs torchvision's C++ ops"
                continue
            try:
                conv = _torch_converter(node, self._opset.get(domain, self._opset.get("", 1)))
                with warnings.catch_warnings():  # inexact modes are refused above, not warned about
                    warnings.simplefilter("ignore")
                    module, mapping = conv(onnx_node, graph)
                out[name] = _TorchNode(node, module, mapping, self.constants)
            except Exception as e:
                out[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        return out

    def _to_ort(self, name: str, reason: str):
        node = self.nodes[name]
        self._impl[name] = _OrtNode(node, self._folded, self._const_protos, self._value_types, self.ort_threads)
        self._backend[name] = ORT
        self._reasons[name] = reason

    # -- queries

    def backend(self, name: str) -> str:
        return self._backend[name]

    @property
    def fallbacks(self) -> list[Fallback]:
        if self.prefer == ORT:
            return []
        return [Fallback(n, self.nodes[n].op_type, self._reasons.get(n, "")) for n in self.names
                if self._backend[n] == ORT]

    def counts(self) -> dict[str, int]:
        out = {TORCH: 0, ORT: 0, CONSTANT: 0}
        for b in self._backend.values():
            out[b] += 1
        return out

    def to(self, device) -> "FloatNodeRunner":
        """Move the onnx2torch modules and constants (ORT nodes copy through the host)."""
        self.constants = {k: v.to(device) for k, v in self.constants.items()}
        for impl in self._impl.values():
            if isinstance(impl, _TorchNode):
                impl.to(device)
        return self

    # -- running

    def run(self, name: str, inputs: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        node = self.nodes[name]
        if self._backend[name] == CONSTANT:
            return [self.constants[node.output[0]]]
        impl = self._impl[name]
        if isinstance(impl, _TorchNode):
            try:
                return impl(inputs)
            except Exception as e:  # a mode the converter rejects only when it runs
                self._to_ort(name, f"at run time: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                impl = self._impl[name]
        return impl(inputs)

    def _last_use(self) -> dict[str, int]:
        """Index of the last node reading each value; graph outputs are never freed."""
        last: dict[str, int] = {}
        for i, name in enumerate(self.names):
            for v in self.nodes[name].input:
                last[v] = i
        for v in self.graph_outputs:
            last[v] = len(self.names)
        return last

    def run_graph(self, feeds: Mapping[str, Any], *, keep: bool = False) -> dict[str, torch.Tensor]:
        """The graph outputs (every value if ``keep``) for ``feeds`` (name -> array or tensor)."""
        env: dict[str, torch.Tensor] = dict(self.constants)
        env.update({k: v if isinstance(v, torch.Tensor) else _to_torch(np.asarray(v)) for k, v in feeds.items()})
        last = {} if keep else self._last_use()
        for i, name in enumerate(self.names):
            node = self.nodes[name]
            ys = self.run(name, [env.get(v) if v else None for v in node.input])
            for o, y in zip(node.output, ys):
                if o:
                    env[o] = y
            for v in set(node.input):
                if last.get(v) == i and v not in self.constants:
                    env.pop(v, None)
        return env if keep else {o: env[o] for o in self.graph_outputs}

    def verify(self, feeds: Mapping[str, Any], *, rtol: float = 1e-5, fallback: bool = True) -> list[NodeDiff]:
        """Compare every onnx2torch node with ONNX Runtime on ``feeds`` (each node fed ONNX
        Runtime's own inputs); with ``fallback``, nodes above ``rtol`` go to ONNX Runtime."""
        diffs = compare_with_onnxruntime(self.model, feeds, runner=self, isolate=True)
        if fallback:
            for d in diffs:
                if self._backend[d.node] == TORCH and not d.max_rel <= rtol:
                    self._to_ort(d.node, f"differs from ONNX Runtime (max_rel {d.max_rel:.3g})")
        return diffs


# ----------------------------------------------------------------------------- per-node diff

def onnxruntime_intermediates(model: ModelLike, feeds: Mapping[str, Any], *,
                              threads: Optional[int] = None) -> dict[str, np.ndarray]:
    """Every node output of ``model`` for ``feeds``, from one ONNX Runtime session with graph
    optimizations off (each intermediate read by making it a graph output)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(load_model(model))
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in feeds.items()}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def _diff(y: Optional[torch.Tensor], ref: np.ndarray) -> tuple[float, float]:
    if y is None:
        return math.inf, math.inf
    y = y.detach().cpu()
    r = _to_torch(ref)
    if y.dtype != r.dtype or tuple(y.shape) != tuple(r.shape):
        return math.inf, math.inf
    if r.numel() == 0:
        return 0.0, 0.0
    if torch.equal(y, r):
        return 0.0, 0.0
    if r.dtype == torch.bool:
        return math.inf, math.inf
    if r.dtype.is_complex:
        y, r = y.abs(), r.abs()  # coarse, but complex values do not occur in these graphs
    y, r = (y.double(), r.double()) if r.dtype in (torch.float64, torch.int64, torch.int32) else (y.float(), r.float())
    max_abs, scale = float((y - r).abs().max()), float(r.abs().max())
    if not (math.isfinite(max_abs) and math.isfinite(scale)):  # infs or nans: compare them as values
        d = (y - r).abs()
        d = torch.where((y == r) | (torch.isnan(y) & torch.isnan(r)), torch.zeros_like(d), d)
        max_abs = math.inf if bool(torch.isnan(d).any()) else float(d.max())
        finite = r[torch.isfinite(r)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, max_rel


def compare_with_onnxruntime(model: ModelLike, feeds: Mapping[str, Any], *, runner: Optional[FloatNodeRunner] = None,
                             isolate: bool = False, reference: Optional[Mapping[str, np.ndarray]] = None) -> list[NodeDiff]:
    """Run the graph node by node through a :class:`FloatNodeRunner` and compare every
    intermediate with ONNX Runtime (optimizations off); one :class:`NodeDiff` per node, in
    graph order.

    ``isolate=False``: the runner's own outputs flow on, so errors accumulate as they would in
    the simulation. ``isolate=True``: each node gets ONNX Runtime's inputs, so each diff is that
    node's own; use it to find the node that converts wrongly. ``reference``: the output of
    :func:`onnxruntime_intermediates` for these feeds, if already computed.
    """
    m = load_model(model)
    runner = runner or FloatNodeRunner(m)
    ref = reference if reference is not None else onnxruntime_intermediates(m, feeds)
    env: dict[str, torch.Tensor] = dict(runner.constants)
    env.update({k: v if isinstance(v, torch.Tensor) else _to_torch(np.asarray(v)) for k, v in feeds.items()})
    last = runner._last_use()
    out = []
    for i, name in enumerate(runner.names):
        node = runner.nodes[name]
        try:
            ys = runner.run(name, [env.get(v) if v else None for v in node.input])
        except Exception as e:  # reported as inf; say why
            warnings.warn(f"compare_with_onnxruntime: node {name!r} ({node.op_type}) raised {type(e).__name__}: {e}")
            ys = [None] * len(node.output)
        worst_abs = worst_rel = 0.0
        for o, y in zip(node.output, ys):
            if not o:
                continue
            a, r = _diff(y, ref[o])
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            env[o] = _to_torch(ref[o]) if isolate or y is None else y
        for v in set(node.input):  # free what no later node reads
            if last.get(v) == i and v not in runner.constants:
                env.pop(v, None)
        out.append(NodeDiff(name, worst_abs, worst_rel))
    return out
