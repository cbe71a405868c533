"""The runtime session of the edge runtime (ONNX Runtime, or OpenVINO), input validation, and top-k.

Every check on a request's tensor happens here, before ONNX Runtime sees it, so that a bad
request is a clear :class:`BadInput` (a 4xx in the server, exit code 2 in qwt-run) and never
an ONNX Runtime exception (a 500).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ..errors import QwtError
from .metadata import ModelMetadata, no_image_preprocessing, parse_metadata
from ..data.photos import PhotoTooLarge as ImageTooLarge
from .preprocess import ImageDecodeError, preprocess_image_bytes

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class Runtime(str, enum.Enum):
    """Which runtime executes the model (``--runtime``)."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"  # optional package; see qwt_deploy.runtime.openvino
    AUTO = "auto"  # the faster of the installed ones, timed on this model at start-up


class BadInput(ValueError):
    """A request the model cannot run: ``code`` names the problem, ``status`` is its HTTP status."""

    def __init__(self, code: str, message: str, status: int = 422):
        self.code, self.message, self.status = code, message, status
        super().__init__(message)


@dataclass
class TopK:
    index: int
    score: float  # the raw output value (a logit for classifiers)
    probability: float  # softmax over the output row
    label: Optional[str] = None

    def to_dict(self) -> dict:
        d = dict(index=self.index, score=self.score, probability=self.probability)
        if self.label is not None:
            d["label"] = self.label
        return d


class EdgeModel:
    """An exported INT8 ONNX model, ready to answer requests.

    ``allow_spinning=False`` because a server is idle most of the time: spinning ORT worker
    threads would burn the edge box's cores (and battery) between requests.
    """

    def __init__(self, path: str, threads: int = 1, allow_spinning: bool = False,
                 runtime: Runtime = Runtime.ONNXRUNTIME):
        if os.path.isdir(path):
            raise QwtError(f"model path {path} is a folder, not a file", "pass the .onnx file that qwt-export wrote")
        if not os.path.isfile(path):
            raise QwtError(f"model file {path} does not exist", "pass the .onnx file that qwt-export wrote")
        if not os.access(path, os.R_OK):
            raise QwtError(f"model file {path} is not readable by this user (uid {os.getuid()})",
                           "make it readable, e.g. chmod a+r (qwt-export gives its files the mode your umask allows)")
        self.runtime, self.runtime_choice = Runtime(runtime), None
        if self.runtime is Runtime.AUTO:
            self.runtime, self.runtime_choice = _fastest_runtime(path, threads)
        self.session = (_openvino_session(path, threads) if self.runtime is Runtime.OPENVINO
                        else _onnxruntime_session(path, threads, allow_spinning))
        self.path = path
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise QwtError(f"model {path} has {len(inputs)} inputs", "the edge runtime serves single-input models")
        self.input = inputs[0]
        self.input_dtype = np.dtype(_ORT_DTYPES.get(self.input.type, np.float32))
        self.output_names = [o.name for o in self.session.get_outputs()]
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata: ModelMetadata = parse_metadata(dict(props))
        dims = list(self.input.shape)
        self.dynamic_batch = not isinstance(dims[0], int) if dims else False
        # The sample shape: ORT's static dims, else the metadata's.
        static = dims[1:]
        if all(isinstance(d, int) for d in static):
            self.sample_shape = tuple(static)
        elif self.metadata.input_shape is not None:
            self.sample_shape = tuple(self.metadata.input_shape)
        else:
            raise QwtError(f"model {path} has dynamic non-batch input dims {dims} and no qwt_deploy.input_shape metadata",
                           "export it with qwt-export, which records the input shape")
        if self.metadata.preprocess is not None:  # channels (grey or RGB) from the model's real input
            self.metadata = replace(self.metadata, preprocess=self.metadata.preprocess.for_input_shape(self.sample_shape))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    @property
    def accepts_images(self) -> bool:
        return self.metadata.preprocess is not None and self.metadata.preprocess.usable

    def describe(self) -> dict:
        pre = self.metadata.preprocess
        return dict(model=os.path.basename(self.path), runtime=self.runtime.value,
                    **({"runtime_choice": self.runtime_choice} if self.runtime_choice else {}),
                    input=self.input.name, input_shape=["N", *self.sample_shape],
                    input_dtype=str(self.input_dtype), outputs=self.output_names, labels=len(self.labels),
                    accepts_images=self.accepts_images,
                    images=None if pre is None else dict(resize=pre.resize, crop=pre.crop, color=pre.color,
                                                         mean=list(pre.mean), std=list(pre.std),
                                                         calibrated_on_images=pre.from_images, source=pre.source.value))

    # ---- inputs --------------------------------------------------------------------------
    def tensor_from_array(self, x: np.ndarray) -> np.ndarray:
        """Validate a tensor: (C,H,W) or (N,C,H,W) of the model's sample shape; returns N,C,H,W."""
        if x.dtype.kind not in "fiu":
            raise BadInput("wrong_dtype", f"input dtype is {x.dtype}; the model takes {self.input_dtype} numbers")
        if x.dtype != self.input_dtype and not np.can_cast(x.dtype, self.input_dtype, casting="same_kind"):
            raise BadInput("wrong_dtype", f"input dtype {x.dtype} cannot be cast safely to {self.input_dtype}")
        given = list(x.shape)
        if x.ndim == len(self.sample_shape):
            x = x[None]
        if x.ndim != len(self.sample_shape) + 1 or tuple(x.shape[1:]) != self.sample_shape:
            raise BadInput("wrong_shape", f"input shape is {given}; the model takes "
                           f"{list(self.sample_shape)} or [N, {', '.join(map(str, self.sample_shape))}]")
        if x.shape[0] < 1:
            raise BadInput("wrong_shape", "input holds no sample (batch size 0)")
        if not self.dynamic_batch and x.shape[0] != self.input.shape[0]:
            raise BadInput("wrong_shape", f"the model has a fixed batch size {self.input.shape[0]}, got {x.shape[0]}")
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values: refused below, not warned on stderr
            x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise BadInput("not_finite", "input holds NaN or infinite values")
        return x

    def tensor_from_image(self, data: bytes) -> np.ndarray:
        pre = self.metadata.preprocess
        # None: not recorded (arrays without flags), or not an image input; not usable: an old
        # export's invented defaults. Either way the message says how to re-export.
        if pre is None or not pre.usable:
            raise BadInput("no_image_preprocessing", no_image_preprocessing(self.sample_shape), 415)
        try:
            return preprocess_image_bytes(data, pre)[None].astype(self.input_dtype, copy=False)
        except ImageTooLarge as e:
            raise BadInput("image_too_large", str(e), 413) from None
        except ImageDecodeError as e:
            raise BadInput("undecodable_image", str(e), 400) from None

    # ---- run -----------------------------------------------------------------------------
    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """N,C,H,W (validated) -> the model's outputs, each with a leading N axis."""
        return self.session.run(self.output_names, {self.input.name: x})

    def top_k(self, row: np.ndarray, k: int) -> list[TopK]:
        """Top-k of one output row (1-D, or squeezable to 1-D)."""
        v = np.asarray(row, dtype=np.float64).reshape(-1)
        k = max(1, min(int(k), v.size))
        idx = np.argsort(-v, kind="stable")[:k]
        p = np.exp(v - v.max())
        p /= p.sum()
        return [TopK(int(i), float(v[i]), float(p[i]), self.labels[i] if i < len(self.labels) else None) for i in idx]


def _onnxruntime_session(path: str, threads: int, allow_spinning: bool):
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()  # an edge box sends nothing anywhere unasked
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No CPU memory arena: with it, the buffers of the largest batch ever run stay reserved for
    # the life of the process (one 2,600-sample request pinned ~480 MB); without it they are
    # freed after each run, at a cost within the noise for the edge's batch sizes.
    so.enable_cpu_mem_arena = False
    if not allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for corrupt files
        raise QwtError(f"model file {path} cannot be loaded by ONNX Runtime ({type(e).__name__})",
                       "pass an ONNX file written by qwt-export") from None


def _openvino_session(path: str, threads: int):
    from ..runtime.openvino import OpenVinoSession, require_openvino

    require_openvino()  # absent: one line naming the fix, exit 2
    try:
        return OpenVinoSession(path, threads)  # f32 float layers: the same numbers as the check
    except Exception as e:  # OpenVINO raises RuntimeError subclasses for corrupt or unsupported files
        raise QwtError(f"model file {path} cannot be loaded by OpenVINO ({type(e).__name__}: {str(e).splitlines()[0]})",
                       "pass an ONNX file written by qwt-export, or use --runtime onnxruntime") from None


def _fastest_runtime(path: str, threads: int) -> tuple[Runtime, dict]:
    """``--runtime auto``: every installed runtime loads the model and runs batch 1 in
    interleaved rounds; the faster one is kept. Measured here, on this model, because which
    runtime wins depends on the CPU (OpenVINO's integer depthwise kernels win on AVX-512 VNNI)."""
    from ..runtime.onnxruntime import interleaved_latency_ms
    from ..runtime.openvino import probe_openvino

    status = probe_openvino()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # e.g. the OpenVINO container image
        if status.available:
            return Runtime.OPENVINO, dict(requested="auto", reason="only openvino is installed")
        raise QwtError("neither onnxruntime nor openvino is installed", "pip install onnxruntime") from None
    if not status.available:
        return Runtime.ONNXRUNTIME, dict(requested="auto", reason=f"only onnxruntime is usable ({status.reason})")
    sessions = {Runtime.ONNXRUNTIME.value: _onnxruntime_session(path, threads, False)}
    sessions[Runtime.OPENVINO.value] = _openvino_session(path, threads)
    inp = sessions[Runtime.ONNXRUNTIME.value].get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    if len(shape) != 4 or any(not isinstance(d, int) for d in inp.shape[1:]):
        return Runtime.ONNXRUNTIME, dict(requested="auto", reason="input shape not static beyond the batch axis; "
                                         "onnxruntime kept without timing")
    x = np.zeros(shape, np.dtype(_ORT_DTYPES.get(inp.type, np.float32)))
    ms = interleaved_latency_ms(sessions, x, rounds=5, per_round=4)
    best = Runtime(min(ms, key=ms.get))
    return best, dict(requested="auto", batch1_ms={k: round(v, 3) for k, v in ms.items()},
                      reason=f"{best.value} was faster at batch 1 on this machine")
