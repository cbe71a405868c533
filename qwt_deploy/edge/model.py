"""The ONNX Runtime session of the edge runtime, input validation, and top-k.

Every check on a request's tensor happens here, before ONNX Runtime sees it, so that a bad
request is a clear :class:`BadInput` (a 4xx in the server, exit code 2 in qwt-run) and never
an ONNX Runtime exception (a 500).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ..errors import QwtError
from .metadata import ModelMetadata, parse_metadata
from .preprocess import ImageDecodeError, preprocess_image_bytes

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


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

    def __init__(self, path: str, threads: int = 1, allow_spinning: bool = False):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise QwtError(f"model file {path} does not exist", "pass the .onnx file that qwt-export wrote")
        if not os.access(path, os.R_OK):
            raise QwtError(f"model file {path} is not readable by this user (uid {os.getuid()})",
                           "make it readable, e.g. chmod a+r (qwt-export writes 0600 files)")
        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()  # an edge box sends nothing anywhere unasked
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for corrupt files
            raise QwtError(f"model file {path} cannot be loaded by ONNX Runtime ({type(e).__name__})",
                           "pass an ONNX file written by qwt-export") from None
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
        return self.metadata.preprocess is not None and self.metadata.preprocess.from_images

    def describe(self) -> dict:
        pre = self.metadata.preprocess
        return dict(model=os.path.basename(self.path), input=self.input.name, input_shape=["N", *self.sample_shape],
                    input_dtype=str(self.input_dtype), outputs=self.output_names, labels=len(self.labels),
                    accepts_images=self.accepts_images,
                    images=None if pre is None else dict(resize=pre.resize, crop=pre.crop, color=pre.color,
                                                         mean=list(pre.mean), std=list(pre.std),
                                                         calibrated_on_images=pre.from_images))

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
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise BadInput("not_finite", "input holds NaN or infinite values")
        return x

    def tensor_from_image(self, data: bytes) -> np.ndarray:
        pre = self.metadata.preprocess
        if pre is None:
            raise BadInput("no_image_preprocessing", "this model's metadata has no image preprocessing (it is not "
                           "a 1- or 3-channel image model exported by qwt-export); send a JSON tensor instead", 415)
        if not pre.from_images:  # the recorded values are qwt-export's defaults, not what the user did
            raise BadInput("no_image_preprocessing", "this model was calibrated on preprocessed arrays, so its image "
                           "preprocessing is unknown; send a tensor, or re-export with an image folder as "
                           "--calib-data (plus --resize/--crop/--mean/--std)", 415)
        try:
            return preprocess_image_bytes(data, pre)[None].astype(self.input_dtype, copy=False)
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
