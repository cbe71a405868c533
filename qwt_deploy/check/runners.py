"""Polygraphy runners for every path ``qwt-check`` compares, and the loaders behind them.

Polygraphy's ``Comparator.run(streaming=True)`` activates all runners at once and feeds them
the same batch, so each batch's outputs (intermediates included) can be compared and thrown
away: memory stays constant however many inputs are checked. ONNX Runtime and TensorRT
already have Polygraphy runners; only the PyTorch simulation needs one, because Polygraphy's
``PytRunner`` moves inputs to CUDA and returns only the model's outputs.

Every runner's outputs are keyed by ONNX tensor name; :class:`PathSpec` holds the mapping
back to IR values so that all paths can be compared value by value.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

SIM_PREFIX = "ir:"  # the simulation runner names its outputs after IR values


class SimulationRunner(BaseRunner):
    """Runs ``SimulatedModel`` (FP32 when it has no params, else fake-quant) on CPU.

    Outputs: the graph outputs under their ONNX names, and with ``intermediates=True`` every
    IR value as ``ir:<value>`` (what the next reader sees, i.e. after its quantizer).
    """

    def __init__(self, sim, input_name: str, input_shape: tuple, output_names: dict[str, str],
                 intermediates: bool = True, name: Optional[str] = None):
        super().__init__(name=name, prefix="qwt-sim-runner")
        self.sim, self.input_name, self.input_shape = sim, input_name, tuple(input_shape)
        self.output_names = output_names  # IR value -> ONNX output name
        self.intermediates = intermediates

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        meta.add(self.input_name, dtype=np.float32, shape=(None,) + self.input_shape)
        return meta

    def infer_impl(self, feed_dict):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feed_dict[self.input_name]))
        values = {} if self.intermediates else None
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.sim(x, intermediates=values)
        self.inference_time = time.perf_counter() - t0
        outs = out if isinstance(out, tuple) else (out,)
        result = OrderedDict()
        for (value, name), y in zip(self.output_names.items(), outs):
            result[name] = y.numpy()
        for value, y in (values or {}).items():
            result[SIM_PREFIX + value] = y.numpy()
        return result


@dataclass
class SessionWithProviders:
    """ONNX Runtime session loader for any execution providers (CUDA, TensorRT EP, CPU).

    ``disable_quant_qdq`` turns off ORT's QDQ -> integer-kernel fusion, so Q/DQ run as float
    ops: how a TensorRT-layout graph is simulated on a machine without TensorRT.
    """

    model: bytes
    providers: list = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = 2
    disable_quant_qdq: bool = False
    optimized_model_path: Optional[str] = None
    optimize: bool = True  # False: no graph optimizations (keeps a rewritten graph's arithmetic as written)

    def __call__(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # several sessions in one process
        if self.disable_quant_qdq:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        if not self.optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.optimized_model_path:
            so.optimized_model_filepath = self.optimized_model_path
        return ort.InferenceSession(self.model, so, providers=self.providers)


def mark_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """The model with ``tensors`` added as graph outputs (Polygraphy's ModifyOutputs)."""
    from polygraphy.backend.onnx import ModifyOutputs

    keep = [o.name for o in model.graph.output]
    extra = [t for t in dict.fromkeys(tensors) if t not in keep]
    return ModifyOutputs(model, outputs=keep + extra)()


def trt_unavailable_reason() -> Optional[str]:
    """Why no TensorRT engine can be built here, or None if it can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"the tensorrt Python package is not importable ({type(e).__name__})"
    try:
        import torch

        if not torch.cuda.is_available():
            return "tensorrt imports but no CUDA GPU is visible"
    except Exception:
        pass
    return None


def trt_runner(model_bytes: bytes, name: str):
    """A Polygraphy TrtRunner over an engine built from the QDQ ONNX (strongly typed)."""
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxBytes, TrtRunner

    try:
        network = NetworkFromOnnxBytes(model_bytes, strongly_typed=True)
    except TypeError:  # older Polygraphy without the strongly_typed argument
        network = NetworkFromOnnxBytes(model_bytes)
    return TrtRunner(EngineFromNetwork(network), name=name)


def ort_gpu_providers() -> dict[str, Optional[str]]:
    """Execution provider -> None if available, else why it is skipped."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out = {}
    for ep in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        out[ep] = None if ep in have else (f"this onnxruntime build has no {ep} "
                                           f"(available: {', '.join(sorted(have))})")
    return out
