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


@dataclass(frozen=True)
class InputSpec:
    """One graph input as every runner is fed it: ONNX name, numpy dtype, shape with ``None``
    for dynamic axes (batch, sequence). Polygraphy checks each feed against this before
    running, so a wrong dtype or axis fails loudly instead of being silently cast."""

    name: str
    dtype: np.dtype
    shape: tuple


def input_specs(graph, onnx_names: list[str]) -> list[InputSpec]:
    """The specs of ``graph``'s inputs under their ONNX names (same order as ``graph.inputs``)."""
    import torch

    out = []
    for v, name in zip(graph.inputs, onnx_names):
        dtype = np.dtype(str(graph.input_dtypes.get(v, torch.float32)).replace("torch.", ""))
        out.append(InputSpec(name, dtype, tuple(d if isinstance(d, int) else None for d in graph.dims(v))))
    return out


class SimulationRunner(BaseRunner):
    """Runs ``SimulatedModel`` (FP32 when it has no params, else fake-quant) on CPU.

    ``inputs``: one :class:`InputSpec` per graph input, in graph-input order; the simulation
    gets one tensor (single input) or a tuple (token ids + attention mask), as it takes them.
    Outputs: the graph outputs under their ONNX names, and with ``intermediates=True`` every
    IR value as ``ir:<value>`` (what the next reader sees, i.e. after its quantizer).
    """

    def __init__(self, sim, inputs: list[InputSpec], output_names: dict[str, str],
                 intermediates: bool = True, name: Optional[str] = None):
        super().__init__(name=name, prefix="qwt-sim-runner")
        self.sim, self.inputs = sim, list(inputs)
        self.output_names = output_names  # IR value -> ONNX output name
        self.intermediates = intermediates

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for spec in self.inputs:
            meta.add(spec.name, dtype=spec.dtype, shape=spec.shape)
        return meta

    def infer_impl(self, feed_dict):
        import torch

        xs = tuple(torch.from_numpy(np.ascontiguousarray(feed_dict[s.name])) for s in self.inputs)
        values = {} if self.intermediates else None
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.sim(xs[0] if len(xs) == 1 else xs, intermediates=values)
        self.inference_time = time.perf_counter() - t0
        outs = out if isinstance(out, tuple) else (out,)
        result = OrderedDict()
        for (value, name), y in zip(self.output_names.items(), outs):
            result[name] = y.numpy()
        for value, y in (values or {}).items():
            if torch.is_tensor(y):  # (a Split-like node's tuple: its onnx_output items are listed too)
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
    return ModifyOutputs(model, outputs=keep + extra, copy=True)()  # the caller's model stays as it was


_DATA_MOVEMENT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def fusion_neutral(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    """The ``tensors`` that can become graph outputs without changing ONNX Runtime's QDQ fusion.

    Left out: the float output of a node unit that reads DequantizeLinear inputs (MatMul,
    Conv, ...) when it reaches a QuantizeLinear only through data-movement ops (Transpose,
    Reshape, ...). ORT moves that Q up to the node and fuses DQ->MatMul->Q into one integer
    kernel (QLinearMatMul, requantizing in fixed point); a graph output in the chain forces the
    float tensor to exist, so ORT would run MatMulIntegerToFloat + a float Q instead -- a
    different kernel, no longer the file being checked. (Attention's P.V -> transpose ->
    reshape -> Q in a transformer.) The same value is still compared through the
    DequantizeLinear after that Q, which is marked."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def reaches_quantize(t: str) -> bool:
        for n in readers.get(t, []):
            if n.op_type == "QuantizeLinear" or (n.op_type in _DATA_MOVEMENT and reaches_quantize(n.output[0])):
                return True
        return False

    def from_qdq_unit(t: str) -> bool:
        n = producer.get(t)
        while n is not None and n.op_type in _DATA_MOVEMENT:
            n = producer.get(n.input[0])
        return n is not None and n.op_type != "DequantizeLinear" and any(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)

    return [t for t in tensors if not (from_qdq_unit(t) and reaches_quantize(t))]


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


def profile_shapes(specs: list[InputSpec], x, batch_size: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """TensorRT optimization profile (min, opt, max) per input with a dynamic axis, covering
    every batch the check feeds: batch 1..batch_size, each other dynamic axis from its shortest
    to its longest batch (token batches are trimmed to their longest sentence). Without a
    profile TensorRT refuses to build an engine for a network with dynamic inputs."""
    batches = x.batches(batch_size)
    out = {}
    for k, spec in enumerate(specs):
        if all(d is not None for d in spec.shape):
            continue
        shapes = [b.arrays[k].shape for b in batches]
        lo = tuple(1 if i == 0 else min(s[i] for s in shapes) for i in range(len(spec.shape)))
        hi = tuple(max(s[i] for s in shapes) for i in range(len(spec.shape)))
        fixed = lambda t: tuple(d if d is not None else v for d, v in zip(spec.shape, t))  # noqa: E731
        out[spec.name] = (fixed(lo), fixed(hi), fixed(hi))
    return out


def trt_runner(model_bytes: bytes, name: str, specs: Optional[list[InputSpec]] = None, x=None, batch_size: int = 8):
    """A Polygraphy TrtRunner over an engine built from the QDQ ONNX (strongly typed), with an
    optimization profile for the dynamic axes of ``specs`` sized to the check inputs ``x``."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxBytes, Profile, TrtRunner

    try:
        network = NetworkFromOnnxBytes(model_bytes, strongly_typed=True)
    except TypeError:  # older Polygraphy without the strongly_typed argument
        network = NetworkFromOnnxBytes(model_bytes)
    config = None
    shapes = profile_shapes(specs, x, batch_size) if specs and x is not None else {}
    if shapes:
        profile = Profile()
        for input_name, (lo, opt, hi) in shapes.items():
            profile.add(input_name, min=lo, opt=opt, max=hi)
        config = CreateConfig(profiles=[profile])
    return TrtRunner(EngineFromNetwork(network, config=config), name=name)


def ort_gpu_providers() -> dict[str, Optional[str]]:
    """Execution provider -> None if available, else why it is skipped."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out = {}
    for ep in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        out[ep] = None if ep in have else (f"this onnxruntime build has no {ep} "
                                           f"(available: {', '.join(sorted(have))})")
    return out
