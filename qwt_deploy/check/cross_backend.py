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

Per output: max/mean |error| in output quantization steps, fraction within ``atol_steps``,
cosine, top-1 agreement, for each backend vs its fake-quant (the gate) and each quantized path
vs FP32. Per layer: SQNR vs FP32 for every IR value, and the first layer where a backend
parts from its fake-quant.

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
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import onnx

from ..config import ExportConfig
from ..errors import QwtError
from .agreement import compare, output_step
from .layerwise import LayerRecord, SqnrAccumulator, StepAccumulator, first_divergence
from .runners import (SIM_PREFIX, SessionWithProviders, SimulationRunner, mark_outputs, ort_gpu_providers,
                      trt_runner, trt_unavailable_reason)

FP32 = "pytorch-fp32"


def fake_quant_name(target: str) -> str:
    return f"pytorch-fake-quant[{target}]"


@dataclass
class CheckConfig:
    export: ExportConfig  # model, calibration and quantization settings; target is set per target
    targets: tuple[str, ...] = ("ort",)
    inputs: str = "bundled"  # held-out inputs: 'bundled' (real photos) | .npy/.npz | image folder
    num_inputs: int = 128
    batch_size: int = 8
    atol_steps: float = 1.0
    min_agreement: float = 0.999  # fraction of elements within atol_steps (backend vs its fake-quant)
    onnx_files: dict[str, str] = field(default_factory=dict)  # target -> an already exported file to check
    layerwise: bool = True
    gpu: bool = True  # try the CUDA / TensorRT paths


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


@dataclass
class _Target:
    name: str
    qm: object  # pipeline.QuantizedModel
    model: onnx.ModelProto  # the folded file that is checked
    data: bytes
    names: dict[str, str]  # IR value -> ONNX tensor name in that file (None: not found)
    source: str  # "re-exported" or the user's file
    identical_to_reexport: Optional[bool] = None


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


def prepare_target(cfg: CheckConfig, target: str, progress=None, log=print) -> _Target:
    from ..pipeline import export_folded, quantize_model

    ecfg = replace(cfg.export, target=target)
    qm = quantize_model(ecfg, progress, log)
    names: dict[str, str] = {}
    ex = export_folded(qm, ecfg, tensor_names=names)
    model, data, source, same = ex.folded, ex.data, "re-exported by qwt-check", None
    if target in cfg.onnx_files:
        model, data = _load_onnx_file(cfg.onnx_files[target])
        source, same = cfg.onnx_files[target], data == ex.data
        if not same:
            log(f"note: {source} differs from what these settings export; checking the file as given")
    present = _graph_tensors(model)
    mapped = {v: (t if t in present else None) for v, t in names.items()}
    return _Target(target, qm, model, data, mapped, source, same)


def load_check_inputs(cfg: CheckConfig, in_shape: tuple) -> np.ndarray:
    """Held-out inputs: the bundled evaluation photos (never used for calibration), or the user's."""
    from calibration.data import load_calibration, validate

    n = cfg.num_inputs
    if n < 1:
        raise QwtError("--num-inputs must be at least 1", "use 128 or more")
    ecfg = cfg.export
    if cfg.inputs == "bundled":
        from calibration.photos import crops, evaluation_photos

        return validate(crops(evaluation_photos(), n, ecfg.preprocess, ecfg.seed + 1), in_shape, "bundled photos")
    if cfg.inputs == "synthetic":
        raise QwtError("qwt-check needs real inputs", "pass --inputs heldout.npy or an image folder")
    if not os.path.exists(cfg.inputs):
        raise QwtError(f"check inputs {cfg.inputs} do not exist", "pass a .npy/.npz file or an image folder")
    try:
        return load_calibration(cfg.inputs, in_shape, n, ecfg.preprocess, ecfg.seed)
    except QwtError as e:  # same checks as calibration data; say which flag is wrong
        raise QwtError(e.problem.replace("calibration data", "check inputs"), e.fix) from None


def _value_steps(t: _Target, values: list[str], fp32_first: dict[str, np.ndarray]) -> dict[str, float]:
    """Step of each value: its own quantizer's in this target, else an 8-bit grid over the
    FP32 range seen on the first batch (unquantized values such as float conv outputs)."""
    acts = t.qm.params.acts
    out = {}
    for v in values:
        q = acts.get(v)
        out[v] = float(q.scale) if q is not None else output_step(fp32_first[v])
    return out


def build_paths(cfg: CheckConfig, targets: list[_Target], log=print) -> list[PathSpec]:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from ..quantize.simulate import SimulatedModel

    t0 = targets[0]
    g = t0.qm.graph
    out_names = {v: f"output" if len(g.outputs) == 1 else f"output_{i}" for i, v in enumerate(g.outputs)}
    in_shape = tuple(t0.qm.in_shape)
    values = [g.inputs[0]] + [n.output for n in g.nodes]
    sim_map = {v: SIM_PREFIX + v for v in values}
    paths = [PathSpec(FP32, "fp32", None, "captured PyTorch model in float (BN folded)",
                      SimulationRunner(SimulatedModel(g), "input", in_shape, out_names, cfg.layerwise, name=FP32),
                      sim_map, list(out_names.values()), layerwise=cfg.layerwise)]
    gpu = ort_gpu_providers() if cfg.gpu else {k: "GPU paths disabled (--no-gpu)" for k in
                                                ("CUDAExecutionProvider", "TensorrtExecutionProvider")}
    trt_reason = (trt_unavailable_reason() if cfg.gpu else "GPU paths disabled (--no-gpu)")
    for t in targets:
        fq = fake_quant_name(t.name)
        sim = SimulatedModel(t.qm.graph, t.qm.plan, t.qm.params)
        paths.append(PathSpec(fq, "fake-quant", t.name, f"PyTorch simulation of the {t.name} QDQ graph",
                              SimulationRunner(sim, "input", in_shape, out_names, cfg.layerwise, name=fq),
                              sim_map, list(out_names.values()), layerwise=cfg.layerwise))
        marked = t.model
        if cfg.layerwise:
            marked = mark_outputs(t.model, [n for n in t.names.values() if n])
        marked_bytes = marked.SerializeToString()
        integer = t.name == "ort"
        name = f"ort-cpu[{t.name}]"
        desc = ("ONNX Runtime CPU, integer kernels" if integer else
                "ONNX Runtime CPU, QDQ fusion off, each Conv/Gemm rewritten to TensorRT's INT8 arithmetic "
                "(exact accumulator x float32 s_x*s_w + float bias)")
        if integer:
            loader = SessionWithProviders(marked_bytes, threads=cfg.export.threads)
        else:
            # A float convolution of dequantized values differs from the simulation by
            # accumulation-order rounding flips that compound with depth; TensorRT's INT8
            # kernels accumulate exactly, and so does this rewritten copy (never shipped).
            from graph_passes.rewrite_layers_as_integer_accumulators import rewrite_layers_as_integer_accumulators

            rewritten, _ = rewrite_layers_as_integer_accumulators(t.model)  # keeps the tensor names
            if cfg.layerwise:
                rewritten = mark_outputs(rewritten, [n for n in t.names.values() if n])
            loader = SessionWithProviders(rewritten.SerializeToString(), threads=cfg.export.threads,
                                          disable_quant_qdq=True, optimize=False)
        paths.append(PathSpec(name, "backend", t.name, desc, OnnxrtRunner(loader, name=name),
                              dict(t.names) if cfg.layerwise else {}, list(out_names.values()), fq,
                              layerwise=cfg.layerwise))
        eps = [("CUDAExecutionProvider", f"ort-cuda[{t.name}]")]
        if t.name == "trt":
            eps.append(("TensorrtExecutionProvider", "ort-trt-ep[trt]"))
        for ep, pname in eps:
            reason = gpu[ep]
            runner = None
            if reason is None:
                loader = SessionWithProviders(marked_bytes, providers=[ep, "CPUExecutionProvider"],
                                              threads=cfg.export.threads)
                runner = OnnxrtRunner(loader, name=pname)
            paths.append(PathSpec(pname, "backend", t.name, f"ONNX Runtime {ep}", runner,
                                  dict(t.names) if cfg.layerwise else {}, list(out_names.values()), fq,
                                  skipped=reason, layerwise=cfg.layerwise and reason is None))
        if t.name == "trt":
            runner = None
            if trt_reason is None:
                try:
                    runner = trt_runner(t.data, "tensorrt[trt]")
                except Exception as e:  # report, don't crash the other paths
                    trt_reason = f"engine build failed: {type(e).__name__}: {e}"
            paths.append(PathSpec("tensorrt[trt]", "backend", "trt", "TensorRT engine (strongly typed) via Polygraphy",
                                  runner, {}, list(out_names.values()), fq, skipped=trt_reason))
    return paths


def check_marking(t: _Target, x: np.ndarray, threads: int) -> dict:
    """Does marking intermediate outputs change what ONNX Runtime runs? (integer target only)"""
    import tempfile

    from ..pipeline import int8_coverage

    out = {}
    marked = mark_outputs(t.model, [n for n in t.names.values() if n]).SerializeToString()
    with tempfile.TemporaryDirectory() as td:
        res = {}
        for key, data in (("unmarked", t.data), ("marked", marked)):
            p = os.path.join(td, f"{key}.onnx")
            s = SessionWithProviders(data, threads=threads, optimized_model_path=p)()
            res[key] = s.run(None, {s.get_inputs()[0].name: x})[0]
            out[key] = int8_coverage(onnx.load(p))
    step = output_step(res["unmarked"])
    out["same_integer_kernels"] = out["unmarked"]["by_type"] == {
        k: v for k, v in out["marked"]["by_type"].items()}
    out["final_output_max_diff_steps"] = float(np.abs(res["marked"] - res["unmarked"]).max() / step)
    return out


def _output_metrics(ref: np.ndarray, other: np.ndarray, step: float, atol_steps: float) -> dict:
    a = compare(ref, other, step)
    d = np.abs(ref.astype(np.float64) - other.astype(np.float64)) / step
    top1 = a.top1_agreement if ref.ndim == 2 and ref.shape[1] > 1 else None
    return dict(step=step, max_steps=a.max_steps, mean_steps=a.mean_steps,
                within_atol=float(np.mean(d <= atol_steps + 1e-6)), within_1_step=a.within_1_step,
                cosine=a.cosine, top1_agreement=top1)


def run_check(cfg: CheckConfig, progress: Optional[Callable] = None, log: Callable[[str], None] = print,
              batch_progress: Optional[Callable] = None) -> dict:
    import torch
    from polygraphy.comparator import Comparator

    from ..pipeline import PLANNERS

    t_start = time.perf_counter()
    timing = {}
    for t in cfg.targets:
        if t not in PLANNERS:
            raise QwtError(f"target {t} is not available in this build (have: {', '.join(sorted(PLANNERS))})",
                           f"use --targets {','.join(sorted(PLANNERS))}")
    for t in cfg.onnx_files:
        if t not in cfg.targets:
            raise QwtError(f"--onnx {t}=... names a target that is not checked", f"add {t} to --targets")
    # fail on missing files before minutes of calibration, not after
    if cfg.inputs not in ("bundled", "synthetic") and not os.path.exists(cfg.inputs):
        raise QwtError(f"check inputs {cfg.inputs} do not exist", "pass a .npy/.npz file or an image folder")
    for path in cfg.onnx_files.values():
        if not os.path.isfile(path):
            raise QwtError(f"ONNX file {path} does not exist", "pass the path of an exported .onnx file")
    torch.manual_seed(cfg.export.seed)
    torch.set_num_threads(cfg.export.threads)

    t = time.perf_counter()
    targets = [prepare_target(cfg, name, progress, log) for name in cfg.targets]
    timing["quantize_export"] = time.perf_counter() - t
    t0 = targets[0]
    graph = t0.qm.graph
    t = time.perf_counter()
    x = load_check_inputs(cfg, tuple(t0.qm.in_shape))
    timing["inputs"] = time.perf_counter() - t

    paths = build_paths(cfg, targets, log)
    active = [p for p in paths if p.runner is not None]
    by_name = {p.name: p for p in paths}
    values = [graph.inputs[0]] + [n.output for n in graph.nodes]
    producer = {n.output: n for n in graph.nodes}

    # PyTorch module vs captured FP32 on the first batch: the FP32 reference is the real model
    fp32_capture = None
    module = t0.qm.loaded.module
    if module is None and t0.qm.loaded.program is not None:
        module = t0.qm.loaded.program.module()
    if module is not None:
        from ..quantize.simulate import SimulatedModel

        for n in (cfg.batch_size, 2, 1):  # an exported program may only take its traced batch size
            xb = torch.from_numpy(x[:n])
            try:
                with torch.no_grad():
                    ref = module(xb)
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
            if tg.name == "ort":
                marking[tg.name] = check_marking(tg, x[: cfg.batch_size], cfg.export.threads)
    timing["marking_check"] = time.perf_counter() - t

    layers = [LayerRecord(v, producer[v].name if v in producer else "", producer[v].op if v in producer else "input",
                          quantized={tg.name: v in tg.qm.params.acts for tg in targets}) for v in values]
    pairs = [(p.name, p.reference) for p in paths if p.kind == "backend" and p.runner is not None]
    finals: dict[str, list[list[np.ndarray]]] = {p.name: [] for p in active}
    steps: dict[str, dict[str, float]] = {}
    target_of = {p.name: p.target for p in paths}

    t = time.perf_counter()
    loader = [{"input": x[i:i + cfg.batch_size]} for i in range(0, len(x), cfg.batch_size)]
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
        if batch_progress:
            batch_progress(min(len(x), (bi + 1) * cfg.batch_size), len(x))
    timing["run_compare"] = time.perf_counter() - t

    # per-output metrics on all inputs
    final = {name: [np.concatenate([b[i] for b in batches]) for i in range(len(by_name[name].outputs))]
             for name, batches in finals.items()}
    out_names = by_name[FP32].outputs
    comparisons = []
    for p in active:
        if p.kind == "fp32":
            continue
        tg = next(tt for tt in targets if tt.name == p.target)
        for i, oname in enumerate(out_names):
            value = graph.outputs[i]
            q = tg.qm.params.acts.get(value)
            step = float(q.scale) if q is not None else output_step(final[FP32][i])
            refs = [(p.reference, True)] if p.reference else []
            refs.append((FP32, False))
            for ref, gated in refs:
                if ref not in final:
                    continue
                m = _output_metrics(final[ref][i], final[p.name][i], step, cfg.atol_steps)
                m.update(output=oname, path=p.name, reference=ref, gated=gated,
                         passed=(m["within_atol"] >= cfg.min_agreement) if gated else None)
                comparisons.append(m)

    divergence = {}
    for b, f in pairs:
        key = f"{b} vs {f}"
        if cfg.layerwise and any(key in r.steps for r in layers):
            rec = first_divergence(layers, key, cfg.min_agreement)
            divergence[key] = None if rec is None else dict(
                value=rec.value, node=rec.node, op=rec.op, within_atol=rec.steps[key].fraction,
                max_steps=rec.steps[key].max_steps, tensor=rec.tensors.get(b))
    failures = [f"{c['path']} vs {c['reference']} on {c['output']}: {c['within_atol']:.4%} of elements within "
                f"{cfg.atol_steps:g} step(s), need {cfg.min_agreement:.4%}" for c in comparisons if c["passed"] is False]
    timing["total"] = time.perf_counter() - t_start

    from .. import __version__

    return dict(
        tool=f"qwt-check {__version__}", model=t0.qm.loaded.description,
        settings=dict(targets=list(cfg.targets), inputs=cfg.inputs, num_inputs=int(len(x)), batch_size=cfg.batch_size,
                      atol_steps=cfg.atol_steps, min_agreement=cfg.min_agreement, layerwise=cfg.layerwise,
                      method=cfg.export.quant.method, bits=f"W{cfg.export.quant.w_bits}A{cfg.export.quant.a_bits}",
                      calibration=cfg.export.calib_data, num_calib=cfg.export.num_calib, seed=cfg.export.seed),
        files={tg.name: dict(source=tg.source, identical_to_reexport=tg.identical_to_reexport,
                             nodes=len(tg.model.graph.node), unmapped_values=sorted(v for v, n in tg.names.items() if n is None))
               for tg in targets},
        paths=[dict(name=p.name, kind=p.kind, target=p.target, description=p.description,
                    ran=p.runner is not None, skipped=p.skipped, layerwise=p.layerwise) for p in paths],
        fp32_capture_vs_module_max_abs=fp32_capture,
        marking_check=marking,
        outputs=comparisons,
        layers=[r.to_dict() for r in layers] if cfg.layerwise else [],
        first_divergence=divergence,
        passed=not failures, failures=failures,
        timing_s=timing,
    )
