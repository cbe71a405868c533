"""A deployment target: everything that differs between backends, in one object.

Each backend is one module in this package with one :class:`Target` instance. The pipeline
(:mod:`qwt_deploy.api`), ``qwt-check`` and the benches ask the target; no other package
compares target names. Layers below this one (placement, calibration, export, passes,
runtime) take the target's choices as plain typed arguments, so they never import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import onnx

from ..graph.ir import Graph
from ..quantization.placement import DEFAULT_KEEP_FLOAT, KeepFloat, Kernels, QuantPlan, resolve_keep_float


@dataclass(frozen=True)
class ExecutionProviderPath:
    """An ONNX Runtime execution provider a check runs the file on, where it exists."""

    provider: str  # e.g. "CUDAExecutionProvider"
    path_name: str  # e.g. "ort-cuda[ort]"


@dataclass(frozen=True)
class Target:
    name: str  # the --target value
    description: str
    # placement: where quantizers go (quantize.placement.plan_for_*), then the fields below
    planner: Callable[..., QuantPlan]
    kernels: Kernels  # how the backend computes a quantized layer (the simulation follows)
    signed_activations: bool  # symmetric INT8 activations with zero point 0
    int32_bias: bool  # INT32 bias DequantizeLinear (False: the bias stays a float initializer)
    branch_precision: str  # QwT (v1) branch arithmetic: "fp32" | "fp16"
    default_observer: str  # the activation observer "--calib-method auto" means for this backend
    # ONNX Runtime CPU runs the file with its integer kernels: INT8 coverage and latency are
    # measured on it, and a check compares those kernels bit for bit. False: ORT runs a float
    # simulation of the backend (runtime_copy), which says nothing about speed.
    integer_kernels: bool
    check_description: str  # what the ort-cpu path of a check runs
    execution_providers: tuple[ExecutionProviderPath, ...] = ()
    tensorrt_engine: bool = False  # a check also builds and runs a TensorRT engine, where one exists

    def plan(self, graph: Graph, keep_float: Union[tuple[str, ...], KeepFloat] = DEFAULT_KEEP_FLOAT) -> QuantPlan:
        """Quantizer placement for ``graph`` in this backend's layout.

        ``keep_float``: op kinds, node names and ``re:`` patterns (``resolve_keep_float``). A
        name or pattern that selects no node of ``graph`` (or a word that is neither) is a
        QwtError here, where the list first meets the graph, so a typo is no silent no-op."""
        from dataclasses import replace

        if not isinstance(keep_float, KeepFloat):
            keep_float = tuple(keep_float)
            resolve_keep_float(graph, keep_float, strict=True)
        plan = self.planner(graph, keep_float=keep_float)
        return replace(plan, kernels=self.kernels, signed_activations=self.signed_activations,
                       int32_bias=self.int32_bias)

    def observer(self, calib_method: str) -> str:
        """``--calib-method`` with "auto" resolved to this backend's default."""
        return self.default_observer if calib_method == "auto" else calib_method

    # --- after export: passes that make the file fast or check it against the backend's rules
    def after_export(self, model: onnx.ModelProto, *, pad_conv_channels: bool = True) -> onnx.ModelProto:
        """Backend-specific passes on the folded graph that ships (exact rewrites only)."""
        return model

    def validate(self, model: onnx.ModelProto) -> Optional[dict]:
        """The backend's own rules on the file: raises QwtError on an error; the findings
        (warnings) as a dict for the report, or None where the backend has no rule checker."""
        return None

    # --- how ONNX Runtime runs the file for a check
    def runtime_copy(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The graph ONNX Runtime runs in place of the shipped one for the CPU check (tensor
        names and graph outputs kept). Identity where ORT runs the file itself."""
        return model

    def session_settings(self) -> dict:
        """``SessionFromOnnx`` settings for the CPU check of :meth:`runtime_copy`."""
        return {}

    def coverage(self, optimized: Optional[onnx.ModelProto]) -> dict:
        """INT8 kernel coverage of ORT's optimized graph (see runtime.coverage)."""
        raise NotImplementedError

    def build_engine(self, onnx_path: str) -> Optional[dict]:
        """Build the backend's own engine next to the file where the backend exists; None if
        this target has no engine step."""
        return None
