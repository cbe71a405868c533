"""``qwt-export`` as a file-based wrapper around the public API (:mod:`qwt_deploy.api`):
paths in, the model and its JSON report out. No step of the pipeline is wired here; this
module only resolves files and examples, times the steps and writes the report."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import numpy as np

from . import api
from ._version import __version__
from .atomic import StagedFiles
from .comparison.cross_backend import CheckConfig, CheckedFile, as_check_inputs, run_check
from .comparison.accuracy import AccuracyGates, HoldOut
from .config import ExportConfig
from .data.labels import load_class_labels
from .data.inputs import InputSet, validate_inputs
from .data.sources import load_model_inputs, validate
from .errors import QwtError
from .examples import example_from_source
from .report import default_report_path, json_bytes, sibling_path, write_json
from .comparison.agreement import compare
from .runtime.openvino import export_report as openvino_report


def export_metadata(cfg: ExportConfig, qm: api.QuantizedModel) -> dict:
    """ONNX metadata: how the model was made, plus what the edge runtime needs to feed it
    (preprocessing keys for an image model; see api.default_metadata for token models)."""
    from .edge.metadata import calibrated_on_images, export_metadata as edge_metadata  # the keys the edge reads

    # Image preprocessing is recorded only when it is known: images were read with it (a folder,
    # the bundled photos, an --example's own), or the user gave it for calibration arrays
    # (checked against the model's input size). Otherwise none: no invented defaults.
    g, pre = qm.graph, cfg.preprocess
    image_input = len(g.inputs) == 1 and g.is_float_input(g.inputs[0])
    read_images = calibrated_on_images(cfg.calib_data) and (example_from_source(cfg.calib_data) is None or pre.given)
    recorded = None
    if image_input and (read_images or pre.given):
        recorded = (pre.for_input(qm.in_shape) if read_images else pre.for_arrays(qm.in_shape)).to_dict()
    return api.default_metadata(qm, edge_metadata(recorded, qm.in_shape, cfg.calib_data, cfg.labels_file))


def held_out_inputs(cfg: ExportConfig, qm: api.QuantizedModel) -> InputSet:
    """Inputs for the ORT-vs-simulation check: a built-in example's held-out data (photos never
    calibrated on; Fashion-MNIST test images; pydoc sentences never calibrated on); else the
    last calibration samples."""
    n = max(1, cfg.check_samples)
    calib = qm.inputs
    if cfg.calib_data == "bundled":
        from .data.photos import crops, evaluation_photos

        return InputSet.single(calib.names[0], crops(evaluation_photos(), n, cfg.preprocess.for_input(qm.in_shape),
                                                     cfg.seed + 1))
    example = example_from_source(cfg.calib_data)
    if example is not None:
        held_out = example.evaluation(n, cfg.seed + 1)[0]
        return (held_out.head(n) if isinstance(held_out, InputSet)
                else InputSet.single(calib.names[0], np.ascontiguousarray(held_out)))
    return calib.tail(n)


@dataclass
class ExportReport:
    """What one ``qwt-export`` run did, as written to ``<model>.report.json``."""

    tool: str
    model: str
    output: str
    target: str
    config: dict
    quantization: dict
    calibration: dict
    layers: list
    folded_layers: int
    compensation: dict
    node_count: dict
    float_nodes: list
    int8_coverage: dict
    ort_vs_pytorch: dict
    latency: Optional[dict]
    size_bytes: dict
    timing_s: dict
    trt_rules: Optional[dict] = None
    tensorrt_engine: Optional[dict] = None
    ort_plain_float_vs_pytorch: Optional[dict] = None
    openvino: Optional[dict] = None  # OpenVINO vs ONNX Runtime and its latency, when openvino is installed
    # below MIN_EXACT within one step: the first layer where ONNX Runtime leaves the simulation
    first_diverging_layer: Optional[dict] = None
    report_path: str = ""
    # accuracy against FP32 on held-out data (comparison.accuracy.Accuracy), None when none was held out
    accuracy: Optional[dict] = None
    # the same measured on the file in ONNX Runtime, when ORT is not within one step of the
    # simulation (then the gates judge this one: it is what ships)
    accuracy_onnxruntime: Optional[dict] = None
    # the --min-agreement/--max-kl/--min-cosine bars, which were missed (failures) and passed
    accuracy_gates: Optional[dict] = None
    # --auto-fallback: layers kept float, accuracy before/after, sensitivity ranking, latency/size cost
    fallback: Optional[dict] = None
    fp32_path: Optional[str] = None  # --save-fp32

    @property
    def passed(self) -> bool:
        """No accuracy gate was missed (True when none was set)."""
        return not (self.accuracy_gates or {}).get("failures")

    def to_dict(self) -> dict:
        return asdict(self)


def run_export(cfg: ExportConfig, progress: Optional[Callable[[int, int, str], None]] = None) -> ExportReport:
    t_start = time.perf_counter()
    # Model, report and extras go to temporary names and are renamed together only after the
    # check (issue 12): an error, a full disk or Ctrl-C leaves no unverified model, and no model
    # beside the previous run's report. No output may be one of the inputs (compared by inode).
    with StagedFiles(inputs=(cfg.model, cfg.calib_data, cfg.labels_file, cfg.eval_data, cfg.eval_labels)) as staged:
        return _run_export(cfg, progress, staged, t_start)


def _run_export(cfg: ExportConfig, progress, staged: StagedFiles, t_start: float) -> ExportReport:
    report_path = default_report_path(cfg.output)
    unfolded_path = sibling_path(cfg.output, ".unfolded.onnx")
    fp32_path = fp32_sibling(cfg.output) if cfg.save_fp32 else None
    for path in (cfg.output, report_path) + ((unfolded_path,) if cfg.keep_unfolded else ()) + \
            ((fp32_path,) if fp32_path else ()):
        staged.check(path)
    gates = AccuracyGates(cfg.min_agreement, cfg.max_kl, cfg.min_cosine)  # bad bars fail before calibrating
    if cfg.auto_fallback and not gates.any:
        raise QwtError("--auto-fallback needs a target", "add --min-agreement 0.99 (or --max-kl / --min-cosine)")
    labels = load_class_labels(cfg.eval_labels) if cfg.eval_labels else None
    if labels is not None and not cfg.eval_data:
        raise QwtError("--eval-labels needs --eval-data", "pass the evaluation inputs the labels belong to")

    # 1-3. load + capture, calibration data (part held out for accuracy), calibrate + compensate
    qm = api.quantize(cfg.model, cfg.calib_data, cfg.quantize_config(), progress, factory=cfg.model_factory,
                      trust_pickle=cfg.trust_pickle, evaluation=cfg.eval_data, evaluation_labels=labels,
                      holdout=HoldOut(fraction=cfg.holdout_fraction))
    timing = dict(qm.timing)
    if gates.any and qm.heldout is None:
        raise QwtError(f"an accuracy gate needs held-out data, and there is none: {qm.heldout_source}",
                       "pass --eval-data FILE, or at least 64 calibration samples")
    fallback = None
    if cfg.auto_fallback:  # keep the most sensitive layers float until the gates are met
        t = time.perf_counter()
        fb = api.auto_fallback(qm, gates, max_float_layers=cfg.max_float_layers, samples=cfg.sensitivity_samples,
                               progress=progress)
        timing["auto_fallback"] = time.perf_counter() - t
        all_int8, qm = qm, fb.quantized
        fallback = fb.to_dict()
    t = time.perf_counter()
    accuracy = qm.accuracy
    if accuracy is not None:
        gates.check_kind(accuracy.kind)
    timing["accuracy"] = time.perf_counter() - t

    # 4. export (CWAC as explicit Mul/Add), 5. fold + the target's passes and rule check
    t = time.perf_counter()
    tensor_names: dict[str, str] = {}  # IR value -> ONNX tensor, for locating a divergence layer by layer
    ex = api.export(qm, pad_conv_channels=cfg.pad_conv_channels, metadata=export_metadata(cfg, qm),
                    tensor_names=tensor_names)
    fp32 = api.export_float(qm)
    staged.write(cfg.output, ex.data)
    if cfg.keep_unfolded:
        staged.write(unfolded_path, ex.unfolded.SerializeToString())
    if fp32_path:
        staged.write(fp32_path, fp32.SerializeToString())
    timing["export_fold"] = time.perf_counter() - t
    engine = None

    # 6. run + check against the PyTorch simulation
    t = time.perf_counter()
    held = held_out_inputs(cfg, qm)
    v = api.verify(ex, held, threads=cfg.threads, measure_latency=cfg.measure_latency, fp32=fp32)
    openvino = openvino_report(ex.data, fp32.SerializeToString(), held, api.check_session(ex, cfg.threads),
                               api.output_quant_step(qm, qm.graph.outputs[0]), compare, cfg.threads, cfg.measure_latency)
    diverging = None
    if v.agreement.within_1_step < MIN_EXACT:  # exactness is the rule: say where it breaks
        diverging = first_diverging_layer(cfg, ex, tensor_names, held)
    accuracy_ort = None
    if accuracy is not None and v.agreement.within_1_step < MIN_EXACT and qm.target.integer_kernels:
        # ONNX Runtime does not compute what the simulation does: the file's own accuracy is
        # what ships and is gated
        accuracy_ort = api.evaluate_file(ex, qm.heldout, qm.heldout_labels, threads=cfg.threads,
                                         source=qm.heldout_source + "; ONNX Runtime on the exported file")
    gated = accuracy_ort or accuracy
    timing["check"] = time.perf_counter() - t
    if fallback is not None and fallback["chosen"]:  # what the float layers cost: all-INT8 vs this file
        fallback.update(fallback_cost(cfg, all_int8, ex, held))
    timing["total"] = time.perf_counter() - t_start

    s = qm.settings
    config = cfg.to_dict()
    config["quant"]["calib_method"] = s.calib_method  # the observer that ran, not "auto"
    config["quant"]["calib_method_requested"] = cfg.quant.calib_method
    report = ExportReport(
        tool=f"qwt-deploy {__version__}", model=qm.loaded.description, output=cfg.output, target=qm.target.name,
        config=config,
        quantization=dict(method=str(s.method), w_bits=s.w_bits, a_bits=s.a_bits, calib_method=s.calib_method,
                          ridge=s.ridge, reference=s.reference),
        calibration=dict(samples=int(len(qm.inputs)), source=cfg.calib_data, batch_size=cfg.batch_size,
                         held_out=qm.heldout_source),
        **api.model_report(ex),
        int8_coverage=v.coverage, ort_vs_pytorch=dict(v.agreement.to_dict(), samples=v.samples,
                                                     outputs={k: a.to_dict() for k, a in v.outputs.items()}),
        first_diverging_layer=diverging,
        latency=v.latency, size_bytes=dict(int8=len(ex.data), fp32=len(fp32.SerializeToString())),
        timing_s=timing, trt_rules=ex.rules, tensorrt_engine=engine, ort_plain_float_vs_pytorch=v.plain_float,
        openvino=openvino,
        accuracy=None if accuracy is None else accuracy.to_dict(),
        accuracy_onnxruntime=None if accuracy_ort is None else accuracy_ort.to_dict(),
        accuracy_gates=dict(gates.to_dict(), failures=gates.missed(gated) if gated and gates.any else [],
                            passed=not (gated and gates.missed(gated)),
                            measured_on="onnxruntime" if accuracy_ort else "simulation") if gates.any else None,
        fallback=fallback, fp32_path=fp32_path,
    )
    staged.write(report_path, json_bytes(report.to_dict()))
    staged.commit()
    ex.path = cfg.output
    report.report_path = report_path
    if qm.target.tensorrt_engine:  # 5c. engine where TensorRT and a CUDA GPU exist; always the trtexec command line
        # after the commit: TensorRT reads the model from its final path and names its files after it
        t = time.perf_counter()
        report.tensorrt_engine = qm.target.build_engine(cfg.output)
        report.timing_s["tensorrt_engine"] = time.perf_counter() - t
        write_json(report.to_dict(), report_path)
    return report


def fp32_sibling(output: str) -> str:
    """``--save-fp32``: ``m.int8.onnx`` -> ``m.fp32.onnx`` (``m.onnx`` -> ``m.fp32.onnx``)."""
    base = output[:-len(".int8.onnx")] if output.endswith(".int8.onnx") else sibling_path(output, "")
    return base + ".fp32.onnx"


def fallback_cost(cfg: ExportConfig, all_int8: api.QuantizedModel, ex: api.ExportedModel, held: InputSet) -> dict:
    """Size and batch-1 latency of the file with the fallback's float layers against the same
    model with every layer INT8 (exported here for the comparison only, never written)."""
    before = api.export(all_int8, pad_conv_channels=cfg.pad_conv_channels, metadata=export_metadata(cfg, all_int8))
    cost = dict(size_bytes=dict(all_int8=len(before.data), fallback=len(ex.data)))
    if cfg.measure_latency and ex.quantized.target.integer_kernels:
        ms = api.latency_ms({"all_int8": before, "fallback": ex}, held, cfg.threads)
        cost["latency_ms"] = dict(all_int8=ms["all_int8"], fallback=ms["fallback"], ratio=ms["fallback"] / ms["all_int8"],
                                  batch=1, threads=cfg.threads)
    return cost


# ONNX Runtime vs the simulation: the share of output elements within one step below which an
# export names the first diverging layer (the same bar as qwt-check's --min-agreement default)
MIN_EXACT = 0.999


def first_diverging_layer(cfg: ExportConfig, ex: api.ExportedModel, tensor_names: dict, held: InputSet,
                          samples: int = 32) -> Optional[dict]:
    """The first IR value (in graph order) where the file in ONNX Runtime differs from the
    simulation on more than 0.1% of elements by over one step of that value's quantizer: what
    ``qwt-check`` reports, run here on the exported file itself (no re-quantization) on
    ``samples`` held-out inputs. None when no single layer is below the bar (the output
    difference then builds up from rounding flips spread over many layers)."""
    ccfg = CheckConfig(export=cfg, targets=(ex.quantized.target.name,), num_inputs=samples,
                       batch_size=min(8, samples), gpu=False)
    report = run_check(ccfg, [CheckedFile.of(ex, tensor_names)], held.head(samples), "held-out inputs of qwt-export")
    found = [rec for rec in report["first_divergence"].values() if rec]
    return found[0] if found else None


# ------------------------------------------------------------------------ qwt-check --sensitivity
def run_sensitivity(cfg: ExportConfig, inputs: Optional[str] = None, progress: Optional[Callable] = None,
                    layer_progress: Optional[Callable] = None) -> dict:
    """Per-layer sensitivity of the model qwt-export makes with ``cfg`` (same calibration, same
    hold-out), on ``inputs`` (a file or folder) or its held-out data; ``cfg.sensitivity_samples``
    of them. The report as a dict (comparison.sensitivity.SensitivityReport, plus what ran)."""
    t = time.perf_counter()
    labels = load_class_labels(cfg.eval_labels) if cfg.eval_labels else None
    qm = api.quantize(cfg.model, cfg.calib_data, cfg.quantize_config(), progress, factory=cfg.model_factory,
                      trust_pickle=cfg.trust_pickle, evaluation=inputs or cfg.eval_data, evaluation_labels=labels,
                      holdout=HoldOut(fraction=cfg.holdout_fraction))
    t_quant = time.perf_counter() - t
    rep = api.sensitivity(qm, samples=cfg.sensitivity_samples, progress=layer_progress)
    s = qm.settings
    return dict(tool=f"qwt-deploy {__version__}", model=qm.loaded.description, target=qm.target.name,
                bits=f"W{s.w_bits}A{s.a_bits}", method=str(s.method), calib_method=s.calib_method,
                calibration=dict(samples=int(len(qm.inputs)), source=cfg.calib_data), heldout=qm.heldout_source,
                timing_s=dict(quantize=t_quant, sensitivity=rep.seconds, total=time.perf_counter() - t),
                **rep.to_dict())


# ------------------------------------------------------------------------------------ qwt-check
def held_out_description(cfg: CheckConfig) -> str:
    """What 'bundled' check inputs are for this configuration (for the report)."""
    if cfg.inputs != "bundled":
        return cfg.inputs
    if cfg.export.calib_data == "bundled":
        return "bundled held-out photos (never calibrated on)"
    example = example_from_source(cfg.export.calib_data)
    return f"held-out data of example {example.name} (never calibrated on)" if example else "bundled"


def load_check_inputs(cfg: CheckConfig, graph) -> InputSet:
    """Held-out inputs, one array per graph input (:class:`qwt_deploy.data.inputs.InputSet`).

    ``bundled``: what the calibration source holds back, as qwt-export's own check does --
    evaluation photos for the bundled photos, a built-in example's evaluation data (Fashion-MNIST
    test images, MiniLM's held-out sentences) for ``example:NAME``. Otherwise the user's file or
    folder, loaded and validated exactly like calibration data (an ``.npz`` with one array per
    input for a model with several inputs)."""
    n = cfg.num_inputs
    if n < 1:
        raise QwtError("--num-inputs must be at least 1", "use 128 or more")
    ecfg = cfg.export
    try:
        if cfg.inputs == "bundled":
            first = graph.inputs[0]
            if ecfg.calib_data == "bundled" and len(graph.inputs) == 1 and graph.is_float_input(first):
                from .data.photos import crops, evaluation_photos

                x = crops(evaluation_photos(), n, ecfg.preprocess.for_input(graph.input_shapes[first][1:]), ecfg.seed + 1)
                return InputSet.single(first, validate(x, graph.input_shapes[first][1:], "bundled photos"))
            example = example_from_source(ecfg.calib_data)
            if example is None:
                raise QwtError(f"no held-out inputs come with --calib-data {ecfg.calib_data}",
                               "pass --inputs heldout.npy (or an .npz with one array per model input)")
            held = example.evaluation(n, ecfg.seed + 1)[0]  # never a calibration sample
            arrays = dict(zip(held.names, held.arrays)) if isinstance(held, InputSet) else {first: held[:n]}
            missing = [v for v in graph.inputs if v not in arrays]
            if missing:
                raise QwtError(f"example {example.name}'s held-out data has no {', '.join(missing)}",
                               "use the example's own model (--example), or pass --inputs")
            return validate_inputs({k: v[:n] for k, v in arrays.items()}, graph, f"example {example.name}")
        if cfg.inputs == "synthetic":
            raise QwtError("qwt-check needs real inputs", "pass --inputs heldout.npy or an image folder")
        if not os.path.exists(cfg.inputs):
            raise QwtError(f"check inputs {cfg.inputs} do not exist", "pass a .npy/.npz file or an image folder")
        return load_model_inputs(cfg.inputs, graph, n, ecfg.preprocess, ecfg.seed)
    except QwtError as e:  # same checks as calibration data; say which flag is wrong
        raise as_check_inputs(e) from None


def run_check_files(cfg: CheckConfig, progress: Optional[Callable] = None,
                    batch_progress: Optional[Callable] = None) -> dict:
    """``qwt-check`` on files: quantize and export for each target exactly as qwt-export does
    (same flags and seed give the same file), or check the user's ``--onnx`` files in their
    place, on held-out inputs; see :func:`qwt_deploy.comparison.cross_backend.run_check`."""
    import os

    from .targets import get_target

    for t in cfg.targets:
        get_target(t)  # an unknown name fails now
    for t in cfg.onnx_files:
        if t not in cfg.targets:
            raise QwtError(f"--onnx {t}=... names a target that is not checked", f"add {t} to --targets")
    # fail on missing files before minutes of calibration, not after
    if cfg.inputs not in ("bundled", "synthetic") and not os.path.exists(cfg.inputs):
        raise QwtError(f"check inputs {cfg.inputs} do not exist", "pass a .npy/.npz file or an image folder")
    for path in cfg.onnx_files.values():
        if not os.path.isfile(path):
            raise QwtError(f"ONNX file {path} does not exist", "pass the path of an exported .onnx file")
    timing = {}
    t = time.perf_counter()
    files = []
    for name in cfg.targets:
        ecfg = replace(cfg.export, target=name)
        qm = api.quantize(ecfg.model, ecfg.calib_data, ecfg.quantize_config(), progress, factory=ecfg.model_factory,
                          trust_pickle=ecfg.trust_pickle, evaluation=ecfg.eval_data,
                          holdout=HoldOut(fraction=ecfg.holdout_fraction))  # calibrated on what qwt-export uses
        names: dict[str, str] = {}
        ex = api.export(qm, pad_conv_channels=ecfg.pad_conv_channels, metadata=export_metadata(ecfg, qm),
                        tensor_names=names)
        files.append(CheckedFile.of(ex, names, cfg.onnx_files.get(name)))
    timing["quantize_export"] = time.perf_counter() - t
    t = time.perf_counter()
    x = load_check_inputs(cfg, files[0].quantized.graph)
    timing["inputs"] = time.perf_counter() - t
    return run_check(cfg, files, x, held_out_description(cfg), timing, batch_progress)
