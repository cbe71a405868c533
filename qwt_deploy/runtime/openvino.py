"""OpenVINO CPU, the second real CPU runtime for the same INT8 QDQ file (issue #14).

``openvino`` is imported lazily, only when a model is compiled (as ``tensorrt`` is in
:mod:`.tensorrt`): it is an optional package (``pip install 'qwt-deploy[openvino]'``), and
nothing else in qwt-deploy needs it. :func:`probe_openvino` says whether it is there;
:func:`require_openvino` turns its absence into one :class:`~qwt_deploy.errors.QwtError` line.

:class:`OpenVinoSession` answers the parts of ``onnxruntime.InferenceSession`` the project
uses (``get_inputs``, ``get_outputs``, ``run``, ``get_modelmeta``), so the edge model,
:func:`.onnxruntime.run`, :func:`.onnxruntime.interleaved_samples_ms` and Polygraphy's
``OnnxrtRunner`` drive it unchanged: one code path for both runtimes, not two.

Two choices differ from OpenVINO's defaults, both measured on this 2-core CPU (issue #14):

- ``INFERENCE_PRECISION_HINT`` is pinned to ``f32`` unless asked otherwise. OpenVINO's default
  on a CPU with BF16 runs every *float* layer in bf16, which moves a float output by far more
  than one quantization step; an accuracy check must not compare that against a float
  simulation by accident. :class:`InferencePrecision` ``DEFAULT`` keeps OpenVINO's choice.
- A model with a dynamic batch axis is also compiled for fixed batch sizes (1 and 8 by
  default): static-shape kernels ran Lite0 17% faster at batch 1 and 11% at batch 8 than the
  dynamic compile. Any other batch size runs on the dynamic compile, so every batch still works.

:func:`layer_precisions` reads, from the *compiled* (runtime) model, which precision OpenVINO
executed each quantized ONNX layer in: a QDQ Conv that silently fell back to float shows up as
``f32``/``bf16`` there, not ``u8``/``i8``.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import QwtError
from ..log import logger

INSTALL_FIX = "pip install 'qwt-deploy[openvino]' (the openvino package from PyPI), or pass --runtime onnxruntime"
DEFAULT_STATIC_BATCHES = (1, 8)  # batch 1: qwt-run and single requests; 8: qwt-serve's default --max-batch


class InferencePrecision(str, enum.Enum):
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for float layers (integer layers stay integer)."""

    F32 = "f32"  # what accuracy checks use: float layers compute as the simulation does
    BF16 = "bf16"
    F16 = "f16"
    DEFAULT = "default"  # OpenVINO's own choice: bf16 on CPUs with BF16 support


@dataclass(frozen=True)
class OpenVinoStatus:
    available: bool
    version: str  # "" when not importable
    reason: str  # what was found, or why it cannot be used


def probe_openvino() -> OpenVinoStatus:
    """Can OpenVINO run a model here? (``import openvino`` and a CPU device)"""
    try:
        import openvino as ov
    except Exception as e:  # ImportError, or a broken install (missing shared library)
        return OpenVinoStatus(False, "", f"the openvino package is not importable ({type(e).__name__}: {e})")
    version = getattr(ov, "__version__", "?").split("-")[0]
    try:
        devices = ov.Core().available_devices
    except Exception as e:
        return OpenVinoStatus(False, version, f"OpenVINO {version} imports but its Core fails ({type(e).__name__}: {e})")
    if "CPU" not in devices:
        return OpenVinoStatus(False, version, f"OpenVINO {version} sees no CPU device (devices: {devices})")
    return OpenVinoStatus(True, version, f"OpenVINO {version}, CPU")


def require_openvino() -> OpenVinoStatus:
    status = probe_openvino()
    if not status.available:
        raise QwtError(f"--runtime openvino needs OpenVINO: {status.reason}", INSTALL_FIX)
    return status


# ---- the session ----------------------------------------------------------------------------
_TYPE_NAMES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)", "u8": "tensor(uint8)",
               "i8": "tensor(int8)", "i64": "tensor(int64)", "i32": "tensor(int32)", "boolean": "tensor(bool)"}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as ``onnxruntime.NodeArg`` describes it: name, shape (a string for a
    dynamic axis), type (``tensor(float)``...)."""

    name: str
    shape: list
    type: str


@dataclass(frozen=True)
class ModelMeta:
    custom_metadata_map: dict  # the ONNX file's metadata_props (qwt-export's preprocessing, labels...)


def _info(port) -> TensorInfo:
    shape = [d.get_length() if d.is_static else f"d{i}" for i, d in enumerate(port.get_partial_shape())]
    return TensorInfo(port.get_any_name(), shape, _TYPE_NAMES.get(port.get_element_type().get_type_name(), "tensor(float)"))


class OpenVinoSession:
    """An ONNX file compiled for the OpenVINO CPU plugin, with ONNX Runtime's session interface.

    Thread-safe: each thread gets its own infer request per compiled model (an infer request
    serves one call at a time; the compiled model is shared)."""

    def __init__(self, model, threads: int = 2, precision: InferencePrecision = InferencePrecision.F32,
                 static_batches: Sequence[int] = DEFAULT_STATIC_BATCHES, latency_hint: bool = True):
        import openvino as ov

        self.core = ov.Core()
        self.precision = InferencePrecision(precision)
        self.threads = max(1, int(threads))
        self.config = {"INFERENCE_NUM_THREADS": self.threads,
                       # LATENCY: one stream using all the threads for one request (what a
                       # single-model edge server and a latency benchmark want)
                       "PERFORMANCE_HINT": "LATENCY" if latency_hint else "THROUGHPUT"}
        if self.precision is not InferencePrecision.DEFAULT:
            self.config["INFERENCE_PRECISION_HINT"] = self.precision.value
        self.model = self._read(model)
        self._inputs = [_info(p) for p in self.model.inputs]
        self._outputs = [_info(p) for p in self.model.outputs]
        self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        # batch size -> compiled model with that batch fixed; only where the batch axis is dynamic
        self.static: dict[int, object] = {}
        if self._inputs and all(isinstance(i.shape[0], str) for i in self._inputs if i.shape):
            for b in sorted({int(b) for b in static_batches if int(b) >= 1}):
                self.static[b] = self._compile_static(b)
        self._local = threading.local()

    def _read(self, model):
        if isinstance(model, str):
            return self.core.read_model(model)
        import os
        import tempfile

        # read_model takes a path or an in-memory IR; an ONNX model in memory goes through a file
        fd, path = tempfile.mkstemp(suffix=".onnx")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model)
            return self.core.read_model(path)
        finally:
            os.unlink(path)

    def _compile_static(self, batch: int):
        m = self.model.clone()
        shapes = {}
        for p in m.inputs:
            ps = p.get_partial_shape()
            ps[0] = batch
            shapes[p.get_any_name()] = ps
        m.reshape(shapes)
        return self.core.compile_model(m, "CPU", self.config)

    # ---- onnxruntime.InferenceSession's interface -------------------------------------------
    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def get_modelmeta(self) -> ModelMeta:
        rt = self.model.get_rt_info()
        props = {}
        if "framework" in rt:  # OpenVINO's ONNX frontend keeps metadata_props here
            for k in rt["framework"]:
                props[k] = str(self.model.get_rt_info(["framework", k]).astype(str))
        return ModelMeta(props)

    def _request(self, compiled):
        reqs = getattr(self._local, "requests", None)
        if reqs is None:
            reqs = self._local.requests = {}
        r = reqs.get(id(compiled))
        if r is None:
            r = reqs[id(compiled)] = compiled.create_infer_request()
        return r

    def compiled_for(self, batch: int):
        """The compiled model that runs batch size ``batch``: a static one if compiled, else the dynamic one."""
        return self.static.get(batch, self.compiled)

    def run(self, output_names: Optional[list[str]], feed: dict) -> list[np.ndarray]:
        first = feed[self._inputs[0].name]
        req = self._request(self.compiled_for(int(first.shape[0]) if first.ndim else 1))
        res = req.infer({i.name: np.ascontiguousarray(feed[i.name]) for i in self._inputs})
        names = output_names or [o.name for o in self._outputs]
        index = {o.name: k for k, o in enumerate(self._outputs)}
        # copies: the request reuses its output buffers on the next call
        return [np.array(res[index[n]], copy=True) for n in names]

    def runtime_model(self, batch: Optional[int] = None):
        """OpenVINO's executed graph (layer types, precisions, fused original layers)."""
        return (self.compiled if batch is None else self.compiled_for(batch)).get_runtime_model()


@dataclass
class SessionFromOnnxOpenVino:
    """Loader, like :class:`.onnxruntime.SessionFromOnnx`: calling it compiles the model."""

    model: "str | bytes"
    threads: int = 2
    precision: InferencePrecision = InferencePrecision.F32
    static_batches: tuple[int, ...] = DEFAULT_STATIC_BATCHES

    session: Optional[OpenVinoSession] = field(default=None, repr=False)  # the last one made (precision readout)

    def __call__(self) -> OpenVinoSession:
        self.session = OpenVinoSession(self.model, self.threads, self.precision, self.static_batches)
        return self.session


# ---- which precision each quantized layer ran in -------------------------------------------
_COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
INTEGER_PRECISIONS = {"u8", "i8", "u4", "i4", "i32"}


@dataclass(frozen=True)
class LayerPrecision:
    node: str  # the ONNX node (a Conv/Gemm/MatMul that reads DequantizeLinear outputs)
    op: str
    layer: Optional[str]  # the OpenVINO runtime layer it was fused into (None: not found)
    layer_type: Optional[str]
    precision: Optional[str]  # runtimePrecision: u8/i8 = integer kernels, f32/bf16 = float fallback

    @property
    def integer(self) -> bool:
        return self.precision in INTEGER_PRECISIONS


@dataclass
class PrecisionReport:
    layers: list[LayerPrecision]
    by_precision: dict[str, int] = field(default_factory=dict)

    @property
    def float_fallback(self) -> list[LayerPrecision]:
        return [l for l in self.layers if l.precision is not None and not l.integer]

    @property
    def not_found(self) -> list[LayerPrecision]:
        return [l for l in self.layers if l.precision is None]

    @property
    def integer(self) -> int:
        return sum(l.integer for l in self.layers)

    def summary(self) -> str:
        s = f"{self.integer}/{len(self.layers)} quantized layers ran integer kernels in OpenVINO"
        if self.float_fallback:
            s += " -- FLOAT FALLBACK: " + ", ".join(f"{l.node} ({l.precision})" for l in self.float_fallback[:5])
            s += " ..." if len(self.float_fallback) > 5 else ""
        if self.not_found:
            s += f"; {len(self.not_found)} not found in the runtime model"
        return s

    def to_dict(self) -> dict:
        return dict(integer=self.integer, quantized_layers=len(self.layers), by_precision=self.by_precision,
                    float_fallback=[l.node for l in self.float_fallback], not_found=[l.node for l in self.not_found],
                    layers=[asdict(l) for l in self.layers])


def quantized_compute_nodes(onnx_model) -> list[tuple[str, str, str]]:
    """``(node name, op type, first output)`` of every Conv/Gemm/MatMul that reads a DequantizeLinear output."""
    g = onnx_model.graph
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type in _COMPUTE_OPS and any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                             for i in n.input):
            out.append((n.name, n.op_type, n.output[0]))
    return out


def layer_precisions(session: OpenVinoSession, onnx_model, batch: Optional[int] = None) -> PrecisionReport:
    """Per quantized ONNX layer: the runtime layer OpenVINO fused it into and that layer's
    executed precision, read from ``compiled_model.get_runtime_model()`` (``runtimePrecision``,
    ``originalLayersNames``). ``onnx_model``: the ``onnx.ModelProto`` the session was made from."""
    owner: dict[str, tuple[str, str, str]] = {}
    for op in session.runtime_model(batch).get_ops():
        info = op.get_rt_info()
        get = lambda k: str(info[k].astype(str)) if k in info else ""  # noqa: E731
        lt, prec = get("layerType"), get("runtimePrecision")
        if lt in ("Const", "Input", "Output", "Reorder"):
            continue
        for name in get("originalLayersNames").split(","):
            # the compute layer wins over a Reshape/Convert that lists the same original name
            if name and (name not in owner or owner[name][1] not in ("Convolution", "FullyConnected", "MatMul",
                                                                     "Deconvolution", "GroupConvolution")):
                owner[name] = (op.get_friendly_name(), lt, prec)
    layers, counts = [], {}
    for node, op_type, output in quantized_compute_nodes(onnx_model):
        # OpenVINO names a split-off bias add's input "<node>/WithoutBiases"; unnamed nodes go by output
        hit = owner.get(node) or owner.get(node + "/WithoutBiases") or owner.get(output)
        lp = LayerPrecision(node or output, op_type, *(hit or (None, None, None)))
        layers.append(lp)
        counts[lp.precision or "not found"] = counts.get(lp.precision or "not found", 0) + 1
    return PrecisionReport(layers, counts)


# ---- the qwt-export report section ---------------------------------------------------------
def export_report(int8: bytes, fp32: bytes, x, ort_session, step: Optional[float],
                  compare: Callable, threads: int = 2, measure_latency: bool = True) -> Optional[dict]:
    """OpenVINO's figures for ``qwt-export``'s report, or None when OpenVINO is not installed.

    ``x``: the held-out inputs (:class:`~qwt_deploy.data.inputs.InputSet`); ``ort_session``: the
    ONNX Runtime session the export check ran the file in; ``compare``: the project's step
    agreement (``comparison.agreement.compare``, passed in because that layer sits above this
    one). Reports OpenVINO (f32 hint) against ONNX Runtime on the same file and inputs, in
    output steps; which precision every quantized layer ran in; and batch-1 latency of the INT8
    file against the FP32 export and against ONNX Runtime, interleaved in one process."""
    status = probe_openvino()
    if not status.available:
        logger.debug(f"no OpenVINO figures in the report: {status.reason}")
        return None
    import onnx

    from .onnxruntime import SessionFromOnnx, interleaved_latency_ms, run

    t0 = time.perf_counter()
    try:
        sess = OpenVinoSession(int8, threads, InferencePrecision.F32)
    except Exception as e:  # an op OpenVINO lacks must not fail the export: the file is for ONNX Runtime too
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.warning(f"note: OpenVINO {status.version} cannot compile this file ({why}); no OpenVINO figures")
        return dict(version=status.version, error=why)
    got, ref = run(sess, x), run(ort_session, x)
    agreement = compare(ref, got, step).to_dict()
    precisions = layer_precisions(sess, onnx.load_from_string(int8))
    out = dict(version=status.version, precision_hint=InferencePrecision.F32.value,
               vs_onnxruntime=dict(agreement, samples=int(len(x)), output=sess.get_outputs()[0].name),
               layer_precisions={k: v for k, v in precisions.to_dict().items() if k != "layers"}, latency=None)
    if measure_latency:
        # ORT sessions must not spin while another runtime is timed (see SessionFromOnnx)
        ort_int8 = SessionFromOnnx(int8, threads, allow_spinning=False)()
        ms = interleaved_latency_ms({"openvino_int8": sess, "openvino_fp32": OpenVinoSession(fp32, threads),
                                     "onnxruntime_int8": ort_int8}, x.head(1))
        out["latency"] = dict(ms, batch=1, threads=threads,
                              ratio_to_openvino_fp32=ms["openvino_int8"] / ms["openvino_fp32"],
                              ratio_to_onnxruntime_int8=ms["openvino_int8"] / ms["onnxruntime_int8"])
    out["seconds"] = time.perf_counter() - t0
    return out
