"""``qwt-check``: one model, one set of real inputs, every backend, compared in quantization steps.

Paths run on the same batches (Polygraphy ``Comparator.run(streaming=True)``):

- ``pytorch-fp32``: the captured model in float (BatchNorm folded; equal to the PyTorch
  module within float rounding -- checked on the first batch and reported);
- ``pytorch-fake-quant[T]``: the simulation of target T's QDQ graph, the thing CWAC was
  fitted against;
- ``ort-cpu[T]``: ONNX Runtime CPU on T's folded QDQ file. For ``ort`` with the integer
  kernels (QLinearConv...); for ``trt`` with QDQ fusion disabled (``session.disable_quant_qdq``),
  i.e. Q/DQ executed as float ops -- the float simulation TensorRT's INT8 kernels approximate;
- ``ort-cuda[T]``, ``ort-trt-ep[trt]``, ``tensorrt[trt]`` where the execution provider or
  TensorRT and a GPU exist; otherwise listed as skipped with the reason.

Inputs are an :class:`qwt_deploy.data.inputs.InputSet`: one array per graph input (an image; or
token ids + attention mask), fed to every runner as one dict per batch (token batches sorted by
length and trimmed to their longest sentence); the simulation runner gets a tuple.

Per output: max/mean |error| in output quantization steps, fraction within ``atol_steps``,
cosine (mean and lowest row), top-1 agreement for class scores, for each backend vs its
fake-quant (the gate) and each quantized path vs FP32. Class scores and other outputs are gated
on the element fraction; embeddings (unit-norm rows) on the lowest row cosine, see
``EMBEDDING_NOTE``. Per layer: SQNR vs FP32 for every float IR value (integer inputs and what
integer ops compute from them have no quantizer and are skipped), and the first layer where a
backend parts from its fake-quant.

Intermediate tensors are read by marking them as graph outputs (Polygraphy ModifyOutputs).
The tensors marked are the DequantizeLinear outputs (a quantized value as its readers see it).
ONNX Runtime still fuses the integer kernels: it duplicates a DQ that also feeds a graph
output (EnsureUniqueDQForNodeUnit), so the marked copy dequantizes the same uint8 codes the
QLinearConv consumed. That is checked on every run, not assumed: the integer-kernel counts of
the marked and unmarked sessions and their final outputs on the first batch are compared and
reported under ``marking_check``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import onnx

from ..data.inputs import InputSet

from ..config import ExportConfig
from ..errors import QwtError
from ..log import logger
from ..targets import Target
from .agreement import STEP_SLACK, compare, output_kind, output_step, row_cosines
from .layerwise import LayerRecord, SqnrAccumulator, StepAccumulator, first_divergence, first_large_error
from .runners import (SIM_PREFIX, SessionWithProviders, SimulationRunner, fusion_neutral, input_specs,
                      mark_outputs, ort_gpu_providers, trt_runner, trt_unavailable_reason)

FP32 = "pytorch-fp32"


def fake_quant_name(target: str) -> str:
    return f"pytorch-fake-quant[{target}]"


@dataclass
class CheckConfig:
    # model, calibration and quantization settings (target set per target); the API fills it in
    export: ExportConfig = field(default_factory=lambda: ExportConfig(model=None, output=""))
    targets: tuple[str, ...] = ("ort",)
    # held-out inputs: 'bundled' (the example's own held-out data: real photos, test images,
    # sentences never calibrated on) | .npy/.npz (an .npz with one array per input for token
    # models) | image folder
    inputs: str = "bundled"
    num_inputs: int = 128
    batch_size: int = 8
    atol_steps: float = 1.0
    min_agreement: float = 0.999  # fraction of elements within atol_steps (backend vs its fake-quant)
    # Embedding outputs (see output_kind) are gated on the mean row cosine to the backend's
    # fake-quant, because cosine is what embedding users consume and because the element
    # figures of a model with float LayerNorm/GELU/Softmax cannot reach 1 step (see EMBEDDING_NOTE).
    # 0.995: all-MiniLM-L6-v2 measured 0.9987 (ort) / 0.9981 (trt layout) on 128 held-out
    # sentences before the MatMulIntegerToFloat emulation (~0.9999 after), while one linear with
    # flipped weight channels falls far below (tests).
    min_cosine: float = 0.995
    step_gate_embeddings: bool = False  # also apply atol_steps/min_agreement to embedding outputs
    output_kind: str = "auto"  # auto | classes | embedding (auto: unit-norm rows are embeddings)
    large_error_steps: float = 2.0  # per-layer locator of real breakage under rounding flips (first_large_error)
    onnx_files: dict[str, str] = field(default_factory=dict)  # target -> an already exported file to check
    layerwise: bool = True
    gpu: bool = True  # try the CUDA / TensorRT paths
    # also run OpenVINO CPU on each file (openvino-cpu[T]). Asked for, not default: OpenVINO
    # requantizes in its own float order, so its rounding flips compound with depth (Lite0: ~83%
    # of logits within 1 step of the fake-quant, top-1 99%) and the default gate would fail
    # wherever openvino happens to be installed.
    openvino: bool = False


@dataclass
class PathSpec:
    name: str
    kind: str  # fp32 | fake-quant | backend
    target: Optional[str]
    description: str
    runner: object = None
    tensor_of: dict[str, Optional[str]] = field(default_factory=dict)  # IR value -> runner output key
    outputs: list[str] = field(default_factory=list)  # runner output keys of the graph outputs
    reference: Optional[str] = None  # the fake-quant path a backend must match
    skipped: Optional[str] = None
    layerwise: bool = False
    also_vs: tuple[str, ...] = ()  # other backends on the same file, compared per output but not gated


QuantizedModelLike = "qwt_deploy.api.QuantizedModel"  # defined one layer up; check never imports it


@dataclass
class CheckedFile:
    """One target's quantized model and the folded file that is checked."""

    quantized: "QuantizedModelLike"  # api.QuantizedModel: graph, plan, params, target, loaded
    model: onnx.ModelProto  # the folded file that is checked
    data: bytes
    names: dict[str, Optional[str]]  # IR value -> ONNX tensor name in that file (None: not found)
    source: str = "re-exported by qwt-check"  # or the user's file
    identical_to_reexport: Optional[bool] = None

    @property
    def target(self) -> Target:
        return self.quantized.target

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def qm(self):
        return self.quantized

    @classmethod
    def of(cls, exported, names: dict[str, str], user_file: Optional[str] = None) -> "CheckedFile":
        """The re-exported file, or ``user_file`` (an already exported .onnx) checked in its place."""
        model, data, source, same = exported.folded, exported.data, "re-exported by qwt-check", None
        if user_file is not None:
            model, data = _load_onnx_file(user_file)
            source, same = user_file, data == exported.data
            if not same:
                logger.info(f"note: {source} differs from what these settings export; checking the file as given")
        present = _graph_tensors(model)
        mapped = {v: (t if t in present else None) for v, t in names.items()}
        return cls(exported.quantized, model, data, mapped, source, same)


def _graph_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {o for n in g.node for o in n.output} | {i.name for i in g.input}


def _load_onnx_file(path: str) -> tuple[onnx.ModelProto, bytes]:
    if not os.path.isfile(path):
        raise QwtError(f"ONNX file {path} does not exist", "pass the path of an exported .onnx file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return onnx.load_from_string(data), data
    except Exception as e:
        raise QwtError(f"{path} is not a readable ONNX model ({type(e).__name__})", "pass a file qwt-export wrote") from None


def as_check_inputs(e: QwtError) -> QwtError:
    """The loaders' checks are the calibration data's; say which flag is wrong."""
    problem = e.problem.replace("calibration data", "check inputs").replace("--calib-data", "--inputs")
    if "check inputs" not in problem:  # e.g. the .npz loader's "x.npz holds ... but the model also needs ..."
        problem = "check inputs: " + problem
    return QwtError(problem, e.fix.replace("calib.npz", "heldout.npz"))


def _value_steps(t: CheckedFile, values: list[str], fp32_first: dict[str, np.ndarray]) -> dict[str, float]:
    """Step of each value: its own quantizer's in this target, else an 8-bit grid over the
    FP32 range seen on the first batch (unquantized values such as float conv outputs)."""
    acts = t.qm.params.acts
    out = {}
    for v in values:
        q = acts.get(v)
        out[v] = float(q.scale) if q is not None else output_step(fp32_first[v])
    return out


def onnx_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs of an exported file, in order (the export keeps ``graph.inputs``' order)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def compared_values(graph, x: InputSet) -> list[str]:
    """IR values compared layer by layer: float graph inputs and every node output whose FP32
    value is floating point. Integer inputs (token ids, attention masks) and what is computed
    from them by integer ops (the unsqueezed mask) have no quantizer and are equal in every
    path by construction, so they carry no per-layer information."""
    import torch

    from ..quantization.simulate import SimulatedModel

    values: dict = {}
    with torch.no_grad():
        SimulatedModel(graph)(x.head(min(len(x), 2)).torch(), intermediates=values)
    ordered = list(graph.inputs) + [n.output for n in graph.nodes]
    # (a node with several outputs, e.g. Split, holds a tuple: its onnx_output nodes are compared)
    return [v for v in ordered if v in values and torch.is_tensor(values[v]) and values[v].is_floating_point()]


def feed_dicts(x: InputSet, names: list[str], batch_size: int) -> list[dict]:
    """Polygraphy data loader: one feed dict per batch with every input under its ONNX name
    (token sets sorted by length and each batch trimmed to its longest sentence)."""
    return [dict(zip(names, b.arrays)) for b in x.batches(batch_size)]


def build_paths(cfg: CheckConfig, targets: list[CheckedFile], threads: int = 2, values: Optional[list[str]] = None,
                x: Optional[InputSet] = None) -> list[PathSpec]:
    """``values``: the IR values compared per layer (default: every value); ``x``: the check
    inputs (for the TensorRT optimization profile of dynamic axes)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from ..quantization.simulate import SimulatedModel

    t0 = targets[0]
    g = t0.qm.graph
    out_names = dict(zip(g.outputs, (o.name for o in t0.model.graph.output)))  # as the file names them
    specs = input_specs(g, onnx_input_names(t0.model))
    if values is None:
        values = list(g.inputs) + [n.output for n in g.nodes]
    sim_map = {v: SIM_PREFIX + v for v in values}
    paths = [PathSpec(FP32, "fp32", None, "captured PyTorch model in float (BN folded)",
                      SimulationRunner(SimulatedModel(g), specs, out_names, cfg.layerwise, name=FP32),
                      sim_map, list(out_names.values()), layerwise=cfg.layerwise)]
    gpu = ort_gpu_providers() if cfg.gpu else {k: "GPU paths disabled (--no-gpu)" for k in
                                                ("CUDAExecutionProvider", "TensorrtExecutionProvider")}
    trt_reason = (trt_unavailable_reason() if cfg.gpu else "GPU paths disabled (--no-gpu)")
    for t in targets:
        fq = fake_quant_name(t.name)
        sim = SimulatedModel(t.qm.graph, t.qm.plan, t.qm.params)
        paths.append(PathSpec(fq, "fake-quant", t.name, f"PyTorch simulation of the {t.name} QDQ graph",
                              SimulationRunner(sim, specs, out_names, cfg.layerwise, name=fq),
                              sim_map, list(out_names.values()), layerwise=cfg.layerwise))
        names = {v: t.names[v] for v in values if t.names.get(v)}  # compared IR value -> ONNX tensor
        integer = t.target.integer_kernels
        if integer:  # marking must not change which integer kernels ORT fuses (see fusion_neutral)
            keep = set(fusion_neutral(t.model, list(names.values())))
            names = {v: n for v, n in names.items() if n in keep}
        marked = t.model
        if cfg.layerwise:
            marked = mark_outputs(t.model, list(names.values()))
        marked_bytes = marked.SerializeToString()
        name = f"ort-cpu[{t.name}]"
        desc = t.target.check_description
        if integer:
            loader = SessionWithProviders(marked_bytes, threads=threads)
        else:
            # A float convolution of dequantized values differs from the simulation by
            # accumulation-order rounding flips that compound with depth; TensorRT's INT8
            # kernels accumulate exactly, and so does the target's rewritten copy (never shipped;
            # FP16 QwT branches run as FP32 on FP16-rounded values: Target.runtime_copy).
            # The marked copy is rewritten: the passes keep graph outputs, so the DequantizeLinear
            # outputs they would otherwise fold into an accumulator stay readable.
            rewritten = t.target.runtime_copy(marked)  # keeps the tensor names
            settings = t.target.session_settings()
            loader = SessionWithProviders(rewritten.SerializeToString(), threads=threads,
                                          disable_quant_qdq=settings.get("disable_qdq_fusion", False),
                                          optimize=settings.get("level", "all") != "disable")
        paths.append(PathSpec(name, "backend", t.name, desc, OnnxrtRunner(loader, name=name),
                              dict(names) if cfg.layerwise else {}, list(out_names.values()), fq,
                              layerwise=cfg.layerwise))
        if cfg.openvino:
            paths.append(openvino_path(cfg, t, threads, list(out_names.values()), fq, name))
        for ep, pname in ((p.provider, p.path_name) for p in t.target.execution_providers):
            reason = gpu[ep]
            runner = None
            if reason is None:
                loader = SessionWithProviders(marked_bytes, providers=[ep, "CPUExecutionProvider"], threads=threads)
                runner = OnnxrtRunner(loader, name=pname)
            paths.append(PathSpec(pname, "backend", t.name, f"ONNX Runtime {ep}", runner,
                                  dict(names) if cfg.layerwise else {}, list(out_names.values()), fq,
                                  skipped=reason, layerwise=cfg.layerwise and reason is None))
        if t.target.tensorrt_engine:
            runner = None
            if trt_reason is None:
                try:
                    runner = trt_runner(t.data, "tensorrt[trt]", specs, x, cfg.batch_size)
                except Exception as e:  # report, don't crash the other paths
                    trt_reason = f"engine build failed: {type(e).__name__}: {e}"
            paths.append(PathSpec("tensorrt[trt]", "backend", "trt", "TensorRT engine (strongly typed) via Polygraphy",
                                  runner, {}, list(out_names.values()), fq, skipped=trt_reason))
    return paths


def openvino_path(cfg: CheckConfig, t: CheckedFile, threads: int, outputs: list[str], fake_quant: str,
                  ort_path: str) -> PathSpec:
    """OpenVINO CPU on the shipped file itself (both layouts run integer kernels there), with
    float layers pinned to f32 (its bf16 default would move outputs by many steps). Gated
    against the fake-quant like every backend, and compared with ONNX Runtime on the same file.
    Per output only: a per-layer reading would mark intermediates as graph outputs, and unlike
    ONNX Runtime's (check_marking) nothing here verifies that OpenVINO fuses the same layers then."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from ..runtime.openvino import InferencePrecision, SessionFromOnnxOpenVino, probe_openvino

    name = f"openvino-cpu[{t.name}]"
    status = probe_openvino()
    reason = None if status.available else f"{status.reason}; pip install openvino"
    runner = None
    if reason is None:
        # static compiles for batch 1 and the check batch (every full batch); a short last batch runs dynamic
        loader = SessionFromOnnxOpenVino(t.data, threads, InferencePrecision.F32, (1, cfg.batch_size))
        runner = OnnxrtRunner(loader, name=name)
    desc = f"OpenVINO {status.version} CPU, f32 hint for float layers" if status.available else "OpenVINO CPU"
    return PathSpec(name, "backend", t.name, desc, runner, {}, outputs, fake_quant, skipped=reason,
                    also_vs=(ort_path,))


def openvino_precisions(paths: list[PathSpec], targets: list[CheckedFile]) -> dict[str, dict]:
    """Per OpenVINO path that ran: the precision each quantized layer executed in."""
    from ..runtime.openvino import layer_precisions

    out = {}
    for p in paths:
        session = getattr(getattr(p.runner, "_sess", None), "session", None)  # the loader keeps what it made
        if p.name.startswith("openvino-cpu[") and session is not None:
            t = next(tt for tt in targets if tt.name == p.target)
            out[p.name] = layer_precisions(session, t.model).to_dict()
    return out


def check_marking(t: CheckedFile, x: InputSet, threads: int, values: Optional[list[str]] = None) -> dict:
    """Does marking intermediate outputs change what ONNX Runtime runs? (integer target only)"""
    import tempfile

    from ..runtime.onnxruntime import run

    out = {}
    keep = set(values) if values is not None else set(t.names)
    tensors = fusion_neutral(t.model, [n for v, n in t.names.items() if n and v in keep])
    marked = mark_outputs(t.model, tensors).SerializeToString()
    with tempfile.TemporaryDirectory() as td:
        res = {}
        for key, data in (("unmarked", t.data), ("marked", marked)):
            p = os.path.join(td, f"{key}.onnx")
            s = SessionWithProviders(data, threads=threads, optimized_model_path=p)()
            res[key] = run(s, x)
            out[key] = t.target.coverage(onnx.load(p))
    step = output_step(res["unmarked"])

    def integer(cov: dict) -> dict:
        return {k: v for k, v in cov["by_type"].items() if not k.startswith("float ") and k != "bias epilogue Add"}

    # Marking a float tensor can stop a float-only fusion (a bias Add folded into BiasGelu, a
    # Transpose moved): reported as float_ops_changed, but the check is about integer kernels
    # and about the final output, which must not move.
    out["same_integer_kernels"] = integer(out["unmarked"]) == integer(out["marked"])
    ub, mb = out["unmarked"]["by_type"], out["marked"]["by_type"]
    out["float_ops_changed"] = {k: [ub.get(k, 0), mb.get(k, 0)] for k in sorted(set(ub) | set(mb))
                                if ub.get(k, 0) != mb.get(k, 0)}
    out["final_output_max_diff_steps"] = float(np.abs(res["marked"] - res["unmarked"]).max() / step)
    return out


EMBEDDING_NOTE = (
    "embedding outputs are gated on the mean cosine of their rows to the backend's PyTorch fake-quant "
    "(--min-cosine; the lowest row is reported). "
    "Their element figures are reported, not gated (pass --atol-steps/--min-agreement to gate them too): the "
    "layers kept float run on ONNX Runtime's own float kernels; its fused GELU (its own erf) rounds differently "
    "from PyTorch's now and then; where such a difference crosses a rounding boundary the next quantizer flips a "
    "code, and the flips compound layer after layer (all-MiniLM-L6-v2: ~97% of embedding elements within 1 step "
    "at cosine 0.9999 on the ort layout, while ONNX Runtime stays as close to FP32 as its simulation). Integer "
    "kernels (QLinearConv, QGemm, MatMulIntegerToFloat) are emulated bit for bit, so class-score outputs keep the "
    "strict element gate. Per layer, such flips make the "
    "strict locator (FIRST DIVERGES) fire early; the mean-error locator (--large-error-steps) names a broken layer.")


def _output_metrics(ref: np.ndarray, other: np.ndarray, step: float, atol_steps: float, kind: str) -> dict:
    a = compare(ref, other, step)
    d = np.abs(ref.astype(np.float64) - other.astype(np.float64)) / step
    top1 = a.top1_agreement if kind == "classes" else None
    return dict(kind=kind, step=step, max_steps=a.max_steps, mean_steps=a.mean_steps,
                within_atol=float(np.mean(d <= atol_steps + STEP_SLACK)), within_1_step=a.within_1_step,
                cosine=a.cosine, min_cosine=float(row_cosines(ref, other).min()), top1_agreement=top1)


def _gate(m: dict, cfg: CheckConfig) -> tuple[bool, list[str]]:
    """Pass/fail of one backend-vs-fake-quant output comparison, and what failed."""
    why = []
    steps = m["kind"] != "embedding" or cfg.step_gate_embeddings
    if steps and m["within_atol"] < cfg.min_agreement:
        why.append(f"{m['within_atol']:.4%} of elements within {cfg.atol_steps:g} step(s), "
                   f"need {cfg.min_agreement:.4%}")
    if m["kind"] == "embedding" and m["cosine"] < cfg.min_cosine:
        why.append(f"mean cosine {m['cosine']:.6f} (lowest row {m['min_cosine']:.6f}), need {cfg.min_cosine:g}")
    return not why, why


@dataclass
class CheckReport:
    """What ``qwt-check`` found (``check.json``): per output and per layer, every backend
    against its fake-quant and every quantized path against FP32, and whether the gates held."""

    tool: str
    model: str
    settings: dict
    files: dict
    paths: list
    fp32_capture_vs_module_max_abs: Optional[float]
    marking_check: dict
    output_kinds: dict
    notes: list
    outputs: list
    layers: list
    first_divergence: dict
    first_large_error: dict
    passed: bool
    failures: list
    timing_s: dict
    openvino_precisions: dict = field(default_factory=dict)  # OpenVINO path -> precision per quantized layer

    def to_dict(self) -> dict:
        return asdict(self)


def run_check(cfg: CheckConfig, targets: list[CheckedFile], x: InputSet, inputs_description: str = "",
              timing: Optional[dict] = None, batch_progress: Optional[Callable] = None) -> dict:
    """Compare every path on ``x`` (held-out inputs, one array per graph input). ``targets``
    holds one quantized model and file per target, made by the API (api.check or
    pipeline.run_check_files)."""
    import torch
    from polygraphy.comparator import Comparator

    t_start = time.perf_counter()
    timing = dict(timing or {})
    threads = cfg.export.threads
    t0 = targets[0]
    graph = t0.qm.graph
    values = compared_values(graph, x)
    paths = build_paths(cfg, targets, threads, values, x)
    active = [p for p in paths if p.runner is not None]
    by_name = {p.name: p for p in paths}
    producer = {n.output: n for n in graph.nodes}

    # PyTorch module vs captured FP32 on the first batch: the FP32 reference is the real model
    fp32_capture = None
    module = t0.qm.loaded.module
    if module is None and t0.qm.loaded.program is not None:
        module = t0.qm.loaded.program.module()
    if module is not None:
        from ..quantization.simulate import SimulatedModel

        for n in (cfg.batch_size, 2, 1):  # an exported program may only take its traced batch size
            xb = x.head(n).torch()
            try:
                with torch.no_grad():
                    ref = module(*xb) if isinstance(xb, tuple) else module(xb)
            except Exception:
                continue
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            got = SimulatedModel(graph)(xb)
            got = got[0] if isinstance(got, tuple) else got
            fp32_capture = float((ref - got).abs().max())
            break

    marking = {}
    t = time.perf_counter()
    if cfg.layerwise:
        for tg in targets:
            if tg.target.integer_kernels:
                marking[tg.name] = check_marking(tg, x.head(cfg.batch_size), threads, values)
    timing["marking_check"] = time.perf_counter() - t

    layers = [LayerRecord(v, producer[v].name if v in producer else "", producer[v].op if v in producer else "input",
                          quantized={tg.name: v in tg.qm.params.acts for tg in targets}) for v in values]
    pairs = [(p.name, p.reference) for p in paths if p.kind == "backend" and p.runner is not None]
    finals: dict[str, list[list[np.ndarray]]] = {p.name: [] for p in active}
    steps: dict[str, dict[str, float]] = {}
    target_of = {p.name: p.target for p in paths}

    t = time.perf_counter()
    loader = feed_dicts(x, onnx_input_names(t0.model), cfg.batch_size)
    done = 0
    for bi, single in enumerate(Comparator.run([p.runner for p in active], data_loader=loader, streaming=True)):
        outs = {name: results[0] for name, results in single}
        for p in active:
            finals[p.name].append([np.array(outs[p.name][k], copy=True) for k in p.outputs])
        if cfg.layerwise:
            fp = outs[FP32]
            if bi == 0:
                first = {v: fp[SIM_PREFIX + v] for v in values}
                steps = {tg.name: _value_steps(tg, values, first) for tg in targets}
                for rec in layers:
                    for p in paths:
                        if p.kind != "fp32":
                            rec.tensors[p.name] = p.tensor_of.get(rec.value) if p.layerwise else None
            for rec in layers:
                ref = fp[SIM_PREFIX + rec.value]
                got = {}
                for p in active:
                    key = p.tensor_of.get(rec.value) if p.layerwise else None
                    if p.kind != "fp32" and key is not None and key in outs[p.name]:
                        got[p.name] = outs[p.name][key]
                        rec.sqnr.setdefault(p.name, SqnrAccumulator()).update(ref, got[p.name])
                for b, f in pairs:
                    if b in got and f in got:
                        acc = rec.steps.setdefault(f"{b} vs {f}", StepAccumulator(steps[target_of[b]][rec.value],
                                                                                  cfg.atol_steps))
                        acc.update(got[f], got[b])
        done += len(next(iter(loader[bi].values())))
        if batch_progress:
            batch_progress(done, len(x))
    timing["run_compare"] = time.perf_counter() - t

    # per-output metrics on all inputs
    final = {name: [np.concatenate([b[i] for b in batches]) for i in range(len(by_name[name].outputs))]
             for name, batches in finals.items()}
    out_names = by_name[FP32].outputs
    kinds = [output_kind(final[FP32][i], cfg.output_kind) for i in range(len(out_names))]
    comparisons, failures = [], []
    for p in active:
        if p.kind == "fp32":
            continue
        tg = next(tt for tt in targets if tt.name == p.target)
        for i, oname in enumerate(out_names):
            value = graph.outputs[i]
            q = tg.qm.params.acts.get(value)
            step = float(q.scale) if q is not None else output_step(final[FP32][i])
            refs = [(p.reference, True)] if p.reference else []
            refs += [(FP32, False)] + [(o, False) for o in p.also_vs]
            for ref, gated in refs:
                if ref not in final:
                    continue
                m = _output_metrics(final[ref][i], final[p.name][i], step, cfg.atol_steps, kinds[i])
                passed, why = _gate(m, cfg) if gated else (None, [])
                m.update(output=oname, path=p.name, reference=ref, gated=gated, passed=passed)
                comparisons.append(m)
                failures += [f"{p.name} vs {ref} on {oname}: {w}" for w in why]

    precisions = openvino_precisions(paths, targets)
    for pname, pr in precisions.items():  # a silent float fallback is a failure, not a footnote
        if pr["float_fallback"]:
            failures.append(f"{pname}: {len(pr['float_fallback'])} quantized layer(s) ran in float: "
                            + ", ".join(pr["float_fallback"][:5]))

    divergence, large_error = {}, {}
    for b, f in pairs:
        key = f"{b} vs {f}"
        if cfg.layerwise and any(key in r.steps for r in layers):
            for out, rec in ((divergence, first_divergence(layers, key, cfg.min_agreement)),
                             (large_error, first_large_error(layers, key, cfg.large_error_steps))):
                out[key] = None if rec is None else dict(
                    value=rec.value, node=rec.node, op=rec.op, within_atol=rec.steps[key].fraction,
                    max_steps=rec.steps[key].max_steps, mean_steps=rec.steps[key].mean_steps,
                    tensor=rec.tensors.get(b))
    timing["total"] = timing.get("quantize_export", 0.0) + timing.get("inputs", 0.0) + time.perf_counter() - t_start

    from .._version import __version__

    return dict(
        tool=f"qwt-check {__version__}", model=t0.qm.loaded.description,
        settings=dict(targets=[tg.name for tg in targets], inputs=inputs_description, num_inputs=int(len(x)),
                      input_names=list(x.names), batch_size=cfg.batch_size,
                      atol_steps=cfg.atol_steps, min_agreement=cfg.min_agreement, min_cosine=cfg.min_cosine,
                      step_gate_embeddings=cfg.step_gate_embeddings, output_kind=cfg.output_kind,
                      large_error_steps=cfg.large_error_steps,
                      layerwise=cfg.layerwise,
                      method=str(cfg.export.quant.method), bits=f"W{cfg.export.quant.w_bits}A{cfg.export.quant.a_bits}",
                      calibration=cfg.export.calib_data, num_calib=cfg.export.num_calib, seed=cfg.export.seed),
        files={tg.name: dict(source=tg.source, identical_to_reexport=tg.identical_to_reexport,
                             nodes=len(tg.model.graph.node), unmapped_values=sorted(v for v, n in tg.names.items() if n is None))
               for tg in targets},
        paths=[dict(name=p.name, kind=p.kind, target=p.target, description=p.description,
                    ran=p.runner is not None, skipped=p.skipped, layerwise=p.layerwise) for p in paths],
        fp32_capture_vs_module_max_abs=fp32_capture,
        marking_check=marking,
        openvino_precisions=precisions,
        output_kinds=dict(zip(out_names, kinds)),
        notes=[EMBEDDING_NOTE] if "embedding" in kinds else [],
        outputs=comparisons,
        layers=[r.to_dict() for r in layers] if cfg.layerwise else [],
        first_divergence=divergence,
        first_large_error=large_error,
        passed=not failures, failures=failures,
        timing_s=timing,
    )
