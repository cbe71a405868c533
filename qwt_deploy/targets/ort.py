"""``--target ort``: ONNX Runtime CPU with its integer kernels (QLinearConv, QGemm, ...).

uint8 asymmetric activations with a Q on op outputs (so ORT fuses DQ -> op -> Q units),
per-channel int8 weights, INT32 bias. Min-max activation ranges by default: the asymmetric
uint8 grid covers exactly [min, max] (Lite0 W8A8 qwt2, 525 held-out crops: minmax 0.9810
top-1 agreement). QwT branches stay FP32: ORT's x86 CPU provider has no FP16 Conv/MatMul
kernels (it inserts Casts and computes in FP32, measured with ORT 1.32).
"""

from __future__ import annotations

from typing import Optional

import onnx

from ..graph_passes import pad_conv_input_channels
from ..quantization.placement import Kernels, plan_for_ort
from ..runtime.coverage import int8_coverage
from .base import ExecutionProviderPath, Target


class OnnxRuntimeTarget(Target):
    def after_export(self, model: onnx.ModelProto, *, pad_conv_channels: bool = True) -> onnx.ModelProto:
        # exact; MLAS's fast INT8 conv kernel needs input channels % 4 == 0 (an RGB stem has 3)
        if pad_conv_channels:
            model, _ = pad_conv_input_channels(model)
        return model

    def coverage(self, optimized: Optional[onnx.ModelProto]) -> dict:
        return int8_coverage(optimized)


ORT = OnnxRuntimeTarget(
    name="ort", description="ONNX Runtime CPU integer kernels (uint8 activations, int8 weights)",
    planner=plan_for_ort, kernels=Kernels.REQUANTIZING, signed_activations=False, int32_bias=True,
    branch_precision="fp32", default_observer="minmax", integer_kernels=True,
    check_description="ONNX Runtime CPU, integer kernels",
    execution_providers=(ExecutionProviderPath("CUDAExecutionProvider", "ort-cuda[ort]"),),
)
