"""Check a QDQ ONNX graph against TensorRT's explicit-quantization rules.

A read-only pass: it rewrites nothing and reports :class:`Finding` s. Errors are what makes a
TensorRT build fail or the parser reject the model (often with an opaque "could not find any
implementation"); warnings are placement choices that cost accuracy or speed (lost Conv+Add
fusion, requantization left behind). The rules follow backends.md §3 (TensorRT developer
guide "Working with quantized types", onnx-tensorrt operator notes, ModelOpt's placement).

Every rule is a *selector* (which nodes it looks at) and a *check* (what it reports for one
selected node); the check's docstring says why TensorRT needs the rule. It runs on every
``qwt-export --target trt`` export and on any graph through ``qwt-check --lint trt model.onnx``.

Preconditions: an ONNX model (any producer). Shapes and types are inferred with
``onnx.shape_inference`` where possible; checks that need a type the graph does not state
are skipped rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .helpers import const, optional_input, producer

ERROR, WARNING = "error", "warning"

# element types TensorRT accepts as quantized types (NvInfer.h: kINT8, kFP8, kINT4, kFP4)
_TRT_QUANT_TYPES = {"int8", "float8_e4m3fn", "int4", "float4_e2m1fn"}
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# ops that can consume a DQ output in an INT8 region: weighted ops, element-wise and pooling
# ops TensorRT runs INT8-in/INT8-out, and data movement that Q/DQ propagate through
_QUANTIZABLE_READERS = _WEIGHTED | {
    "Add", "Sub", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool", "GlobalMaxPool", "Concat",
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Resize",
    "Pad", "Identity", "Expand", "Tile", "ReduceMax", "ReduceMin", "DepthToSpace", "SpaceToDepth",
}
_TRANSPARENT = {"Relu", "Clip", "LeakyRelu", "Sigmoid"}  # fused into the layer before them


@dataclass(frozen=True)
class Finding:
    node: str  # node name (or "<model>" for model-level rules)
    rule: str
    severity: str  # "error" | "warning"
    message: str
    fix: str


@dataclass
class _Context:
    graph: gs.Graph
    opset: int
    outputs: set  # graph output tensor names


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str
    select: Callable[[gs.Node], bool]
    check: Callable[[gs.Node, _Context], Iterable[tuple[str, str]]]  # yields (message, fix)


# --- helpers -----------------------------------------------------------------------------
# Constants here are build-time constants (helpers.const(build_time=True)): TensorRT's parser
# folds a Constant node and a Constant -> Cast chain, so a scale given that way is constant.

def _dtype_name(t) -> Optional[str]:
    v = const(t, build_time=True)
    if v is not None:
        return str(v.dtype)
    dt = getattr(t, "dtype", None)
    if dt is None:
        return None
    try:
        return str(np.dtype(dt))
    except TypeError:
        return str(dt)


def _is_qdq(n: gs.Node) -> bool:
    return n.op in ("QuantizeLinear", "DequantizeLinear")


def _scale(n: gs.Node) -> Optional[np.ndarray]:
    return const(n.inputs[1], build_time=True) if len(n.inputs) > 1 else None


def _zero_point(n: gs.Node) -> Optional[np.ndarray]:
    zp = optional_input(n, 2)
    return None if zp is None else const(zp, build_time=True)


def _quant_type(n: gs.Node) -> Optional[str]:
    """The quantized element type of a Q (its output) or DQ (its input)."""
    if optional_input(n, 2) is not None:
        return _dtype_name(n.inputs[2])
    if n.op == "DequantizeLinear":
        return _dtype_name(n.inputs[0])
    if "output_dtype" in n.attrs and int(n.attrs["output_dtype"]) != 0:
        return str(onnx.helper.tensor_dtype_to_np_dtype(int(n.attrs["output_dtype"])))
    return "uint8"  # QuantizeLinear without a zero point produces uint8


def _is_weight_dq(n: gs.Node) -> bool:
    """A DQ whose data is a constant (or a Q of a constant: float weights behind Q/DQ)."""
    if n.op != "DequantizeLinear":
        return False
    src = n.inputs[0]
    if const(src, build_time=True) is not None:
        return True
    q = producer(src, "QuantizeLinear")
    return q is not None and const(q.inputs[0], build_time=True) is not None


def _activation_dq(t) -> Optional[gs.Node]:
    """The DQ that produces ``t`` if it dequantizes an activation (not a constant weight)."""
    p = producer(t, "DequantizeLinear")
    if p is not None and not _is_weight_dq(p):
        return p
    return None


def _q_source(dq: gs.Node) -> Optional[gs.Node]:
    """For DQ(Q(x)): the node producing x, looking through fused activations."""
    q = producer(dq.inputs[0], "QuantizeLinear")
    if q is None:
        return None
    p = producer(q.inputs[0])
    while p is not None and p.op in _TRANSPARENT:
        p = producer(p.inputs[0])
    return p


def _expected_weight_axis(dq: gs.Node) -> Optional[tuple[str, int]]:
    """(consumer op, output-channel axis) for a weight DQ read as a weighted op's weight."""
    out = dq.outputs[0]
    for c in out.outputs:
        if c.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(c.inputs) > 1 and c.inputs[1] is out:
            w = const(dq.inputs[0], build_time=True)
            rank = None if w is None else w.ndim
            if c.op == "Conv":
                return c.op, 0
            if c.op == "ConvTranspose":
                return c.op, 1
            if c.op == "Gemm":
                return c.op, 0 if int(c.attrs.get("transB", 0)) == 1 else 1
            if rank is not None:
                return c.op, rank - 1
    return None


# --- error rules -------------------------------------------------------------------------

def check_zero_point(n: gs.Node, ctx: _Context):
    """TensorRT supports symmetric quantization only: every Q/DQ zero point must be 0, and a
    build-time constant (an initializer, Constant, or Constant->Cast), or the build fails."""
    if optional_input(n, 2) is None:
        return
    zp = _zero_point(n)
    if zp is None:
        yield ("zero point is computed at run time", "make the zero point a constant 0 initializer")
    elif np.any(zp.astype(np.float64) != 0):
        yield (f"zero point {np.unique(zp)[:4].tolist()} is not 0 (asymmetric quantization)",
               "quantize symmetrically: zero point 0, scale = max|x| / 127 (qwt-export --target trt does this)")


def check_scale(n: gs.Node, ctx: _Context):
    """TensorRT needs build-time constant scales that are finite and strictly positive: it
    folds them into the kernels' requantization multipliers, and a zero or negative scale has
    no INT8 meaning (the DequantizeLinear spec requires scale > 0 as well)."""
    if len(n.inputs) < 2:
        return
    s = _scale(n)
    if s is None:
        yield ("scale is computed at run time", "make the scale a constant initializer")
    elif not np.all(np.isfinite(s.astype(np.float64))) or np.any(s.astype(np.float64) <= 0):
        bad = int(np.sum(~(s.astype(np.float64) > 0)))
        yield (f"{bad} scale value(s) are zero, negative or not finite",
               "use scales > 0; for a negative per-channel factor negate that channel's weights instead")


def check_quantized_type(n: gs.Node, ctx: _Context):
    """TensorRT's quantized types are INT8, FP8 (E4M3), INT4 and FP4 only. UINT8 (ONNX
    Runtime's default activation type) is rejected; INT32 DequantizeLinear is rejected too,
    because TensorRT adds the bias in float inside the fused kernel."""
    t = _quant_type(n)
    if t is None or t in _TRT_QUANT_TYPES:
        return
    if t == "int32" and n.op == "DequantizeLinear":
        yield ("INT32 DequantizeLinear (a quantized bias)",
               "keep the bias as a float initializer (ModelOpt: QuantizeBias=False; qwt-export --target trt)")
    else:
        yield (f"quantized type {t} is not INT8/FP8/INT4/FP4",
               "use INT8 with zero point 0 (symmetric) instead of " + t)


def check_unsupported_op(n: gs.Node, ctx: _Context):
    """TensorRT reads quantization only from QuantizeLinear/DequantizeLinear pairs (QDQ
    format). ONNX Runtime's operator-format ops (QLinearConv, QLinearMatMul, QGemm...),
    integer ops (ConvInteger, MatMulInteger) and DynamicQuantizeLinear have no TensorRT
    importer, so the parser rejects the model."""
    yield (f"{n.op} is not supported by TensorRT", "export in QDQ format (QuantizeLinear/DequantizeLinear around "
           "float ops), e.g. onnxruntime quantize_static(quant_format=QuantFormat.QDQ) or qwt-export --target trt")


def _is_unsupported_op(n: gs.Node) -> bool:
    return (n.op.startswith("QLinear") or "Integer" in n.op or n.op.startswith("DynamicQuantize")
            or n.op in ("QGemm", "QAttention", "QEmbedLayerNormalization"))


def check_per_channel(n: gs.Node, ctx: _Context):
    """Per-channel scales are for weights only: TensorRT quantizes activations per tensor
    ("Activations cannot be quantized per-channel"), and a per-channel weight scale must run
    along the layer's output-channel axis (Conv: 0, ConvTranspose: 1, Gemm transB=1: 0,
    MatMul with a (K, N) weight: 1) with one scale per channel."""
    s = _scale(n)
    if s is None or s.size <= 1:
        return
    data = const(n.inputs[0], build_time=True)
    is_weight = data is not None or (n.op == "DequantizeLinear" and _is_weight_dq(n))
    if not is_weight:
        yield ("per-channel scale on an activation", "quantize activations per tensor (one scalar scale)")
        return
    if data is None:
        return
    axis = int(n.attrs.get("axis", 1))
    rank = data.ndim
    if not -rank <= axis < rank:
        yield (f"axis {axis} is out of range for a rank-{rank} weight", "set axis to the output-channel axis")
        return
    axis %= rank
    if data.shape[axis] != s.size:
        yield (f"{s.size} scales for {data.shape[axis]} channels on axis {axis}", "give one scale per output channel")
    exp = _expected_weight_axis(n) if n.op == "DequantizeLinear" else None
    if exp is not None and exp[1] != axis:
        yield (f"per-channel axis {axis}, but {exp[0]} has its output channels on axis {exp[1]}",
               f"set axis={exp[1]}")


def _check_opset(model: onnx.ModelProto) -> list[Finding]:
    """Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) exist from ONNX
    opset 13; TensorRT's importer rejects per-channel Q/DQ in older opsets."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return [Finding("<model>", "opset", ERROR, f"default-domain opset {opset} < 13",
                        "re-export with opset >= 13 (17 recommended)")]
    return []


def check_scale_dtype(n: gs.Node, ctx: _Context):
    """Strongly typed TensorRT (the only mode in TensorRT 11) requires a QuantizeLinear's
    scale to have the same float type as its input: an FP16 tensor needs an FP16 scale."""
    if n.op != "QuantizeLinear" or len(n.inputs) < 2:
        return
    x, s = _dtype_name(n.inputs[0]), _dtype_name(n.inputs[1])
    if x and s and x != s and x in ("float32", "float16", "bfloat16"):
        yield (f"input is {x} but the scale is {s}", f"store the scale as {x}")


# --- placement warnings ------------------------------------------------------------------

def check_q_feeds_float(n: gs.Node, ctx: _Context):
    """Q/DQ belongs on the *inputs* of the layers TensorRT runs in INT8 (weighted ops,
    residual Adds, pooling). A Q/DQ pair whose result only reaches float ops or a graph
    output (typically "Q on the output" of a layer, the ONNX Runtime layout) makes TensorRT
    quantize and immediately dequantize: extra rounding error and no INT8 work saved."""
    if _is_weight_dq(n):
        return
    out = n.outputs[0]
    readers = [c.op for c in out.outputs]
    to_output = out.name in ctx.outputs
    if to_output or (readers and not any(r in _QUANTIZABLE_READERS for r in readers)):
        where = "a graph output" if to_output else ", ".join(sorted(set(readers)))
        yield (f"Q/DQ result feeds only {where}", "remove this Q/DQ pair, or move it to the input of the next "
               "Conv/Gemm/MatMul (TensorRT: quantize the inputs of weighted ops, not their outputs)")


def check_add_inputs(n: gs.Node, ctx: _Context):
    """Residual Add: TensorRT fuses the Add into the convolution that produces one of its
    inputs, as an epilogue, only if that input is not quantized. Q/DQ on both inputs (Q on
    the Conv output, the ONNX Runtime layout) forces a separate INT8 Add and loses the fusion."""
    dqs = [_activation_dq(t) for t in n.inputs]
    if len(dqs) != 2 or any(d is None for d in dqs):
        return
    for dq in dqs:
        src = _q_source(dq)
        if src is not None and src.op in _WEIGHTED:
            yield (f"both Add inputs are quantized, one right after {src.op} {src.name!r}",
                   f"drop the Q/DQ between {src.name!r} and this Add; keep Q/DQ on the skip input only")
            return


def check_concat_scales(n: gs.Node, ctx: _Context):
    """TensorRT moves the Concat's output Q above the Concat. If the inputs' DQ and the output
    Q use different scales, a DQ->Q requantization per input is left behind; give all Concat
    inputs and the output one shared scale."""
    params = set()
    for t in n.inputs:
        dq = _activation_dq(t)
        if dq is not None and _scale(dq) is not None:
            params.add(float(np.asarray(_scale(dq)).reshape(-1)[0]))
    for c in n.outputs[0].outputs:
        if c.op == "QuantizeLinear" and _scale(c) is not None:
            params.add(float(np.asarray(_scale(c)).reshape(-1)[0]))
    if len(params) > 1:
        yield (f"Concat inputs/output use {len(params)} different scales",
               "give every Concat input and its output one shared scale (the union of their ranges)")


def check_pad_conv(n: gs.Node, ctx: _Context):
    """TensorRT fuses Pad into the following Conv. A Q/DQ pair between them blocks that
    fusion and leaves a separate Pad layer; quantize before the Pad (it commutes with Q/DQ
    when the zero point is 0) or fold the padding into the Conv's ``pads``."""
    p = producer(n.inputs[0], "Pad")
    if p is None:
        return
    for dq in n.outputs[0].outputs:
        if dq.op == "DequantizeLinear" and any(c.op == "Conv" for c in dq.outputs[0].outputs):
            yield (f"Q/DQ between Pad {p.name!r} and a Conv", "move the Q/DQ before the Pad, or fold the Pad into Conv.pads")
            return


def check_weighted_inputs(n: gs.Node, ctx: _Context):
    """A weighted op runs in INT8 only when both its activation and its weight come from
    DequantizeLinear. With only one of them quantized TensorRT runs it in float, and the one
    Q/DQ pair only adds rounding error."""
    if len(n.inputs) < 2:
        return
    a = producer(n.inputs[0], "DequantizeLinear") is not None
    w = producer(n.inputs[1], "DequantizeLinear") is not None
    if a != w:
        which = "input" if not a else "weight"
        yield (f"{n.op} has a quantized {'weight' if w else 'input'} but a float {which}: it runs in float",
               f"add Q/DQ on the {which} too (or remove the other one)")


RULES: list[Rule] = [
    Rule("zero-point", ERROR, _is_qdq, check_zero_point),
    Rule("scale-positive", ERROR, _is_qdq, check_scale),
    Rule("quantized-type", ERROR, _is_qdq, check_quantized_type),
    Rule("unsupported-op", ERROR, _is_unsupported_op, check_unsupported_op),
    Rule("per-channel", ERROR, _is_qdq, check_per_channel),
    Rule("scale-dtype", ERROR, _is_qdq, check_scale_dtype),
    Rule("q-feeds-float", WARNING, lambda n: n.op == "DequantizeLinear", check_q_feeds_float),
    Rule("add-both-inputs-quantized", WARNING, lambda n: n.op in ("Add", "Sum"), check_add_inputs),
    Rule("concat-scale-mismatch", WARNING, lambda n: n.op == "Concat", check_concat_scales),
    Rule("qdq-between-pad-and-conv", WARNING, lambda n: n.op == "QuantizeLinear", check_pad_conv),
    Rule("weighted-op-half-quantized", WARNING, lambda n: n.op in _WEIGHTED, check_weighted_inputs),
]


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph that fails inference is still checked, with fewer types
        return model


# Pass check_trt_rules (read-only, no run_pass: nothing is exported):
#   selector: each Rule.select over every node, in graph order (plus the model-level opset rule);
#   action: Rule.check yields (message, fix) findings; the graph is never changed.
# Preconditions: any ONNX model; types come from onnx.shape_inference when it succeeds.
def check_trt_rules(model: "onnx.ModelProto | str") -> list[Finding]:
    """All findings for ``model`` (a ModelProto or a path), errors first, in graph order."""
    if isinstance(model, str):
        model = onnx.load(model)
    findings = _check_opset(model)
    graph = gs.import_onnx(_typed(model))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    ctx = _Context(graph=graph, opset=opset, outputs={t.name for t in graph.outputs})
    for node in graph.nodes:
        for rule in RULES:
            if rule.select(node):
                for message, fix in rule.check(node, ctx) or ():
                    findings.append(Finding(node.name or f"<{node.op}>", rule.name, rule.severity, message, fix))
    return sorted(findings, key=lambda f: f.severity != ERROR)  # stable: graph order within a severity


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


@dataclass(frozen=True)
class RuleGroup:
    """Every finding of one rule: a model with 200 Conv layers breaks a rule 200 times, and the
    reader needs the rule, how often, its fix and the nodes, not 200 rows of the same text."""

    rule: str
    severity: str
    fix: str  # the group's fix, with the node names it quotes written as <node>
    findings: tuple[Finding, ...]

    @property
    def count(self) -> int:
        return len(self.findings)

    def to_dict(self) -> dict:
        return dict(rule=self.rule, severity=self.severity, count=self.count, fix=self.fix,
                    findings=[dict(node=f.node, message=f.message, fix=f.fix) for f in self.findings])


def _generic_fix(fix: str) -> str:
    return re.sub(r"'[^']*'", "<node>", fix)


def group_findings(findings: Iterable[Finding]) -> list[RuleGroup]:
    """Findings grouped by rule and fix (one rule can have different causes: quantized-type is
    a uint8 activation or an INT32 bias, each with its own fix): errors first, then the most
    frequent first; graph order within a group."""
    by_key: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        by_key.setdefault((f.rule, _generic_fix(f.fix)), []).append(f)
    groups = [RuleGroup(rule, fs[0].severity, fix, tuple(fs)) for (rule, fix), fs in by_key.items()]
    return sorted(groups, key=lambda g: (g.severity != ERROR, -g.count))


def findings_to_dict(findings: list[Finding]) -> dict:
    """The JSON of ``qwt-check --lint trt --json``: counts, and every finding grouped by rule."""
    n_err = len(errors(findings))
    return dict(errors=n_err, warnings=len(findings) - n_err, rules=[g.to_dict() for g in group_findings(findings)])


def format_findings(findings: list[Finding], show_all: bool = False, examples: int = 3) -> str:
    """One block per rule (severity, rule, count, fix), then the nodes it fired on with what
    is wrong there: the first ``examples`` of each rule, or all of them with ``show_all``.
    Node names are printed whole (they are module paths, whose ends and starts both matter)."""
    n_err = len(errors(findings))
    summary = f"TensorRT rule check: {n_err} error(s), {len(findings) - n_err} warning(s)"
    if not findings:
        return summary
    groups = group_findings(findings)
    head = ("severity", "rule", "count", "fix")
    rows = [(g.severity, g.rule, str(g.count), g.fix) for g in groups]
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < 3 else c for i, c in enumerate(r))  # noqa: E731
    out = [summary + f" in {len({g.rule for g in groups})} rule(s)", line(head), "  ".join("-" * x for x in w) + "  ---"]
    hidden = 0
    for g, row in zip(groups, rows):
        out.append(line(row))
        shown = g.findings if show_all else g.findings[:examples]
        out += [f"    {f.node}: {f.message}" for f in shown]
        if len(shown) < g.count:
            out.append(f"    ... {g.count - len(shown)} more {g.rule} finding(s)")
            hidden += g.count - len(shown)
    if hidden:
        out.append(f"({hidden} finding(s) not listed: qwt-check --lint trt MODEL --all-findings lists every one, "
                   "--json prints them as JSON)")
    return "\n".join(out)
