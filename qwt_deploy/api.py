"""The public Python API: the one wiring of the pipeline.

    load -> calibrate + compensate (:func:`quantize`) -> export + fold (:func:`export`)
         -> run and check (:func:`verify`, :func:`check`)

``qwt-export``, ``qwt-check``, the benches, the examples and the tests all go through these
functions; nothing else strings the steps together. Example::

    import numpy as np, qwt_deploy as qd
    qm = qd.quantize(model, calib, qd.QuantizeConfig(target="ort"))   # calib: N x C x H x W float32
    exported = qd.export(qm, "model.int8.onnx")
    print(qd.verify(exported, heldout).agreement.within_1_step)

``model`` is an ``nn.Module``, a ``torch.export.ExportedProgram`` or a file path;
``calibration`` is an array, a dict of arrays (one per model input), an
:class:`~qwt_deploy.data.inputs.InputSet`, an iterable of batches, or a source string
(``.npy``/``.npz`` file, image folder, ``bundled``, ``example:NAME``, ``synthetic``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Mapping, Optional, Union

import numpy as np
import onnx
import torch

from ._version import __version__
from .atomic import atomic_write_bytes
from .calibration.qwt_branch import compensation_summary
from .calibration.sequential import CalibrationResult, CalibrationSettings, calibrate
from .comparison.agreement import Agreement, compare
from .config import QuantizeConfig
from .data.inputs import InputSet, validate_inputs
from .data.preprocess import Preprocess
from .data.sources import load_model_inputs, validate
from .errors import QwtError
from .examples import example_from_source
from .exporter.qdq import export_onnx
from .graph.ir import Graph
from .frontend.model_file import LoadedModel, load_model
from .graph_passes import fold_cwac_into_weight_scales
from .log import logger
from .quantization.placement import QuantPlan
from .quantization.simulate import QuantParams, SimulatedModel
from .runtime.onnxruntime import SessionFromOnnx, interleaved_latency_ms, run
from .targets import Target

ModelLike = Union[str, torch.nn.Module, "torch.export.ExportedProgram", onnx.ModelProto, LoadedModel]
CalibrationLike = Union[str, np.ndarray, Mapping[str, np.ndarray], InputSet, Iterable]
Progress = Callable[[int, int, str], None]

KEY_INPUTS = "qwt_deploy.inputs"  # token models: JSON [{"name", "dtype", "shape"}] instead of image keys


@dataclass
class QuantizedModel:
    """Steps 1-3 (load + capture, calibration data, calibrate + compensate)."""

    loaded: LoadedModel
    graph: Graph
    plan: QuantPlan
    target: Target
    settings: CalibrationSettings  # as run: "auto" observer and branch precision resolved for the target
    result: CalibrationResult
    inputs: InputSet  # the calibration samples actually used, one array per model input
    preprocess: Preprocess = field(default_factory=Preprocess)  # for image sources given as paths
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> QuantParams:
        return self.result.params

    @property
    def in_shape(self) -> tuple:
        """The first input's shape without the batch axis."""
        return tuple(self.graph.input_shapes[self.graph.inputs[0]][1:])

    def simulation(self) -> SimulatedModel:
        """The PyTorch fake-quant model of the deployed graph (bit-exact integer kernels)."""
        return SimulatedModel(self.graph, self.plan, self.params)

    def float_model(self) -> SimulatedModel:
        """The captured model in FP32 (BatchNorm folded)."""
        return SimulatedModel(self.graph)

    def _run(self, sim: SimulatedModel, x) -> np.ndarray:
        xs = calibration_inputs(x, self.graph, num=2**62, preprocess=self.preprocess)
        with torch.no_grad():
            y = sim(xs.torch())
        return (y[0] if isinstance(y, tuple) else y).numpy()

    def __call__(self, x) -> np.ndarray:
        """The simulated INT8 model's (first) output for ``x`` (an array, dict or InputSet)."""
        return self._run(self.simulation(), x)

    def reference(self, x) -> np.ndarray:
        """The FP32 model's (first) output for ``x``: the reference INT8 is measured against."""
        return self._run(self.float_model(), x)


@dataclass
class ExportedModel:
    """Steps 4-5: the QDQ export with CWAC as explicit Mul/Add (``unfolded``), and the folded
    graph that ships (``folded``), after the target's own passes and rule check."""

    quantized: QuantizedModel
    unfolded: onnx.ModelProto
    folded: onnx.ModelProto
    n_folded: int
    rules: Optional[dict] = None  # the target's rule-checker findings (trt), None where it has none
    path: Optional[str] = None  # where it was written, if it was
    seconds: float = 0.0

    @property
    def data(self) -> bytes:
        return self.folded.SerializeToString()

    def save(self, path: str) -> str:
        """Write the folded model atomically (never a partial file)."""
        atomic_write_bytes(path, self.data)
        self.path = path
        return path


@dataclass
class Verification:
    """The exported file in ONNX Runtime against the PyTorch simulation it was fitted on."""

    agreement: Agreement  # ORT vs simulation, in output quantization steps: the worst output
    samples: int
    coverage: dict  # INT8 kernel coverage in ORT's optimized graph (or why not applicable)
    latency: Optional[dict] = None  # int8_ms, fp32_ms, ratio (batch 1, interleaved), integer targets only
    plain_float: Optional[dict] = None  # float-simulation targets: the shipped graph as-is in ORT float
    outputs: dict = field(default_factory=dict)  # graph output name -> Agreement, every output

    def to_dict(self) -> dict:
        return dict(agreement=self.agreement.to_dict(), samples=self.samples, coverage=self.coverage,
                    latency=self.latency, plain_float=self.plain_float,
                    outputs={k: a.to_dict() for k, a in self.outputs.items()})


# ---------------------------------------------------------------------------------------- load
def load(model: ModelLike, *, factory: Optional[str] = None, trust_pickle: bool = False) -> LoadedModel:
    """A model file (see :mod:`qwt_deploy.frontend.model_file`), an ``nn.Module`` or an
    ``ExportedProgram`` as a :class:`LoadedModel`."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return LoadedModel(onnx=model, description="FP32 ONNX (in memory)")
    if isinstance(model, torch.export.ExportedProgram):
        return LoadedModel(program=model, description="torch.export program (in memory)")
    if isinstance(model, torch.nn.Module):
        return LoadedModel(module=model, description=f"nn.Module {type(model).__name__} (in memory)")
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(None if model is None else os.fspath(model), factory, trust_pickle)
    raise QwtError(f"cannot quantize a {type(model).__name__}",
                   "pass an nn.Module, a torch.export program or a model file path")


def capture_graph(loaded: LoadedModel, example_shape: tuple[int, ...] = (3, 224, 224)) -> Graph:
    """The IR of a loaded model, always through an FP32 ONNX graph (the pipeline's one front end):
    a module or a ``torch.export`` program is first exported by PyTorch's own exporter
    (frontend.onnx_source.fp32_onnx_from_module: dynamo, opset 20, node names = module paths),
    and kept as ``loaded.onnx``; frontend.onnx_graph then makes quantizable nodes IR ops and
    every other node a float node. A plain module is traced on a batch of 2 zero images of
    ``example_shape`` with a dynamic batch axis; a module with token inputs traces itself
    (``model.example_inputs()``). A program traced at a fixed batch is made batch-free
    (frontend.onnx_source.free_batch_axis, checked in ONNX Runtime)."""
    from .frontend.onnx_graph import graph_from_onnx
    from .frontend.onnx_source import fp32_onnx_from_module, free_batch_axis

    if loaded.onnx is None:
        if loaded.program is not None:  # traced by the user, often at a fixed batch: freed, and proven free
            loaded.onnx = fp32_onnx_from_module(loaded.program)
            free_batch_axis(loaded.onnx)
        else:
            example = torch.zeros((2,) + tuple(example_shape))
            loaded.onnx = fp32_onnx_from_module(loaded.module, (example,), ({0: torch.export.Dim.AUTO},))
    return graph_from_onnx(loaded.onnx)


# ---------------------------------------------------------------------------------------- data
def calibration_inputs(calibration: CalibrationLike, graph: Graph, num: int = 512,
                       preprocess: Optional[Preprocess] = None, seed: int = 0) -> InputSet:
    """At most ``num`` validated samples of every graph input, whatever form they come in.
    ``example:NAME`` is resolved here (the data loaders know no examples)."""
    pre = preprocess or Preprocess()
    names = tuple(graph.inputs)
    # one float input: validated against its shape (a named, dynamic axis takes any size)
    single_float = len(names) == 1 and graph.is_float_input(names[0])
    if isinstance(calibration, str):
        example = example_from_source(calibration)
        if example is None:
            return load_model_inputs(calibration, graph, num, pre, seed)
        data = example.calibration(num, seed)
        if isinstance(data, InputSet):
            if data.names != names:
                raise QwtError(f"--calib-data {calibration} does not fit a model with inputs {', '.join(names)}",
                               "use the example's own model (--example), or pass an .npz with one array per input")
            return validate_inputs(dict(zip(data.names, data.arrays)), graph, calibration)
        calibration = data
    source = "(arrays)"  # validate() says "calibration data (arrays) has shape ..."
    if isinstance(calibration, InputSet):
        arrays = dict(zip(calibration.names, calibration.arrays))
    elif isinstance(calibration, np.ndarray) or torch.is_tensor(calibration):
        arrays = {names[0]: np.asarray(calibration)}
    elif isinstance(calibration, Mapping):
        arrays = {k: np.asarray(v) for k, v in calibration.items()}
    elif isinstance(calibration, Iterable):  # batches: arrays, or tuples in graph-input order
        parts = [b if isinstance(b, (tuple, list)) else (b,) for b in calibration]
        if not parts:
            raise QwtError("the calibration batches are empty", "pass at least one batch (512 samples recommended)")
        arrays = {n: np.concatenate([np.asarray(p[k]) for p in parts]) for k, n in enumerate(names)}
    else:
        raise QwtError(f"calibration data of type {type(calibration).__name__} is not supported",
                       "pass an array, a dict of arrays, an InputSet, batches, or a file/folder path")
    if single_float:
        if names[0] not in arrays:
            raise QwtError(f"the calibration data has no array for input {names[0]}", f"name it {names[0]}")
        return InputSet.single(names[0], validate(arrays[names[0]][:num], tuple(graph.dims(names[0])[1:]), source))
    missing = [n for n in names if n not in arrays]
    if missing:
        raise QwtError(f"the calibration data has no array for {', '.join(missing)}",
                       "pass one array per model input, named as the inputs: " + ", ".join(names))
    return validate_inputs({k: arrays[k][:num] for k in names}, graph, source)


# ------------------------------------------------------------------------ calibrate + compensate
def quantize(model: ModelLike, calibration: CalibrationLike, config: Optional[QuantizeConfig] = None,
             progress: Optional[Progress] = None, *, factory: Optional[str] = None,
             trust_pickle: bool = False) -> QuantizedModel:
    """Steps 1-3: load and capture the model, place quantizers for the target, calibrate and
    compensate (closed form, sequential, no back-propagation)."""
    cfg = config or QuantizeConfig()
    target = cfg.target
    timing = {}
    t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    loaded = load(model, factory=factory, trust_pickle=trust_pickle)
    graph = capture_graph(loaded, cfg.example_shape)
    settings = replace(cfg.settings, calib_method=target.observer(cfg.settings.calib_method),
                       branch_precision=target.branch_precision)
    branches = settings.block_algorithm()
    if branches is not None:  # QwT (v1): a branch node per block
        graph = branches.prepare(graph)
    plan = target.plan(graph, keep_float=tuple(cfg.keep_float))
    timing["load_capture"] = time.perf_counter() - t

    t = time.perf_counter()
    x = calibration_inputs(calibration, graph, cfg.num_calib, cfg.preprocess, cfg.seed)
    if loaded.onnx_converted_from:  # an older opset converted up: same outputs on the user's data?
        from .frontend.onnx_source import check_conversion

        check_conversion(loaded.onnx_converted_from, loaded.onnx, dict(zip(x.names, x.head(4).arrays)))
    if len(x) < cfg.num_calib and not (isinstance(calibration, str) and calibration in ("synthetic", "bundled")):
        logger.info(f"note: {len(x)} calibration samples available (asked for {cfg.num_calib})")
    timing["data"] = time.perf_counter() - t

    result = calibrate(graph, plan, x.calibration_batches(cfg.batch_size), settings, progress)
    timing["calibrate"] = result.seconds
    return QuantizedModel(loaded=loaded, graph=graph, plan=plan, target=target, settings=settings,
                          result=result, inputs=x, preprocess=cfg.preprocess, timing=timing)


# ---------------------------------------------------------------------------- export + fold
def default_metadata(qm: QuantizedModel, extra: Optional[dict] = None) -> dict[str, str]:
    """ONNX metadata: how the model was made. A model with token inputs also gets
    ``qwt_deploy.inputs`` (names, dtypes, dynamic axes) so the edge runtime can feed it; image
    models get the preprocessing keys from ``extra`` (see pipeline.export_metadata)."""
    s = qm.settings
    meta = {"qwt_deploy.version": __version__, "qwt_deploy.method": str(s.method),
            "qwt_deploy.bits": f"W{s.w_bits}A{s.a_bits}", "qwt_deploy.target": qm.target.name}
    g = qm.graph
    if len(g.inputs) != 1 or not g.is_float_input(g.inputs[0]):
        meta[KEY_INPUTS] = json.dumps([dict(name=v, dtype=str(g.input_dtypes.get(v, torch.float32)).replace("torch.", ""),
                                            shape=g.dims(v)) for v in g.inputs])
        return meta
    return {**meta, **(extra or {})}


def export(quantized: QuantizedModel, path: Optional[str] = None, *, pad_conv_channels: bool = True,
           metadata: Optional[dict[str, str]] = None, tensor_names: Optional[dict[str, str]] = None) -> ExportedModel:
    """Steps 4-5: QDQ export (CWAC as explicit Mul/Add), fold CWAC into the weight scales and
    biases, the target's passes (ort: channel pad) and rule check (trt: errors raise), checked
    with ``onnx.checker`` (full). Written atomically to ``path`` if given.
    ``tensor_names`` (optional) is filled with IR value -> ONNX tensor name (qwt-check)."""
    qm, target = quantized, quantized.target
    t = time.perf_counter()
    meta = metadata if metadata is not None else default_metadata(qm)
    unfolded = export_onnx(qm.graph, qm.plan, qm.params, meta, tensor_names=tensor_names)
    folded, n_folded = fold_cwac_into_weight_scales(unfolded)
    folded = target.after_export(folded, pad_conv_channels=pad_conv_channels)
    onnx.checker.check_model(folded, full_check=True)
    rules = target.validate(folded)  # before writing: an error fails the export
    ex = ExportedModel(quantized=qm, unfolded=unfolded, folded=folded, n_folded=n_folded, rules=rules,
                       seconds=time.perf_counter() - t)
    if path:
        ex.save(path)
    return ex


def export_float(model: Union[QuantizedModel, Graph, ModelLike],
                 example_shape: tuple[int, ...] = (3, 224, 224)) -> onnx.ModelProto:
    """The FP32 ONNX of the captured model (the latency and size reference): of a quantized
    model's graph, of a graph, or of any model :func:`quantize` takes (captured here)."""
    if isinstance(model, QuantizedModel):
        graph = model.graph
    elif isinstance(model, Graph):
        graph = model
    else:
        graph = capture_graph(load(model), example_shape)
    return export_onnx(graph, metadata={"qwt_deploy.version": __version__})


# ------------------------------------------------------------------------------ run + verify
def check_session(exported: ExportedModel, threads: int = 2, optimized_model_path: Optional[str] = None):
    """An ONNX Runtime CPU session that runs the file as the check does: the file itself with
    ORT's integer kernels, or the target's float-simulation copy (trt)."""
    target = exported.quantized.target
    copy = target.runtime_copy(exported.folded)
    data = exported.data if copy is exported.folded else copy.SerializeToString()
    return SessionFromOnnx(data, threads, optimized_model_path=optimized_model_path, allow_spinning=False,
                           **target.session_settings())()


def verify(exported: ExportedModel, inputs: Optional[CalibrationLike] = None, *, threads: int = 2,
           measure_latency: bool = True, samples: int = 64, fp32: Optional[onnx.ModelProto] = None) -> Verification:
    """Step 6: run the exported file in ONNX Runtime and compare it with the PyTorch simulation
    on ``inputs`` (any form :func:`quantize` takes; default: the last ``samples`` calibration
    samples), in output quantization steps; INT8 kernel coverage; batch-1 latency against FP32,
    interleaved in one process (against ``fp32``, default: :func:`export_float` of the model)."""
    qm, target = exported.quantized, exported.quantized.target
    if inputs is None:
        x = qm.inputs.tail(samples)
    elif isinstance(inputs, InputSet):
        x = inputs
    else:
        x = calibration_inputs(inputs, qm.graph, num=2**62, preprocess=qm.preprocess)
    with torch.no_grad():
        y = qm.simulation()(x.torch())
    refs = [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]
    with tempfile.TemporaryDirectory() as td:
        opt_path = os.path.join(td, "opt.onnx") if target.integer_kernels else None
        sess = check_session(exported, threads, opt_path)
        gots = sess.run(None, x.feed(sess))
        optimized = onnx.load(opt_path) if opt_path else None
        coverage = target.coverage(optimized)
    if optimized is not None and qm.loaded.onnx is not None:  # the same, as a share of conv/matmul FLOPs
        from .runtime.coverage import integer_flop_share

        one = x.head(1)
        share = integer_flop_share(qm.loaded.onnx, exported.data, {n: a.shape for n, a in zip(one.names, one.arrays)},
                                   optimized=optimized, threads=threads)
        coverage = dict(coverage, flops=dict(share=share["share"], total=share["flops_total"],
                                             integer=share["flops_integer"], float_ops=share["float_ops"]))
    # every output, each in its own quantization step (its quantizer's scale, or the step its
    # values show when it is a float output); the worst one is the file's agreement
    names = [o.name for o in sess.get_outputs()]
    outputs = {n: compare(r, g, output_quant_step(qm, v)) for n, v, r, g in zip(names, qm.graph.outputs, refs, gots)}
    agreement = min(outputs.values(), key=lambda a: (a.within_1_step, -a.max_steps))
    plain_float = None
    if not target.integer_kernels:  # for the record: the shipped graph as-is in ORT float
        plain = SessionFromOnnx(exported.data, threads, allow_spinning=False, disable_qdq_fusion=True)()
        plain_float = compare(refs[0], run(plain, x), output_quant_step(qm, qm.graph.outputs[0])).to_dict()
    latency = None
    if measure_latency and target.integer_kernels:  # float simulation timings say nothing about the backend
        fsess = SessionFromOnnx((fp32 or export_float(qm)).SerializeToString(), threads, allow_spinning=False)()
        ms = interleaved_latency_ms({"int8": sess, "fp32": fsess}, x.head(1))
        latency = dict(int8_ms=ms["int8"], fp32_ms=ms["fp32"], ratio=ms["int8"] / ms["fp32"], batch=1, threads=threads)
    return Verification(agreement=agreement, samples=int(len(x)), coverage=coverage, latency=latency,
                        plain_float=plain_float, outputs=outputs)


def output_quant_step(qm: QuantizedModel, value: str) -> Optional[float]:
    """The step of the quantizer on graph output ``value``, None for a float output (then the
    comparison uses the step its values show)."""
    if not qm.plan.sees_quantized(value, None):
        return None
    q = qm.params.acts.get(qm.plan.root(value))
    return float(q.scale) if q is not None else None


def check(model: ModelLike, calibration: CalibrationLike, inputs: CalibrationLike,
          config: Optional[QuantizeConfig] = None, targets: tuple = ("ort",), *, check_config=None,
          progress: Optional[Progress] = None, batch_progress=None, factory: Optional[str] = None):
    """``qwt-check`` from Python: quantize for each target, export, and compare PyTorch FP32,
    each target's fake-quant and every backend on ``inputs`` (held-out data, any form
    :func:`quantize` takes), in output quantization steps, layer by layer. Returns a
    :class:`~qwt_deploy.comparison.cross_backend.CheckReport`."""
    from .comparison.cross_backend import CheckConfig, CheckedFile, CheckReport, run_check

    cfg = config or QuantizeConfig()
    ccfg = check_config or CheckConfig()
    files = []
    for name in targets:
        qm = quantize(model, calibration, replace(cfg, target=name), progress, factory=factory)
        names: dict[str, str] = {}
        ex = export(qm, tensor_names=names)
        files.append(CheckedFile.of(ex, names))
    x = calibration_inputs(inputs, files[0].quantized.graph, ccfg.num_inputs, cfg.preprocess, cfg.seed)
    source = calibration if isinstance(calibration, str) else f"{type(calibration).__name__} in memory"
    ccfg = replace(ccfg, targets=tuple(targets), export=replace(
        ccfg.export, threads=cfg.threads, seed=cfg.seed, quant=cfg.settings, num_calib=cfg.num_calib, calib_data=source))
    return CheckReport(**run_check(ccfg, files, x, "inputs given to qwt_deploy.check", batch_progress=batch_progress))


def model_report(exported: ExportedModel) -> dict:
    """What calibration fitted, per layer and per block, for the JSON report."""
    qm = exported.quantized
    float_nodes = [dict(node=n.name, op_type=n.attrs["proto"].op_type) for n in qm.graph.nodes if n.op == "onnx"]
    return dict(layers=[asdict(l) for l in qm.result.layers], folded_layers=exported.n_folded,
                # an ONNX source: the nodes left in float, run by ONNX Runtime node by node in the simulation
                float_nodes=float_nodes,
                compensation=compensation_summary(qm.graph, qm.result),
                node_count=dict(unfolded=len(exported.unfolded.graph.node), folded=len(exported.folded.graph.node)))
