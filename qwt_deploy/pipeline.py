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
from .atomic import atomic_write_bytes, check_writable
from .comparison.cross_backend import CheckConfig, CheckedFile, as_check_inputs, run_check
from .config import ExportConfig
from .data.inputs import InputSet, validate_inputs
from .data.sources import load_model_inputs, validate
from .errors import QwtError
from .examples import example_from_source
from .report import default_report_path, write_json


def export_metadata(cfg: ExportConfig, qm: api.QuantizedModel) -> dict:
    """ONNX metadata: how the model was made, plus what the edge runtime needs to feed it
    (preprocessing keys for an image model; see api.default_metadata for token models)."""
    from .edge.metadata import export_metadata as edge_metadata  # the JSON keys the edge runtime reads

    return api.default_metadata(qm, edge_metadata(cfg.preprocess.to_dict(), qm.in_shape, cfg.calib_data,
                                                  cfg.labels_file))


def held_out_inputs(cfg: ExportConfig, qm: api.QuantizedModel) -> InputSet:
    """Inputs for the ORT-vs-simulation check: a built-in example's held-out data (photos never
    calibrated on; Fashion-MNIST test images; pydoc sentences never calibrated on); else the
    last calibration samples."""
    n = max(1, cfg.check_samples)
    calib = qm.inputs
    if cfg.calib_data == "bundled":
        from .data.photos import crops, evaluation_photos

        return InputSet.single(calib.names[0], crops(evaluation_photos(), n, cfg.preprocess, cfg.seed + 1))
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
    # below MIN_EXACT within one step: the first layer where ONNX Runtime leaves the simulation
    first_diverging_layer: Optional[dict] = None
    report_path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def run_export(cfg: ExportConfig, progress: Optional[Callable[[int, int, str], None]] = None) -> ExportReport:
    t_start = time.perf_counter()
    check_writable(cfg.output)
    report_path = default_report_path(cfg.output)
    check_writable(report_path)

    # 1-3. load + capture, calibration data, calibrate + compensate
    qm = api.quantize(cfg.model, cfg.calib_data, cfg.quantize_config(), progress, factory=cfg.model_factory,
                      trust_pickle=cfg.trust_pickle)
    timing = dict(qm.timing)

    # 4. export (CWAC as explicit Mul/Add), 5. fold + the target's passes and rule check
    t = time.perf_counter()
    tensor_names: dict[str, str] = {}  # IR value -> ONNX tensor, for locating a divergence layer by layer
    ex = api.export(qm, pad_conv_channels=cfg.pad_conv_channels, metadata=export_metadata(cfg, qm),
                    tensor_names=tensor_names)
    fp32 = api.export_float(qm)
    ex.save(cfg.output)
    if cfg.keep_unfolded:
        atomic_write_bytes(cfg.output.replace(".onnx", "") + ".unfolded.onnx", ex.unfolded.SerializeToString())
    timing["export_fold"] = time.perf_counter() - t
    engine = None
    if qm.target.tensorrt_engine:  # 5c. engine where TensorRT and a CUDA GPU exist; always the trtexec command line
        t = time.perf_counter()
        engine = qm.target.build_engine(cfg.output)
        timing["tensorrt_engine"] = time.perf_counter() - t

    # 6. run + check against the PyTorch simulation
    t = time.perf_counter()
    held = held_out_inputs(cfg, qm)
    v = api.verify(ex, held, threads=cfg.threads, measure_latency=cfg.measure_latency, fp32=fp32)
    diverging = None
    if v.agreement.within_1_step < MIN_EXACT:  # exactness is the rule: say where it breaks
        diverging = first_diverging_layer(cfg, ex, tensor_names, held)
    timing["check"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t_start

    s = qm.settings
    report = ExportReport(
        tool=f"qwt-deploy {__version__}", model=qm.loaded.description, output=cfg.output, target=qm.target.name,
        config=cfg.to_dict(),
        quantization=dict(method=str(s.method), w_bits=s.w_bits, a_bits=s.a_bits, calib_method=s.calib_method,
                          ridge=s.ridge, reference=s.reference),
        calibration=dict(samples=int(len(qm.inputs)), source=cfg.calib_data, batch_size=cfg.batch_size),
        **api.model_report(ex),
        int8_coverage=v.coverage, ort_vs_pytorch=dict(v.agreement.to_dict(), samples=v.samples,
                                                     outputs={k: a.to_dict() for k, a in v.outputs.items()}),
        first_diverging_layer=diverging,
        latency=v.latency, size_bytes=dict(int8=len(ex.data), fp32=len(fp32.SerializeToString())),
        timing_s=timing, trt_rules=ex.rules, tensorrt_engine=engine, ort_plain_float_vs_pytorch=v.plain_float,
    )
    write_json(report.to_dict(), report_path)
    report.report_path = report_path
    return report


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

                x = crops(evaluation_photos(), n, ecfg.preprocess, ecfg.seed + 1)
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
                          trust_pickle=ecfg.trust_pickle)
        names: dict[str, str] = {}
        ex = api.export(qm, pad_conv_channels=ecfg.pad_conv_channels, metadata=export_metadata(ecfg, qm),
                        tensor_names=names)
        files.append(CheckedFile.of(ex, names, cfg.onnx_files.get(name)))
    timing["quantize_export"] = time.perf_counter() - t
    t = time.perf_counter()
    x = load_check_inputs(cfg, files[0].quantized.graph)
    timing["inputs"] = time.perf_counter() - t
    return run_check(cfg, files, x, held_out_description(cfg), timing, batch_progress)
