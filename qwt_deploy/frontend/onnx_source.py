"""The pipeline's single source: an FP32 ONNX graph, from a PyTorch model or from a user's file.

- :func:`fp32_onnx_from_module`: an ``nn.Module`` (``--model-factory``, ``--trust-pickle``) or a
  ``torch.export`` program -> one in-memory ``onnx.ModelProto``: weights inline, the same bytes
  for the same module (also across processes, whatever the example values or memory layout),
  forward-argument input names, outputs ``output``/``output_<i>``, dynamic axes named
  (``batch``, the user's ``Dim`` names), BatchNormalization kept for the fold pass.
- :func:`load_fp32_onnx`: a user's ``.onnx`` (external data beside it) checked, shape-inferred,
  and refused with one QwtError line when it cannot be the FP32 source.

Exporter and opset, by measurement
----------------------------------
torch 2.13.0+cpu, onnx 1.23.2, onnxruntime 1.32.0, onnxscript 0.7.2, 2 shared CPU cores.
Time: the faster of two exports in one warm process, ``torch.export`` included. Error: max
abs ONNX Runtime (CPU) vs PyTorch over all outputs, on real inputs at two batch sizes (Fashion-
MNIST test images: 64 and 1; crops of ``skimage.data.astronaut()``: 32/8 and 1, PNet on the
whole photo at 96x128 (batch 2 and 1) and 120x160; MiniLM: 32 and 3 held-out pydoc sentences
of different lengths), "ref" the largest output magnitude.

Time in s, nodes, and error at opset 20 (chosen) / opset 18 (dynamo) / TorchScript opset 17:

===========  ================  ====================  =========================  =======
model        time              nodes                 max abs error              ref
===========  ================  ====================  =========================  =======
Fashion CNN  1.5 / 1.6 / 0.06  40 / 40 / 28 (1)      2.5e-5 / 2.5e-5 / 2.5e-5   12.6
Fashion ViT  2.8 / 3.1 / 0.16  123 / 139 / 382 (2)   2.4e-6 / 3.8e-6 / 2.4e-6   10.6
MTCNN PNet   1.4 / 1.4 / 0.02  10 / 10 / 10          1.7e-6 (all three)         1.0
MTCNN RNet   1.0 / 1.0 / 0.02  15 / 15 / 22          4.8e-7 (all three)         1.0
MTCNN ONet   1.3 / 1.2 / 0.04  19 / 19 / 26          5.4e-7 (all three)         1.05
Lite0        4.3 / 4.9 / 0.51  143 / 143 / 456 (1)   1.2e-5 / 1.2e-5 / 9.5e-6   8.6
MiniLM-L6    5.8 / 6.5 / 0.79  203 / 227 / 462 (2)   2.4e-7 / 2.2e-7 / 1.7e-7   0.23
===========  ================  ====================  =========================  =======

(1) dynamo keeps the 12 / 49 BatchNorms; TorchScript folds them into the Convs.
(2) GELU: one Gelu node at opset 20; Div, Erf, Add, Mul, Mul at 18 and in TorchScript.

Node types with the chosen route (dynamo, opset 20):

- Fashion CNN: Conv 12, BatchNormalization 12, Relu 9, Add 4, ReduceMean 1, Reshape 1, Gemm 1.
- Fashion ViT: Add 33, MatMul 32, Reshape 17, Transpose 17, LayerNormalization 9, Mul 4,
  Softmax 4, Gelu 4, Conv 1, ReduceMean 1, Gemm 1.
- PNet: Conv 5, PRelu 3, MaxPool 1, Softmax 1 (2 outputs; batch, height, width dynamic).
- RNet: PRelu 4, Conv 3, Gemm 3, MaxPool 2, Transpose 1, Reshape 1, Softmax 1 (2 outputs).
- ONet: PRelu 5, Conv 4, Gemm 4, MaxPool 3, Transpose 1, Reshape 1, Softmax 1 (3 outputs).
- Lite0: Conv 49, BatchNormalization 49, Clip 33, Add 9, ReduceMean 1, Reshape 1, Gemm 1.
- MiniLM: Add 56, MatMul 48, Reshape 24, Transpose 24, LayerNormalization 13, Mul 8, Softmax 6,
  Gelu 6, Shape 2, Unsqueeze 2, Cast 2, Concat 2, ReduceSum 2, Clip 2, Div 2, Gather 1,
  Slice 1, Sub 1, ReduceL2 1.

Why dynamo (``torch.onnx.export(..., dynamo=True)``): the same accuracy, far cleaner graphs
(Lite0 143 nodes against 456: TorchScript writes each "same" padding as Pad/Slice/Concat/
ConstantOfShape/Cast/Transpose plus 222 Constants; MiniLM 203 against 462), BatchNorm kept
(TorchScript folds it into the Conv in eval mode, and the pipeline wants to fold it itself),
and TorchScript export is deprecated (a DeprecationWarning in torch 2.13). It is slower
(1-6 s against 0.02-0.8 s), once per model. Both exporters gave byte-identical output twice.

Why opset 20 (torch 2.13's default): the graphs at 18 and 20 are node for node the same except
GELU, which is one ``Gelu`` node at 20 and ``Div, Erf, Add, Mul(0.5), Mul(x)`` at 18. ONNX
Runtime 1.32 fuses the opset-20 Gelu with its MatMul bias into ``BiasGelu`` but does not fuse
the exporter's opset-18 ordering (``0.5 * (1 + erf) * x``; the QDQ exporter's own opset-17 GELU
is the order it does fuse): FP32 MiniLM ran 244-249 ms against 263-274 ms (32 sentences, 2
threads) and the Fashion ViT 50-55 ms against 55-58 ms (256 images). Opset 20 is also what a
user's own ``torch.onnx.export`` writes by default, so both routes into the pipeline see the
same op versions, and FP16 Q/DQ scales (opset >= 19) need no second conversion. The cost:
20 is torchlib's native opset 18 plus onnx's up-converter (valid, ORT-exact on all 7 models
here), and onnx2torch (the planned ONNX->PyTorch calibration route) needs version aliases for
Reshape/Shape/Cast-19 and a Gelu-20 converter, beside the ReduceMean-18 one that opset 18 needs
too (shared/reference/onnx-route.md). ``opset=18`` stays available. Opset 17 (what the QDQ
exporter writes today) is not dependable: the exporter's down-converter gave 17 for the three
MTCNN nets but silently left every model with a ReduceMean (both Fashion nets, Lite0, MiniLM)
at 18, so a result whose opset is not the one asked for is refused.

What the exporter does that this module undoes or fixes:

- It writes weights to an external ``.onnx.data`` when saving to a file; the in-memory
  ``ONNXProgram.model_proto`` has them inline, so no temporary files are written at all.
- Its optimizer folds BatchNorm into Conv/Gemm: run without its three BatchNorm rules.
- It records each node's Python stack trace (absolute paths), fx node and module hierarchy as
  metadata: stripped, with all doc strings (:func:`strip_volatile`).
- Its dynamic-axis symbols are ``s77``-style and separate per input unless an op ties them:
  renamed, with one ``batch`` for every input's axis 0 (:func:`name_dynamic_axes`).
- It sets ``allowzero=1`` on every Reshape: dropped where the shape is a constant without 0
  (:func:`drop_needless_allowzero`; Lite0 and the Fashion nets then have none, MiniLM keeps it
  on its 24 Reshapes whose shapes are computed at run time).
- It renames an input that is also returned as an output (``x`` -> ``x_orig``): inputs get the
  forward's parameter names back.
- A channels-last example (np.stack of HWC->CHW transposed photos keeps that layout) made
  ``torch.export`` trace Lite0's ``view`` as ``as_strided``: 10 more nodes (Shape, Range, Mul,
  3 Add, Gather, ...). Examples are made contiguous first.

``load_fp32_onnx`` takes 0.06 s for Lite0 and 0.8 s for MiniLM (90 MB, external data or not).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import logging
import os
import re
import warnings
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InternalError, QwtError

# The dynamo exporter's opset, chosen by measurement (module docstring): the same graphs as
# opset 18 except GELU, which is one Gelu node that ONNX Runtime fuses (BiasGelu).
OPSET = 20
MIN_OPSET = 7  # the oldest opset onnx.version_converter adapts from
UPGRADE_TO = 17  # older graphs are converted up to this (the QDQ exporter's own opset; per-channel Q/DQ needs 13)

_BN_FUSION_RULES = ("FuseBatchNormIntoConv", "FuseBatchNormIntoConvTranspose", "FuseBatchNormIntoGemm")


# ------------------------------------------------------------------------------ from PyTorch
def fp32_onnx_from_module(module_or_program, example_inputs=None, dynamic_shapes=None,
                          input_names: Optional[Sequence[str]] = None,
                          output_names: Optional[Sequence[str]] = None, *, opset: int = OPSET) -> onnx.ModelProto:
    """FP32 ONNX (weights inline, deterministic bytes) of an ``nn.Module`` or a ``torch.export`` program.

    - ``example_inputs``: a tensor or a tuple of tensors to trace with. A module with an
      ``example_inputs()`` method returning ``(args, dynamic_shapes)`` traces itself with those
      (token models: only the model knows its dtypes and dynamic axes). A program ignores both.
    - ``dynamic_shapes``: as for ``torch.export.export``. A named ``Dim`` keeps its name in the
      ONNX graph; an unnamed dynamic axis 0 is ``"batch"`` (every input of the pipeline is
      batch-first, see :func:`name_dynamic_axes`); other unnamed axes ``<input>_dim<k>``.
    - ``input_names``: default the forward's parameter names; ``output_names``: default
      ``"output"``, or ``"output_0"``, ``"output_1"``, ... for several outputs (pytree order), as
      the QDQ exporter names them.

    BatchNormalization stays in the graph (the exporter's optimizer would fold it into the
    Conv; the pipeline's fold pass does that itself)."""
    import torch

    program, spec_names = _export_program(module_or_program, example_inputs, dynamic_shapes)
    with _quiet():
        try:
            onnx_program = torch.onnx.export(program, (), dynamo=True, optimize=False, opset_version=opset,
                                             verbose=False, report=False)
        except Exception as e:  # ConversionError, DispatchError, TorchExportError, ...
            raise _conversion_error(e) from None
        _optimize_keeping_batchnorm(onnx_program.model)
        model = onnx_program.model_proto  # in memory: initializers are inline raw_data, no files
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:  # the down-converter leaves what it cannot convert at 18, silently
        raise QwtError(f"torch.onnx wrote opset {got} where opset {opset} was asked for",
                       f"export with opset {OPSET} (the default) or any opset from 18 up")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise InternalError("the in-memory ONNX export has external initializers")
    if input_names is None:  # the forward's names; the exporter renames an input that is also an output
        input_names = [n for n in program.graph_signature.user_inputs]
        if len(input_names) != len(_real_inputs(model.graph)):
            input_names = None  # non-tensor arguments (specialised away): keep the exporter's names
    _rename_io(model, input_names, output_names)
    name_dynamic_axes(model, spec_names)
    drop_needless_allowzero(model)
    name_nodes_by_module(model)
    strip_volatile(model)
    _check_exported(model)
    return model


def _export_program(obj, example_inputs, dynamic_shapes):
    """``(program, {torch symbol: Dim name})``: ``torch.export`` (non-strict, eval mode) with one
    QwtError line when it cannot trace.

    Exporting here instead of inside torch.onnx.export: one capture (torch.onnx.export retries
    in strict mode, and behind a flag with draft_export, which records guesses), and a tracing
    failure that reads differently from an ONNX translation failure."""
    import torch

    if isinstance(obj, torch.export.ExportedProgram):
        return obj, {}
    if not isinstance(obj, torch.nn.Module):
        raise QwtError(f"cannot export {type(obj).__name__} to ONNX",
                       "pass an nn.Module or a torch.export program")
    model = obj.eval()
    if callable(getattr(model, "example_inputs", None)):
        args, dynamic_shapes = model.example_inputs()
    elif example_inputs is None:
        raise QwtError(f"no example inputs to trace {type(model).__name__} with",
                       "pass example tensors, or give the model an example_inputs() method "
                       "returning (args, dynamic_shapes)")
    else:
        args = example_inputs
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    # Contiguous examples: torch.export traces strides, and a channels-last example (a numpy
    # HWC->CHW transpose stacked with np.stack keeps that layout) turned Lite0's final
    # x.view(bs, -1) into as_strided index arithmetic (Shape, Range, Mul, 3 Add, Gather: 10
    # more nodes). ONNX tensors have no strides, so the layout of the example must not matter.
    args = _contiguous(args)
    try:  # on failure torch.export also print()s the partial graph to stderr: the QwtError says it
        with torch.no_grad(), _quiet(), contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch raises many types here; all mean "not exportable"
        raise QwtError(
            f"torch.export could not trace the model ({type(e).__name__}: {_first_line(e, 300)})",
            "make the forward traceable by torch.export (no data-dependent Python control flow), "
            "or export the model to ONNX yourself and pass the .onnx file",
        ) from None
    params = list(inspect.signature(model.forward).parameters)
    return program, _dim_names_from_spec(program, dynamic_shapes, params)


def _contiguous(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_contiguous(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _quiet():
    """Silence torch's chatter while exporting: FutureWarnings from its internals, a warning per
    torchvision op when torchvision is absent (it is, beside this torch), and symbolic-shape
    warnings that print the traced graph. A failure still raises, and becomes one QwtError."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_OP_PATTERNS = (r"OpOverload\(op='([^']+)', overload='([^']+)'\)", r"target=torch\.ops\.([\w.]+)")


def _conversion_error(e: Exception) -> QwtError:
    """One line from the exporter's multi-paragraph error, naming the operator when it says."""
    chain, cause = [e], e.__cause__ or e.__context__
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(str(c) for c in chain)
    op = None
    for pat in _OP_PATTERNS:
        m = re.search(pat, text)
        if m:
            op = ".".join(g for g in m.groups() if g)
            break
    fix = ("replace it with standard torch ops, or export the model to ONNX yourself "
           "(torch.onnx.export with custom_translation_table) and pass the .onnx file")
    if op and "No ONNX function found" in text:
        return QwtError(f"torch.onnx has no ONNX translation for the operator {op}", fix)
    if op:
        return QwtError(f"torch.onnx failed to translate the operator {op} ({_first_line(chain[-1])})", fix)
    return QwtError(f"torch.onnx could not export the model ({type(e).__name__}: {_first_line(e)})",
                    "export the model to ONNX yourself and pass the .onnx file")


def _optimize_keeping_batchnorm(ir_model) -> None:
    """The exporter's own optimizer (constant folding, Pad into Conv, Min/Max into Clip, dead
    code, CSE) without its three BatchNorm fusion rules: the pipeline folds BatchNorm itself.
    ``optimize_ir`` reads the rule list from ``onnxscript.rewriter`` at call time, so it is
    swapped for the call; a renamed rule list in a newer onnxscript is an error, not a
    silent fold."""
    import onnxscript.optimizer
    import onnxscript.rewriter as rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        raise InternalError("onnxscript.rewriter._DEFAULT_REWRITE_RULES is gone: update _optimize_keeping_batchnorm")
    kept = tuple(r for r in rules if getattr(r, "name", None) not in _BN_FUSION_RULES)
    rewriter._DEFAULT_REWRITE_RULES = kept
    try:
        onnxscript.optimizer.optimize_ir(ir_model)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _rename_io(model: onnx.ModelProto, input_names, output_names) -> None:
    g = model.graph
    inits = {t.name for t in g.initializer}
    ins = [v for v in g.input if v.name not in inits]
    outs = list(g.output)
    if output_names is None:
        output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    for kind, values, names in (("input", ins, input_names), ("output", outs, output_names)):
        if names is None:
            continue
        names = list(names)
        if len(names) != len(values) or len(set(names)) != len(names):
            raise QwtError(f"{len(names)} {kind} names {names} for a model with {len(values)} {kind}s",
                           f"give one distinct name per {kind}")
        rename_values(model, {v.name: n for v, n in zip(values, names) if v.name != n})


def rename_values(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere in the main graph (and in subgraphs reading them)."""
    if not mapping:
        return
    taken = _all_value_names(model.graph) - set(mapping)
    clash = sorted(set(mapping.values()) & taken)
    if clash:  # a new name already used by another tensor: move that one aside first
        rename_values(model, {c: _fresh(c, taken | set(mapping.values())) for c in clash})

    def fix(graph):
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            v.name = mapping.get(v.name, v.name)
        for t in graph.initializer:
            t.name = mapping.get(t.name, t.name)
        for n in graph.node:
            n.input[:] = [mapping.get(x, x) for x in n.input]
            n.output[:] = [mapping.get(x, x) for x in n.output]
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    fix(sub)

    fix(model.graph)


def _fresh(name: str, taken: set) -> str:
    i = 1
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def _all_value_names(graph) -> set:
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    names.discard("")
    return names


# --------------------------------------------------------------------- dynamic axes, naming
def _dim_names_from_spec(program, dynamic_shapes, param_names: Sequence[str]) -> dict[str, str]:
    """torch symbol (``"s52"``) -> the name of the user's ``torch.export.Dim`` at that axis.

    torch keeps a ``Dim``'s name only in the call's spec (the program's symbols are ``s<k>``),
    so the spec is matched against the program's input placeholders: positional (a tuple or
    list per argument) or by parameter name (a dict); per tensor a dict ``{axis: Dim}`` or a
    sequence with one entry per axis. ``Dim.DYNAMIC``/``Dim.AUTO`` and nested inputs have no
    name and get the default rule of :func:`name_dynamic_axes`."""
    if not dynamic_shapes:
        return {}
    if isinstance(dynamic_shapes, dict):
        per_input = [dynamic_shapes.get(n) for n in param_names]
    else:
        per_input = list(dynamic_shapes)
    user = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    out: dict[str, str] = {}
    for name, spec in zip(user, per_input):
        val = nodes[name].meta.get("val") if name in nodes else None
        if spec is None or not hasattr(val, "shape"):
            continue
        items = spec.items() if isinstance(spec, dict) else enumerate(spec) if isinstance(spec, (list, tuple)) else ()
        for axis, dim in items:
            dim_name = getattr(dim, "__name__", None)
            if not isinstance(dim_name, str) or not isinstance(axis, int) or axis >= len(val.shape):
                continue
            size = val.shape[axis]
            if not isinstance(size, int):
                out.setdefault(str(size), dim_name)
    return out


def name_dynamic_axes(model: onnx.ModelProto, known: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Give the exporter's symbols (``s77``) stable names, and one name to the batch axis.

    Rule: a symbol named by the user keeps that name; any other symbol at axis 0 of a graph
    input is ``"batch"``; the first at axis 1 of an integer (token id) input ``"seq"`` (a saved
    program keeps no ``Dim`` names); any other symbol ``<input>_dim<axis>`` after the first input
    that has it. Expressions (``2*s77``) in outputs and value_info are rewritten token by token.

    Why one ``"batch"``: the dynamo exporter gives each input its own batch symbol unless an
    op ties them (SmolLM2's ids and mask got two, shared/reference/onnx-route.md; two inputs
    that meet only in separate outputs do too, tests/unit/frontend). The pipeline's inputs are
    all batch-first (``Graph.dims``, ``InputSet`` batches every input along axis 0, the QDQ
    exporter writes ``"batch"`` for each), while ONNX Runtime, shape inference and TensorRT
    profiles treat distinct dim_params as unrelated sizes: a value computed from both inputs
    then has an unknown batch, and a TensorRT profile could give the two inputs different
    batch sizes. The exporter's own names (``s77``) are stable but say nothing."""
    known = dict(known or {})
    g = model.graph
    inits = {t.name for t in g.initializer}
    mapping: dict[str, str] = {}
    for v in g.input:
        if v.name in inits:
            continue
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            sym = d.dim_param
            if not sym or sym in mapping or not re.fullmatch(r"[A-Za-z_]\w*", sym):
                continue
            token = v.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
            mapping[sym] = known.get(sym) or ("batch" if axis == 0 else "seq" if axis == 1 and token and
                                              "seq" not in mapping.values() else f"{v.name}_dim{axis}")
    if not mapping:
        return {}
    pat = re.compile(r"\b(" + "|".join(re.escape(s) for s in sorted(mapping, key=len, reverse=True)) + r")\b")

    def fix(values):
        for v in values:
            if not v.type.HasField("tensor_type"):
                continue
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = pat.sub(lambda m: mapping[m.group(1)], d.dim_param)

    fix(list(g.input) + list(g.output) + list(g.value_info))
    return mapping


def drop_needless_allowzero(model: onnx.ModelProto) -> int:
    """Remove ``allowzero=1`` from Reshapes whose target shape is a constant without a 0.

    The dynamo exporter sets ``allowzero=1`` on every Reshape (``aten.view`` semantics: a 0 is
    a size, not "copy this dim"). ``allowzero`` only changes what a 0 in the shape means, so
    without a 0 both readings are the same and the attribute can go. Why bother: consumers
    that do not implement it refuse the node (onnx2torch raises ``"allowzero=1" is not
    implemented``, shared/reference/onnx-route.md), and the pipeline's planned ONNX->PyTorch
    route is one. Shapes computed at run time keep the attribute. Returns how many changed."""
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    changed = 0
    for n in model.graph.node:
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or len(n.input) < 2 or n.input[1] not in consts:
            continue
        keep = [a for a in n.attribute if not (a.name == "allowzero" and a.i == 1)]
        if len(keep) == len(n.attribute):
            continue
        if 0 in onnx.numpy_helper.to_array(consts[n.input[1]]).reshape(-1).tolist():
            continue
        del n.attribute[:]
        n.attribute.extend(keep)
        changed += 1
    return changed


NAME_SCOPES = "pkg.torch.onnx.name_scopes"


# the op that a module is named for, when the module makes several nodes (a Linear's MatMul
# beside its bias Add, a Conv beside a fused Pad)
_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "BatchNormalization",
                        "LayerNormalization", "InstanceNormalization", "GroupNormalization", "PRelu"})


def name_nodes_by_module(model: onnx.ModelProto) -> int:
    """Name each node after the PyTorch module that made it (``_blocks.3._expand_conv``,
    ``layers.0.attention.self.query``), from the exporter's ``name_scopes`` metadata. Returns
    how many nodes were renamed.

    Why: the exporter's own names (``node_Conv_797``) say nothing to a user, and module paths are
    what the pipeline keys on. QwT (v1) finds residual blocks by the module path (``_blocks.3``,
    ``layers.2``: :mod:`qwt_deploy.graph.blocks`), ``--keep-float`` selects layers by it, and
    ``qwt-check`` names the first diverging layer with it.

    A module's only node, or its first layer op (Conv, Gemm, MatMul... beside a bias Add), takes
    the bare module path; any other node ``<module>/<op type>`` (``blocks.0/Add``, the residual
    Add in a block's forward; ``Add`` outside any submodule), then ``#<n>`` on a repeat.""" 
    scoped = []
    for n in model.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == NAME_SCOPES), None)
        try:
            parts = [s for s in ast.literal_eval(scopes) if s and not s.startswith("_empty_nn_module_stack")] \
                if scopes else []
        except (ValueError, SyntaxError):
            parts = []
        module = parts[-2] if len(parts) >= 2 else None
        scoped.append((n, module, bool(parts)))
    count: dict = {}
    for n, module, _ in scoped:
        if module:
            count[module] = count.get(module, 0) + 1
    taken: set = set()
    renamed = 0
    for n, module, has_scope in scoped:
        if not has_scope:
            continue
        if module and module not in taken and (count[module] == 1 or n.op_type in _LAYER_OPS):
            name = module
        else:  # the op type, not the fx name: fx numbers (add_45) change with how it was traced
            name = f"{module}/{n.op_type}" if module else n.op_type
        base, k = name, 1
        while name in taken:
            k += 1
            name = f"{base}#{k}"
        taken.add(name)
        if n.name != name:
            n.name, renamed = name, renamed + 1
    return renamed


def strip_volatile(model: onnx.ModelProto) -> None:
    """Remove what differs between two exports of the same module: doc strings and metadata
    (the exporter records each node's Python stack trace with absolute file paths, the fx node
    repr and the module hierarchy). Names, shapes, attributes and weights stay."""

    def clear(x):  # anything with a doc string and metadata (model, graph, value, tensor, node, function)
        x.doc_string = ""
        del x.metadata_props[:]

    def graph(gr):
        clear(gr)
        for x in list(gr.input) + list(gr.output) + list(gr.value_info) + list(gr.initializer):
            clear(x)
        nodes(gr.node)

    def nodes(ns):
        for n in ns:
            clear(n)
            for a in n.attribute:
                a.doc_string = ""
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    graph(sub)

    clear(model)
    graph(model.graph)
    for f in model.functions:
        clear(f)
        nodes(f.node)


def _check_exported(model: onnx.ModelProto) -> None:
    """Our own export must be valid ONNX: a failure is a bug here or in the exporter."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise InternalError(f"the exported ONNX graph is invalid: {_first_line(e)}") from None


# ------------------------------------------------------------------------------ from a file
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
# Ops that mean the graph is already quantized (standard and onnxruntime's com.microsoft).
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                 "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool", "QLinearSoftmax",
                 "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
                 "DequantizeBFP", "QuantizeBFP", "QOrderedMatMul"}
_TWO_GB = 2 ** 31


def source_opset(model: "str | onnx.ModelProto") -> Optional[int]:
    """The default-domain opset of a model or of an ONNX file (read without its weights)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_conversion(original_path: str, converted: onnx.ModelProto, feeds: dict, rtol: float = 1e-5) -> float:
    """ONNX Runtime on the user's file and on its opset conversion, same inputs: the largest
    output difference relative to the output's range; QwtError if above ``rtol``."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(original_path, so, providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(converted.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    worst = max(float(np.abs(x - y).max() / max(float(np.abs(x).max()), 1e-30)) for x, y in zip(a, b))
    if worst > rtol:
        raise QwtError(f"converting {original_path} to opset {source_opset(converted)} changed its outputs "
                       f"(relative difference {worst:.2g})", f"re-export the model with opset {UPGRADE_TO} or newer")
    return worst


def load_fp32_onnx(path: str) -> onnx.ModelProto:
    """A user's FP32 ``.onnx`` file, validated, with its external data loaded and shapes inferred.

    Reads the file (and ``.data`` files beside it); never writes. Refuses, with one QwtError line
    each: a missing/empty/non-ONNX file, a missing external-data file, a graph the ONNX checker
    rejects, an opset below 13, an already quantized graph, non-tensor inputs, non-FP32 float
    inputs, a graph where no float tensor depends on the inputs, and a failed shape inference."""
    if not os.path.isfile(path):
        raise QwtError(f"ONNX file {path} does not exist", "check the path")
    if os.path.getsize(path) == 0:
        raise QwtError(f"ONNX file {path} is empty", "export the model to ONNX again")
    if os.path.getsize(path) >= _TWO_GB:
        raise QwtError(f"{path} is over 2 GB in one file, which protobuf cannot parse",
                       "export with external data (weights in a .data file beside the .onnx)")
    kind = _sniff_not_onnx(path)
    if kind:
        raise QwtError(f"{path} is {kind}, not an ONNX model",
                       "pass an .onnx file, or pass the PyTorch model as the model file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # google.protobuf DecodeError, RuntimeError, ...
        raise QwtError(f"{path} is not an ONNX model ({type(e).__name__}: {str(e)[:120]})",
                       "pass an .onnx file written by an ONNX exporter") from None
    # protobuf parses many byte strings as an (almost) empty message: a real model has an IR
    # version and an opset import.
    if model.ir_version == 0 or not model.opset_import:
        raise QwtError(f"{path} is not an ONNX model (no IR version or opset)",
                       "pass an .onnx file written by an ONNX exporter")
    if not model.graph.node:
        raise QwtError(f"{path} has no operators, so there is nothing to quantize", "pass the model's ONNX file")
    _load_external(model, path)
    if model.ByteSize() >= _TWO_GB:
        raise QwtError(f"{path} holds over 2 GB of weights, more than one in-memory ONNX model can",
                       "quantize a smaller model (models over 2 GB are not supported yet)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    # Opset 13 first has per-channel QuantizeLinear/DequantizeLinear (the axis attribute),
    # which INT8 weights need, and the exporter writes opset 17: an older graph (PP-OCRv4 det
    # from Paddle2ONNX is opset 12) is converted *up* with onnx.version_converter. Going down
    # fails on real graphs (shared/reference/onnx-route.md); going up 12 -> 17 gave outputs
    # identical to the original in ONNX Runtime on PP-OCRv4 det, and the API checks that on the
    # user's own calibration data before calibrating (api.quantize), so a bad conversion is an
    # error, never a silently different model.
    if opset is None:
        raise QwtError(f"{path} imports no standard ONNX opset (only {[o.domain for o in model.opset_import]})",
                       "export the model with standard ONNX operators, opset 13 or newer")
    if opset < MIN_OPSET:
        raise QwtError(f"{path} uses ONNX opset {opset}, below {MIN_OPSET}, the oldest that can be converted",
                       f"re-export the model with a newer opset (e.g. torch.onnx.export(..., opset_version={OPSET}))")
    if opset < UPGRADE_TO:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, UPGRADE_TO)
        except Exception as e:
            raise QwtError(f"{path} uses ONNX opset {opset} and cannot be converted to opset {UPGRADE_TO} "
                           f"({_first_line(e)})",
                           f"re-export the model with opset {UPGRADE_TO} or newer") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # ValidationError, or onnx's C++ errors
        raise QwtError(f"{path} is not a valid ONNX model ({_first_line(e)})",
                       "re-export the model; the ONNX checker must accept it") from None
    # Already quantized: Q/DQ nodes (QDQ format) or integer ops (QOperator format). A second
    # quantization would calibrate on already rounded values and stack two roundings; the
    # compensation needs the FP32 weights. Subgraphs (If/Loop bodies) count too.
    q = sorted({n.op_type for n in _all_nodes(model.graph) if n.op_type in QUANTIZED_OPS})
    if q:
        raise QwtError(f"{path} is already quantized (it contains {', '.join(q)})",
                       "pass the FP32 model it was made from")
    _check_inputs(model, path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # InferenceError and C++ errors
        raise QwtError(f"ONNX shape inference fails on {path} ({_first_line(e)})",
                       "re-export the model; shapes and types must be consistent") from None
    _check_float_path(inferred, path)
    return inferred


def _first_line(e: Exception, limit: int = 200) -> str:
    """The first line of an error; with the next one when the first only introduces it
    ("Found the following conflicts ...:")."""
    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1].lstrip('- ')}"
    return first[:limit]


def _sniff_not_onnx(path: str) -> str:
    """A description of a file that is clearly something else (by its first bytes), else ''."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch save, torch.export program or TorchScript)"
    if head[:1] == b"\x80":
        return "a pickle (a PyTorch save)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras)"
    return ""


def _load_external(model: onnx.ModelProto, path: str) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    ext = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not ext:
        return
    base = os.path.dirname(os.path.abspath(path))
    for t in ext:
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if not os.path.isfile(os.path.join(base, loc)):
            raise QwtError(f"{path} keeps weights in {loc!r}, which is not beside it",
                           f"put {os.path.basename(loc)} in {base} (external data is looked up next to the .onnx)")
    try:
        load_external_data_for_model(model, base)
    except Exception as e:  # a truncated .data file, a location outside the folder, ...
        raise QwtError(f"the external data of {path} cannot be read ({_first_line(e)})",
                       "export the model again with its .data file") from None


def _all_tensors(model: onnx.ModelProto):
    """Initializers and Constant/attribute tensors, subgraphs included (where external data can be)."""
    def graph(g):
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from graph(sub)

    return list(graph(model.graph))


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_nodes(sub)


def _real_inputs(graph):
    """Graph inputs that are not initializers (IR < 4 files list every weight as an input)."""
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def _check_inputs(model: onnx.ModelProto, path: str) -> None:
    ins = _real_inputs(model.graph)
    if not ins:
        raise QwtError(f"{path} has no inputs other than weights",
                       "export the model with its input tensors as graph inputs")
    for v in ins:
        # calibration data are arrays: sequences, maps, optionals and sparse tensors cannot be fed
        if not v.type.HasField("tensor_type"):
            raise QwtError(f"input {v.name!r} of {path} is a {v.type.WhichOneof('value')}, not a tensor",
                           "export the model with tensor inputs")
        et = v.type.tensor_type.elem_type
        # The pipeline calibrates, compensates and simulates in FP32; an FP16/BF16/FP64 input
        # means the graph is in that precision and would be quantized against the wrong reference.
        if et in FLOAT_TYPES and et != onnx.TensorProto.FLOAT:
            raise QwtError(f"input {v.name!r} of {path} is {onnx.TensorProto.DataType.Name(et).lower()}, not float32",
                           "export the FP32 model (model.float() before exporting)")


def _check_float_path(model: onnx.ModelProto, path: str) -> None:
    """Refuse a graph in which no float tensor depends on the inputs: nothing to calibrate.

    Not "no float inputs": token models (all-MiniLM: int64 ids and mask) have none, but their
    embedding Gather makes float activations from them. So the rule follows the inputs through
    the graph (types from shape inference) and asks for one float value on the way."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)
             if v.type.HasField("tensor_type")}
    reached = {v.name for v in _real_inputs(g)}
    if any(types.get(n) == onnx.TensorProto.FLOAT for n in reached):
        return
    for n in g.node:  # nodes are topologically sorted (the checker enforces it)
        if any(x in reached for x in n.input if x):
            for y in n.output:
                reached.add(y)
                if types.get(y) == onnx.TensorProto.FLOAT:
                    return
    names = ", ".join(f"{v.name}: {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()}"
                      for v in _real_inputs(g))
    raise QwtError(f"{path} computes no float tensor from its inputs ({names}), so there is nothing to quantize",
                   "pass an FP32 model whose inputs feed float computations (images, embeddings)")


# ---------------------------------------------------------------------------- fixed batch axis
BATCH = "batch"


def fixed_batch(model: onnx.ModelProto) -> Optional[int]:
    """The batch size B when every graph input is float with the same fixed axis 0 of size B;
    None when an input's axis 0 is already dynamic (or an input is not float: token models
    trace their own dynamic axes)."""
    sizes = set()
    for v in _real_inputs(model.graph):
        t = v.type.tensor_type
        if t.elem_type != onnx.TensorProto.FLOAT or not t.HasField("shape") or not t.shape.dim:
            return None
        d = t.shape.dim[0]
        if d.dim_param or not d.HasField("dim_value") or d.dim_value < 1:
            return None
        sizes.add(d.dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def free_batch_axis(model: onnx.ModelProto, check_inputs: Optional[dict] = None) -> Optional[int]:
    """Make a graph traced at a fixed batch B (a ``torch.export`` program saved without dynamic
    shapes, as torch.export does by default) take any batch size, in place; returns B, or None
    if the batch axis was already dynamic.

    Why: the pipeline calibrates, checks and serves in batches of its own choosing, and a graph
    fixed at the traced batch of 2 runs on nothing else. Conv, Gemm and element-wise ops do not
    care about the batch; what pins it is the declared input/output shapes and the constant
    target shapes of Reshape (``x.view(2, -1)`` traced from ``x.view(x.size(0), -1)``). So the
    inputs' and outputs' axis 0 become ``batch``, and a Reshape whose constant shape starts with
    B gets 0 there ("copy the input's axis 0", or -1 under ``allowzero``).

    That rewrite assumes axis 0 of those reshapes is the batch. It is proven, not assumed: the
    rewritten graph must give the original's outputs at batch B, and at batch 2B each half must
    equal the original on that half (samples independent). Otherwise a QwtError says to export
    with a dynamic batch axis. ``check_inputs``: one array per input at batch B (default: a
    fixed-seed normal sample, a mechanics check of the rewrite, not an accuracy figure)."""
    b = fixed_batch(model)
    if b is None:
        return None
    original = onnx.ModelProto()
    original.CopyFrom(model)
    g = model.graph
    ins = _real_inputs(g)
    for v in list(ins) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == b:
            dims[0].Clear()
            dims[0].dim_param = BATCH
    del g.value_info[:]  # inferred with the fixed batch; shape inference redoes them
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in consts:
            continue
        shape = numpy_helper.to_array(consts[n.input[1]]).copy()
        if shape.ndim != 1 or not len(shape) or int(shape[0]) != b:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in n.attribute)
        if allowzero and -1 in shape.tolist():
            continue
        shape[0] = -1 if allowzero else 0
        name = _fresh(f"{n.input[1]}_free_batch", _all_value_names(g))
        g.initializer.append(numpy_helper.from_array(shape, name))
        n.input[1] = name
    _check_free_batch(original, model, b, check_inputs)
    return b


def _check_free_batch(original, freed, b: int, check_inputs: Optional[dict]) -> None:
    import onnxruntime as ort

    names = [v.name for v in _real_inputs(original.graph)]
    if check_inputs is None:
        rng = np.random.default_rng(0)
        check_inputs = {}
        for v in _real_inputs(original.graph):
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 8 for d in v.type.tensor_type.shape.dim]
            check_inputs[v.name] = rng.standard_normal(shape).astype(np.float32)
    other = {k: np.ascontiguousarray(v[::-1] * 0.5) for k, v in check_inputs.items()}  # a second, different batch
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    try:
        ref = ort.InferenceSession(original.SerializeToString(), so, providers=["CPUExecutionProvider"])
        new = ort.InferenceSession(freed.SerializeToString(), so, providers=["CPUExecutionProvider"])
        want = [ref.run(None, check_inputs), ref.run(None, other)]
        got = new.run(None, {k: np.concatenate([check_inputs[k], other[k]]) for k in names})
        same = new.run(None, check_inputs)
        close = lambda x, y: x.shape == y.shape and np.allclose(x, y, rtol=1e-4, atol=1e-5)  # noqa: E731
        ok = all(close(s, w) for s, w in zip(same, want[0])) and all(
            close(g_[:b], w0) and close(g_[b:], w1) for g_, w0, w1 in zip(got, want[0], want[1]))
    except Exception:  # ORT raises Fail/InvalidArgument/RuntimeException...: all mean "depends on the batch"
        ok = False
    if not ok:
        raise QwtError(f"the model was traced at a fixed batch of {b} and its graph depends on it",
                       "export it with a dynamic batch axis, e.g. torch.export.export(m, (x,), "
                       "dynamic_shapes=({0: torch.export.Dim('batch')},)), or pass the nn.Module")
