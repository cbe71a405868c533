"""Where activation quantizers go, per target backend.

A quantizer sits on a *value* (a tensor of the IR). By default every reader of that value
sees the quantized version, in the simulation and in the exported graph alike. A plan may
restrict that to some readers (``QuantPlan.readers``): the quantizer then sits on the edges
(value -> reader) and the other readers, graph outputs included, see the float value. Both
the PyTorch simulation and the ONNX emitter ask :meth:`QuantPlan.sees_quantized`, so the
two place quantizers identically by construction.

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

TensorRT layout (``--target trt``): see :func:`plan_for_trt`.

Which planner a backend uses is its :class:`qwt_deploy.targets.Target`'s choice; nothing here
knows backend names.
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass, field
from typing import Iterable, Union

from ..errors import QwtError
from ..graph.ir import Graph, Node
from ..graph.ops import OPS, Role, linear_as_matmul


class Kernels(enum.Enum):
    """How the backend computes a quantized Conv/Gemm/MatMul, so the simulation computes the same.

    ``REQUANTIZING``: ONNX Runtime CPU. A Conv/Gemm node unit is one fused integer kernel
    (QLinearConv, QGemm) whose output is requantized inside the kernel
    (:mod:`.integer_kernels`); token linears and attention matmuls run as
    MatMulIntegerToFloat (exact accumulator, float output).
    ``ACCUMULATING``: TensorRT. Every quantized Conv/Gemm/MatMul is an exact INT8 accumulator
    times float32 ``s_x * s_w`` plus a float bias (:mod:`.trt_kernels`); activation x activation
    matmuls stay float.
    """

    REQUANTIZING = "requantizing"
    ACCUMULATING = "accumulating"


@dataclass
class QuantPlan:
    kernels: Kernels
    # value -> None (observe its own range) or the value whose parameters it inherits
    activations: dict[str, str | None] = field(default_factory=dict)
    weighted: list[str] = field(default_factory=list)  # node names with INT8 weights
    # value -> names of the reader nodes that see its quantized version; a quantized value
    # missing here is seen quantized by every reader (and graph output): the ort layout
    readers: dict[str, frozenset[str]] = field(default_factory=dict)
    signed_activations: bool = False  # True: symmetric INT8, zero point 0 (TensorRT)
    # embedding nodes whose table is stored as INT8 codes + one float scale per row (weight-only):
    # a token embedding is most of a small transformer's file (MiniLM: 47 of 90 MB) and only the
    # gathered rows are ever read, so it is dequantized per token, never as a whole table
    tables: list[str] = field(default_factory=list)
    int32_bias: bool = True  # False: the bias stays float (TensorRT rejects INT32 bias DQ)

    def is_quantized(self, value: str) -> bool:
        return value in self.activations

    def sees_quantized(self, value: str, reader: str | None) -> bool:
        """Does node ``reader`` (None: a graph output) read ``value`` through its quantizer?"""
        if value not in self.activations:
            return False
        only = self.readers.get(value)
        return only is None or reader in only

    def has_float_readers(self, value: str) -> bool:
        """True if some reader (or a graph output) reads the float value beside the quantized one."""
        return value in self.readers

    def root(self, value: str) -> str:
        """The value whose observer defines this value's parameters."""
        while self.activations.get(value) is not None:
            value = self.activations[value]
        return value


# Op kinds kept in float by default (``keep_float``): ONNX Runtime has no integer LayerNorm
# or GELU kernel, and Softmax reads the additive attention mask (-1e4), which would wreck a
# per-tensor scale. Removing one of these from ``keep_float`` quantizes it like an INTEGER
# op (DQ inputs, Q output); listing any other op kind (e.g. "add" for residual adds) keeps
# that kind float. Entries may also name nodes (see resolve_keep_float).
DEFAULT_KEEP_FLOAT = ("layer_norm", "softmax", "gelu")
QUANTIZABLE_FLOAT_OPS = frozenset({"layer_norm", "softmax", "gelu"})
REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class KeepFloat:
    """The nodes that ``keep_float`` keeps float, resolved against one graph (:func:`resolve_keep_float`).

    A kept node is FLOAT whatever its op's role: a Conv/Linear kept float gets no INT8 weight
    (it is not in ``QuantPlan.weighted``) and its output is quantized only where an integer
    reader needs it, like any float op's. On --target ort, ONNX Runtime >= 1.21
    (WeightBiasQuantization) would itself quantize a float Conv/Gemm weight per tensor whenever its
    input comes from a DequantizeLinear; the exporter prevents that (exporter.qdq,
    ``_emit_float_as_int32_dq``)."""

    kinds: frozenset[str] = frozenset()  # IR op kinds (OPS keys): every node of the kind
    nodes: frozenset[str] = frozenset()  # IR node names (by name, ONNX op type or regex)
    entries: tuple[str, ...] = ()  # what the user wrote, for reports

    def keeps(self, node: Union[Node, str]) -> bool:
        """Is this node (or, given an op kind, every node of that kind) kept float?"""
        if isinstance(node, str):
            return node in self.kinds
        return node.op in self.kinds or node.name in self.nodes


KeepFloatLike = Union[KeepFloat, Iterable[str]]


def compile_pattern(entry: str) -> re.Pattern:
    """The regex of a ``re:PATTERN`` entry; QwtError on bad syntax (before any graph exists)."""
    try:
        return re.compile(entry[len(REGEX_PREFIX):])
    except re.error as e:
        raise QwtError(f"keep-float entry {entry!r} is not a valid regular expression ({e})",
                       "write re:PATTERN with Python re syntax, e.g. re:^_blocks\\.1[45]\\.") from None


def resolve_keep_float(graph: Graph, entries: KeepFloatLike, strict: bool = False) -> KeepFloat:
    """Resolve ``keep_float`` entries against ``graph``. Each entry is, first match wins:

    1. an IR op kind (an OPS key: ``softmax``, ``add``, ``conv``): every node of that kind;
    2. an ONNX op type of the nodes an ONNX source keeps as-is (``LayerNormalization``, ``Reshape``);
    3. an exact IR node name (``_blocks.15._project_conv``);
    4. ``re:PATTERN``: every node whose name the regex matches anywhere (``re.search``, as grep:
       ``re:^_blocks\\.1[45]\\.`` needs no trailing ``.*``; anchor with ^/$ where meant).

    A regex needs its ``re:`` prefix: node names are full of '.', so guessing that a non-name
    is a regex would turn a misspelt name into a pattern that silently matches something else.
    ``strict`` (what the user wrote): an entry of forms 2-4 that selects no node, or a word that
    is none of them, is a QwtError. An op kind this graph lacks is not: kinds are the vocabulary
    one list shares across models (the defaults, the minilm list on a CNN), and which kinds a
    model has is the front end's choice (an ONNX source's LayerNorm is an "onnx" node).
    """
    if isinstance(entries, KeepFloat):
        return entries
    entries = tuple(entries)
    kinds, nodes = set(), set()
    for e in entries:
        if e in OPS:
            kinds.add(e)
            continue
        if e.startswith(REGEX_PREFIX):
            pattern = compile_pattern(e)
            sel = {n.name for n in graph.nodes if pattern.search(n.name)}
        else:
            sel = {n.name for n in graph.nodes if _onnx_op_type(n) == e} or \
                  {n.name for n in graph.nodes if n.name == e}
        if strict and not sel:
            raise QwtError(f"keep-float entry {e!r} is no op kind and matches no ONNX op type or node name of this model",
                           _keep_float_hint(graph, e))
        nodes |= sel
    return KeepFloat(kinds=frozenset(kinds), nodes=frozenset(nodes), entries=entries)


def _onnx_op_type(n: Node) -> str | None:
    """The ONNX op type of a node an ONNX source keeps as-is (op "onnx", "onnx_movement")."""
    return getattr(n.attrs.get("proto"), "op_type", None)


def _keep_float_hint(graph: Graph, entry: str) -> str:
    kinds = sorted({n.op for n in graph.nodes})
    names = [n.name for n in graph.nodes]
    close = difflib.get_close_matches(entry, list(OPS) + names, n=1)
    hint = f"did you mean {close[0]!r}? Else " if close else ""
    return (hint + f"give an op kind of this model ({', '.join(kinds)}), a node name (e.g. {', '.join(names[:4])}) "
            f"or {REGEX_PREFIX}PATTERN, a regular expression searched in node names")


def _selection(graph: Graph, keep_float: KeepFloatLike) -> KeepFloat:
    return resolve_keep_float(graph, keep_float, strict=False)


def effective_role(node: Union[Node, str], keep_float: KeepFloatLike = DEFAULT_KEEP_FLOAT) -> Role:
    """The role of ``node`` (or of an op kind) in this plan: FLOAT if kept float, weighted
    nodes included; a LayerNorm/Softmax/GELU not kept float is quantized as INTEGER. Plain
    strings count as op kinds and exact node names (a ``re:`` entry needs the graph: resolve first)."""
    op = node if isinstance(node, str) else node.op
    if not isinstance(keep_float, KeepFloat):
        entries = frozenset(keep_float)
        keep_float = KeepFloat(kinds=entries, nodes=entries)
    if keep_float.keeps(node):
        return Role.FLOAT
    if op in QUANTIZABLE_FLOAT_OPS:
        return Role.INTEGER
    return OPS[op].role


def plan_for_ort(graph: Graph, keep_float: KeepFloatLike = DEFAULT_KEEP_FLOAT) -> QuantPlan:
    keep_float = _selection(graph, keep_float)
    plan = QuantPlan(kernels=Kernels.REQUANTIZING)
    outputs = set(graph.outputs)
    for v in graph.inputs:
        if graph.is_float_input(v):  # token ids / masks are integers: never quantized
            plan.activations[v] = None
    for n in graph.nodes:
        role = effective_role(n, keep_float)
        if role in (Role.WEIGHTED, Role.INTEGER):
            for v in n.inputs:
                plan.activations.setdefault(v, None)
            if role is Role.WEIGHTED:
                plan.weighted.append(n.name)
            # A token linear (MatMul form) or an attention matmul is an integer kernel without
            # an output Q (MatMulIntegerToFloat); its output is quantized only where a reader
            # needs it, so a float reader (GELU, a float residual add, the scaled+masked
            # attention scores before Softmax) gets the unrounded value. Scores span a wide
            # range (|Q.K^T| ~ 400 in MiniLM): a uint8 step there is ~0.6 in softmax logits.
            if n.output not in outputs and not linear_as_matmul(n) and n.op != "matmul":
                plan.activations[n.output] = None
        elif role is Role.MOVEMENT and plan.is_quantized(n.inputs[0]):
            plan.activations[n.output] = n.inputs[0]
    _float_readers_read_float(graph, plan, keep_float)
    plan.tables = int8_tables(graph, keep_float)
    return plan


def int8_tables(graph: Graph, keep_float: KeepFloatLike) -> list[str]:
    """Embedding tables stored INT8 per row, except those ``keep_float`` keeps (by kind or node)."""
    sel = _selection(graph, keep_float)
    return [n.name for n in graph.nodes if n.op == "embedding" and not sel.keeps(n)]


def _float_readers_read_float(graph: Graph, plan: QuantPlan, keep_float) -> None:
    """A float op's output that is quantized only because integer kernels read it (a
    LayerNorm read by q/k/v and by the float residual add) keeps its float value for its
    float readers: the quantizer sits on the edges to the integer readers only. Rounding it
    for a float reader would add error and save nothing. Values produced by integer kernels
    (the CNN layout) are untouched: their Q is part of the kernel."""
    producer, consumers = graph.producer(), graph.consumers()
    outputs = set(graph.outputs)
    for v, root in list(plan.activations.items()):
        p = producer.get(v)
        if root is not None or p is None or effective_role(p, keep_float) is not Role.FLOAT:
            continue
        quantized = {c.name for c in consumers.get(v, []) if effective_role(c, keep_float) in (Role.WEIGHTED, Role.INTEGER)
                     or plan.activations.get(c.output) == v}
        if v in outputs or len(quantized) < len(consumers.get(v, [])):
            plan.readers[v] = frozenset(quantized)


# TensorRT: INTEGER-role ops that are left in float. Sigmoid: TensorRT fuses it into the
# preceding layer's epilogue in float. Concat: handled by its readers (see plan_for_trt).
# Every other INTEGER op (add, mul, pooling, a LayerNorm/Softmax/GELU taken out of
# keep_float) does not commute with Q/DQ: DQ on every input, Q on the output (rule 14).
_TRT_FLOAT_INTEGER_OPS = {"sigmoid", "concat"}
# Ops that are quantized on their inputs like a weighted op but have no weight: the
# activation x activation MatMul of attention (Q.K^T, P.V). Q/DQ on both inputs, none on
# the output (TensorRT's rule for MatMul). New ops extend this table.
TRT_QUANTIZED_INPUTS: dict[str, tuple[int, ...]] = {"matmul": (0, 1)}


def _fused_add_input(n: Node, producer: dict[str, Node], consumers: dict[str, list[Node]],
                     order: dict[str, int], keep_float: KeepFloat) -> int | None:
    """Index of the Add input that TensorRT fuses the Add into (an INT8 weighted op's output
    read by this Add alone); the later-produced one if both qualify; None for a standalone Add.
    A conv kept float is no INT8 kernel to fuse into."""
    best, best_pos = None, -1
    for i, v in enumerate(n.inputs):
        p = producer.get(v)
        if p is None or effective_role(p, keep_float) is not Role.WEIGHTED or len(consumers.get(v, [])) != 1:
            continue
        if order[p.name] > best_pos:
            best, best_pos = i, order[p.name]
    return best


def plan_for_trt(graph: Graph, keep_float: KeepFloatLike = DEFAULT_KEEP_FLOAT) -> QuantPlan:
    """TensorRT explicit-quantization layout (backends.md §3; TensorRT's QDQ placement guide).

    - Activations are symmetric INT8 with zero point 0: TensorRT rejects any other zero
      point, and UINT8 is not a TensorRT quantized type.
    - Q/DQ go on the *inputs* of Conv/Gemm (and of op types listed in
      ``TRT_QUANTIZED_INPUTS``), not on their outputs: TensorRT fuses DQ -> Conv -> (bias,
      ReLU, residual Add) -> Q of the next layer into one INT8 kernel by itself; an extra
      Q on a conv output would only add rounding and can split that fusion.
    - Residual Add: Q/DQ on the skip input only. The other input is the output of the conv
      that TensorRT fuses the Add into as an epilogue, so it must stay unquantized. The
      quantizer is therefore on the *edge* (skip value -> Add): readers that do not need it,
      and graph outputs, see the float value (``QuantPlan.readers``).
    - Standalone Add/Mul, average pooling (and LayerNorm/Softmax/GELU when taken out of
      ``keep_float``) do not commute with Q/DQ: they get DQ on every input and a Q on their
      output (seen by all readers), so they run INT8-in/INT8-out.
    - Activation x activation MatMul (attention): Q/DQ on both inputs, not on the output.
    - MOVEMENT ops (flatten, reshape, max-pool) commute with Q/DQ: a quantized input's
      parameters carry over to the output, as TensorRT propagates Q/DQ through them.
    - Concat: we never quantize its inputs separately; if a quantized reader needs its
      output, the one Q after the Concat (TensorRT moves it above the Concat) gives every
      input and the output one shared scale. If all inputs already share one quantizer,
      the output inherits it.
    - Pad: our convs carry their padding, so there is never a Pad between Q/DQ and Conv.
    - FLOAT ops and roles this planner does not know get no quantizer on their output
      unless a quantized reader (a weighted op, say) needs it on that edge.
    - The bias stays float: TensorRT has no INT32 DequantizeLinear.

    Float regions stay FP32 (not FP16) by default. TensorRT 11 is strongly typed: every
    tensor runs in the type the ONNX graph gives it, so "FP16 where safe" would mean
    rewriting the float regions to float16 (opset >= 19 for FP16 Q/DQ scales, scales of the
    same type as their inputs, Casts at the graph edges). We do not, because in this layout
    every Conv/Gemm, with its bias, CWAC, ReLU and residual Add, is one fused INT8 kernel whose
    output goes straight into the next layer's Q, so the FP32-typed regions that remain are
    the graph's edges (input, logits) and ops kept float on purpose (LayerNorm, Softmax,
    GELU), which TensorRT's own guidance keeps out of reduced precision. FP16 would also
    round the folded CWAC scales and biases to 11 significant bits, and it needs opset 19:
    ONNX Runtime 1.32 rejects a float16 QuantizeLinear input at opset 17 ("Type
    'tensor(float16)' ... is invalid"); at opset 19 its CPU provider does run an FP16 QDQ
    Conv, but by inserting Casts and computing in FP32, so the CPU check could not confirm
    TensorRT's FP16 arithmetic anyway (measured here). An FP16 option is therefore left out.
    """
    keep_float = _selection(graph, keep_float)
    plan = QuantPlan(kernels=Kernels.ACCUMULATING, signed_activations=True, int32_bias=False)
    producer, consumers = graph.producer(), graph.consumers()
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    outputs = set(graph.outputs)
    need: dict[str, set[str]] = {}  # value -> readers that need it quantized
    quantized_output: set[str] = set()  # non-commuting ops' outputs: Q seen by all readers

    for n in graph.nodes:
        role = effective_role(n, keep_float)
        idx: tuple[int, ...] = ()
        if role is Role.WEIGHTED:
            idx = (0,)
            plan.weighted.append(n.name)
        elif n.op in TRT_QUANTIZED_INPUTS and role is not Role.FLOAT:
            idx = TRT_QUANTIZED_INPUTS[n.op]
        elif role is Role.INTEGER and n.op not in _TRT_FLOAT_INTEGER_OPS:
            fused = _fused_add_input(n, producer, consumers, order, keep_float) if n.op == "add" else None
            if fused is not None:
                idx = tuple(i for i in range(len(n.inputs)) if i != fused)
            else:
                idx = tuple(range(len(n.inputs)))
                if n.output not in outputs:
                    quantized_output.add(n.output)
        for i in idx:
            if n.inputs[i] not in graph.inputs or graph.is_float_input(n.inputs[i]):
                need.setdefault(n.inputs[i], set()).add(n.name)

    values = list(graph.inputs) + [n.output for n in graph.nodes]
    for v in values:
        p = producer.get(v)
        role = effective_role(p, keep_float) if p is not None else None
        readers = need.get(v, set())
        if v in quantized_output:
            plan.activations[v] = None
        elif role is Role.MOVEMENT and plan.sees_quantized(p.inputs[0], p.name):
            plan.activations[v] = p.inputs[0]  # commutes: same parameters, every reader
        elif p is not None and p.op == "concat" and readers and _shared_input_root(plan, p) is not None:
            plan.activations[v] = _shared_input_root(plan, p)
        elif readers:
            plan.activations[v] = None
            all_readers = {c.name for c in consumers.get(v, [])}
            if readers != all_readers or v in outputs:
                plan.readers[v] = frozenset(readers)
    plan.tables = int8_tables(graph, keep_float)
    return plan


def _shared_input_root(plan: QuantPlan, concat: Node) -> str | None:
    roots = {plan.root(v) if plan.sees_quantized(v, concat.name) else None for v in concat.inputs}
    return roots.pop() if len(roots) == 1 and None not in roots else None

