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
from .comparison.accuracy import Accuracy, AccuracyGates, HoldOut, holdout_split, measure
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
    # held-out data for accuracy against FP32 (never calibrated on): the user's evaluation data,
    # the source's own held-out set (built-in examples, bundled photos) or a split of the
    # calibration data (comparison.accuracy.holdout_split); None when there was none to hold out
    heldout: Optional[InputSet] = None
    heldout_labels: Optional[np.ndarray] = None
    heldout_source: str = ""  # where it came from, in words (or why there is none)
    config: Optional[QuantizeConfig] = None  # as given to quantize (keep_float etc.), for re-quantizing
    _accuracy: Optional[Accuracy] = field(default=None, repr=False)

    @property
    def accuracy(self) -> Optional[Accuracy]:
        """This model against FP32 on :attr:`heldout` (computed once, on first use); None when
        there is no held-out data."""
        if self._accuracy is None and self.heldout is not None:
            self._accuracy = evaluate(self)
        return self._accuracy

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
             trust_pickle: bool = False, evaluation: Optional[CalibrationLike] = None,
             evaluation_labels: Optional[np.ndarray] = None,
             holdout: Optional[HoldOut] = HoldOut()) -> QuantizedModel:
    """Steps 1-3: load and capture the model, place quantizers for the target, calibrate and
    compensate (closed form, sequential, no back-propagation).

    Held-out data for :attr:`QuantizedModel.accuracy` (never calibrated on), first that applies:
    ``evaluation`` (any form ``calibration`` takes; ``evaluation_labels`` one class per sample);
    a source's own held-out set (``example:NAME``, ``bundled``: ``holdout.samples`` of them, with
    the example's labels where it has them); else ``holdout`` splits the loaded calibration
    samples (default 10%, at least 32; nothing is held out from fewer than 64, nor when
    ``holdout`` is None or the source is ``synthetic``)."""
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
    x, held, labels, held_source = _hold_out(calibration, graph, cfg, x, evaluation, evaluation_labels, holdout)
    timing["data"] = time.perf_counter() - t

    result = calibrate(graph, plan, x.calibration_batches(cfg.batch_size), settings, progress)
    timing["calibrate"] = result.seconds
    return QuantizedModel(loaded=loaded, graph=graph, plan=plan, target=target, settings=settings,
                          result=result, inputs=x, preprocess=cfg.preprocess, timing=timing, heldout=held,
                          heldout_labels=labels, heldout_source=held_source, config=cfg)


def _hold_out(calibration, graph: Graph, cfg: QuantizeConfig, x: InputSet, evaluation, labels,
              holdout: Optional[HoldOut]) -> tuple[InputSet, Optional[InputSet], Optional[np.ndarray], str]:
    """(calibration samples, held-out samples, their labels, where they came from): see quantize."""
    if evaluation is not None:
        held = calibration_inputs(evaluation, graph, num=2**62, preprocess=cfg.preprocess, seed=cfg.seed)
        if labels is not None and len(np.asarray(labels).reshape(-1)) < len(held):
            raise QwtError(f"{len(np.asarray(labels).reshape(-1))} evaluation labels for {len(held)} evaluation samples",
                           "give one integer class label per evaluation sample, in the same order")
        lab = None if labels is None else np.asarray(labels).reshape(-1)[:len(held)]
        src = evaluation if isinstance(evaluation, str) else f"{type(evaluation).__name__} given as evaluation data"
        return x, held, lab, src
    if holdout is None:
        return x, None, None, "none (hold-out off)"
    if isinstance(calibration, str) and calibration == "synthetic":
        return x, None, None, "none (synthetic calibration data: accuracy would mean nothing)"
    own = _own_held_out(calibration, graph, cfg, holdout.samples) if isinstance(calibration, str) else None
    if own is not None:
        return (x, *own)
    cal, held = holdout_split(len(x), holdout, cfg.seed)
    if not len(held):
        return x, None, None, (f"none ({len(x)} calibration samples: at least {2 * holdout.minimum} are needed to "
                               f"hold out {holdout.minimum}; pass evaluation data)")
    logger.info(f"note: {len(held)} of {len(x)} calibration samples held out for accuracy against FP32")
    return (x.take(cal), x.take(held), None,
            f"{len(held)} of {len(x)} calibration samples held out (seed {cfg.seed}), never calibrated on")


def _own_held_out(source: str, graph: Graph, cfg: QuantizeConfig, n: int):
    """The held-out set that comes with ``bundled`` or ``example:NAME`` (its labels where it has
    them), or None for any other source."""
    first = graph.inputs[0]
    if source == "bundled" and len(graph.inputs) == 1 and graph.is_float_input(first):
        from .data.photos import crops, evaluation_photos

        held = crops(evaluation_photos(), n, cfg.preprocess.for_input(tuple(graph.dims(first)[1:])), cfg.seed + 1)
        return InputSet.single(first, validate(held, tuple(graph.dims(first)[1:]), "bundled photos")), None, \
            f"{n} crops of the bundled evaluation photos (never calibrated on)"
    example = example_from_source(source)
    if example is None:
        return None
    held, labels = example.evaluation(n, cfg.seed + 1)
    arrays = dict(zip(held.names, held.arrays)) if isinstance(held, InputSet) else {first: np.asarray(held)[:n]}
    if any(v not in arrays for v in graph.inputs):
        return None
    held = validate_inputs({k: v[:n] for k, v in arrays.items() if k in graph.inputs}, graph, f"example {example.name}")
    lab = None if labels is None else np.asarray(labels)[:len(held)]
    return held, lab, f"{len(held)} held-out samples of example {example.name} (never calibrated on)"


# ------------------------------------------------------------------ accuracy against FP32
def _batches(x: InputSet, batch_size: int = 32) -> list:
    """``x`` in order (labels stay aligned), as the simulation takes it."""
    return [x.take(slice(i, i + batch_size)).torch() for i in range(0, len(x), batch_size)]


def evaluate(quantized: QuantizedModel, inputs: Optional[CalibrationLike] = None,
             labels: Optional[np.ndarray] = None, *, batch_size: int = 32) -> Accuracy:
    """The quantized model (its PyTorch simulation, which ``verify`` checks ONNX Runtime against)
    against FP32 on ``inputs`` (default: its held-out data and labels): top-1 agreement, mean
    KL, cosine, SQNR, and top-1 accuracy of both with labels."""
    from .comparison.sensitivity import run_first_output

    qm = quantized
    if inputs is None:
        if qm.heldout is None:
            raise QwtError(f"no held-out data to evaluate on: {qm.heldout_source or 'none'}",
                           "pass evaluation data (evaluation=..., --eval-data FILE)")
        x, labels, source = qm.heldout, qm.heldout_labels if labels is None else labels, qm.heldout_source
    else:
        x = inputs if isinstance(inputs, InputSet) else calibration_inputs(inputs, qm.graph, num=2**62,
                                                                          preprocess=qm.preprocess)
        source = inputs if isinstance(inputs, str) else "inputs given to evaluate"
    b = _batches(x, batch_size)
    fp32 = run_first_output(qm.float_model(), b)
    return measure(fp32, run_first_output(qm.simulation(), b), labels, source)


def evaluate_file(exported: "ExportedModel", inputs: InputSet, labels: Optional[np.ndarray] = None, *,
                  threads: int = 2, batch_size: int = 32, source: str = "") -> Accuracy:
    """The exported file as ONNX Runtime runs it (:func:`check_session`) against FP32 on
    ``inputs``: what ships, where it differs from the simulation :func:`evaluate` measures."""
    from .comparison.sensitivity import run_first_output

    qm = exported.quantized
    sess = check_session(exported, threads)
    parts = [inputs.take(slice(i, i + batch_size)) for i in range(0, len(inputs), batch_size)]
    got = np.concatenate([sess.run(None, b.feed(sess))[0] for b in parts])
    fp32 = run_first_output(qm.float_model(), [b.torch() for b in parts])
    return measure(fp32, got, labels, source or "inputs given to evaluate_file")


def sensitivity(quantized: QuantizedModel, inputs: Optional[CalibrationLike] = None, *, samples: int = 32,
                batch_size: int = 32, exact: bool = False, progress: Optional[Progress] = None):
    """Per-layer sensitivity on ``samples`` held-out inputs (default: the model's own held-out
    data): see :func:`qwt_deploy.comparison.sensitivity.layer_sensitivity`."""
    from .comparison.sensitivity import layer_sensitivity

    qm = quantized
    if inputs is None and qm.heldout is None:
        raise QwtError(f"no held-out data for the sensitivity analysis: {qm.heldout_source or 'none'}",
                       "pass held-out inputs (--eval-data FILE or --inputs)")
    x = qm.heldout if inputs is None else (inputs if isinstance(inputs, InputSet) else calibration_inputs(
        inputs, qm.graph, num=2**62, preprocess=qm.preprocess))
    x = x.head(max(1, samples))
    source = qm.heldout_source if inputs is None else (inputs if isinstance(inputs, str) else "given inputs")
    return layer_sensitivity(qm.graph, qm.plan, qm.params, _batches(x, batch_size), samples=len(x),
                             source=source, exact=exact, progress=progress)


@dataclass
class Fallback:
    """``auto_fallback``'s outcome: the model re-quantized with the chosen layers kept float."""

    quantized: QuantizedModel  # re-calibrated with keep_float + chosen (the input model if none)
    chosen: list[str]
    met: bool  # the gates are met on the full held-out data by ``quantized``
    before: Accuracy  # all layers quantized, full held-out data
    after: Accuracy  # ``quantized``, full held-out data
    sensitivity: object  # SensitivityReport used for the ranking (None when no fallback was needed)
    search: object  # FallbackSearch on the sensitivity subset (None when no fallback was needed)
    max_float_layers: int = 0
    seconds: float = 0.0
    # the search's layers when, re-calibrated for real, they did not help (then none are kept float)
    rejected: Optional[dict] = None

    def to_dict(self) -> dict:
        return dict(chosen=self.chosen, met=self.met, before=self.before.to_dict(), after=self.after.to_dict(),
                    max_float_layers=self.max_float_layers, seconds=self.seconds, rejected=self.rejected,
                    sensitivity=None if self.sensitivity is None else self.sensitivity.to_dict(),
                    search=None if self.search is None else self.search.to_dict())


def auto_fallback(quantized: QuantizedModel, gates: AccuracyGates, *, max_float_layers: int = 8,
                  samples: int = 32, progress: Optional[Progress] = None,
                  sensitivity_progress: Optional[Progress] = None, ranking=None) -> Fallback:
    """Keep the most sensitive layers float, greedily, until ``gates`` are met on held-out data,
    at most ``max_float_layers`` of them. Ranked by :func:`sensitivity` and searched on its
    subset without re-calibrating (comparison.sensitivity.greedy_fallback); then the model is
    re-calibrated once with those layers kept float (``keep_float`` node names, as
    ``--keep-float`` takes them) and measured on the full held-out data. ``ranking``: a
    :func:`sensitivity` report of this model to reuse (else it is computed here)."""
    from .comparison.sensitivity import Variants, gate_score, greedy_fallback, run_first_output

    t = time.perf_counter()
    qm = quantized
    if not gates.any:
        raise QwtError("auto-fallback needs a target", "pass --min-agreement, --max-kl or --min-cosine")
    if max_float_layers < 1:
        raise QwtError(f"--max-float-layers {max_float_layers} is below 1", "allow at least one layer, e.g. 8")
    before = qm.accuracy
    if before is None:
        raise QwtError(f"auto-fallback needs held-out data: {qm.heldout_source or 'none'}",
                       "pass --eval-data FILE, or at least 64 calibration samples")
    gates.check_kind(before.kind)
    if gates.met(before):
        return Fallback(quantized=qm, chosen=[], met=True, before=before, after=before, sensitivity=None,
                        search=None, max_float_layers=max_float_layers, seconds=time.perf_counter() - t)
    report = ranking if ranking is not None else sensitivity(qm, samples=samples, progress=sensitivity_progress)
    # the search measures each candidate set on all the held-out data (the gates' own data: a
    # subset's top-1 agreement is too coarse to decide a 0.99 bar), with the ranking's fast variants
    x, labels = qm.heldout, qm.heldout_labels
    b = _batches(x)
    fp32 = run_first_output(qm.float_model(), b)
    variants = Variants(qm.graph, qm.plan, qm.params, report.exact)
    search = greedy_fallback(lambda layers: measure(fp32, run_first_output(variants.without(layers), b), labels),
                             report.ranking(), gates, max_float_layers)
    out, chosen, rejected = qm, list(search.chosen), None
    if chosen:
        cfg = replace(qm.config, keep_float=tuple(qm.config.keep_float) + tuple(chosen))
        out = quantize(qm.loaded, qm.inputs, cfg, progress, evaluation=qm.heldout, evaluation_labels=qm.heldout_labels)
        out.heldout_source = qm.heldout_source
        if not gates.met(out.accuracy) and gate_score(out.accuracy, gates) >= gate_score(before, gates):
            # re-calibrated for real, the float layers do not bring the gated figures closer to
            # the bar: float layers that cost latency for nothing are not shipped
            rejected = dict(layers=chosen, accuracy=out.accuracy.to_dict())
            out, chosen = qm, []
    after = out.accuracy
    return Fallback(quantized=out, chosen=chosen, met=gates.met(after), before=before, after=after,
                    sensitivity=report, search=search, max_float_layers=max_float_layers,
                    seconds=time.perf_counter() - t, rejected=rejected)


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


def latency_ms(sessions: Mapping[str, "ExportedModel | onnx.ModelProto"], x: InputSet, threads: int = 2) -> dict:
    """Batch-1 latency of several files in one process, interleaved (runtime.onnxruntime):
    name -> ms. An ExportedModel runs as its check runs it; a ModelProto as is."""
    sess = {}
    for k, m in sessions.items():
        sess[k] = (check_session(m, threads) if isinstance(m, ExportedModel)
                   else SessionFromOnnx(m.SerializeToString(), threads, allow_spinning=False)())
    return interleaved_latency_ms(sess, x.head(1))


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
