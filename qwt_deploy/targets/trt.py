"""``--target trt``: TensorRT explicit quantization.

Symmetric INT8 activations (zero point 0), per-channel INT8 weights + DequantizeLinear, float
bias, Q/DQ on the inputs of Conv/Gemm and on the skip input of residual Adds so TensorRT fuses
the Add into the conv (quantize.placement.plan_for_trt). MSE activation ranges by default:
symmetric INT8 spends half its codes on negatives a ReLU6 output never has, and clipping
outliers wins the resolution back (Lite0 W8A8 qwt2, 525 held-out crops: minmax 0.9714, mse
0.9829). QwT branches run in FP16 (strongly typed networks run a layer in its tensors' type).

On a CPU the file is checked in ONNX Runtime *float simulation*: QDQ fusion off, each quantized
Conv/Gemm rewritten to an exact integer accumulator times float32(s_x)*s_w plus the float bias
(graph_passes.rewrite_layers_as_integer_accumulators), FP16 nodes as FP32 arithmetic on
FP16-rounded values (graph_passes.emulate_fp16_in_fp32), graph optimizations off so ORT does
not fold the scale back into the weights. The PyTorch simulation (quantize/trt_kernels.py)
computes the same, so the two agree bit for bit. Where TensorRT and a CUDA GPU exist, the
engine is built and saved next to the file.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import onnx

from ..errors import QwtError
from ..graph_passes.check_trt_rules import check_trt_rules, errors, format_findings
from ..graph_passes.emulate_fp16_in_fp32 import emulate_fp16_in_fp32
from ..graph_passes.rewrite_layers_as_integer_accumulators import rewrite_layers_as_integer_accumulators
from ..log import logger
from ..quantization.placement import Kernels, plan_for_trt
from .base import ExecutionProviderPath, Target

NOT_APPLICABLE = dict(applicable=False, integer_ops=0, compute_ops=0, by_type={},
                      note="not applicable: --target trt is run by ONNX Runtime in float simulation "
                           "(QDQ fusion off); TensorRT fuses the INT8 kernels")


class TensorRTTarget(Target):
    def validate(self, model: onnx.ModelProto) -> Optional[dict]:
        """TensorRT's explicit-quantization rules: an error fails the export, warnings print."""
        findings = check_trt_rules(model)
        bad = errors(findings)
        if bad:
            f = bad[0]
            raise QwtError(f"the --target trt graph breaks TensorRT rule '{f.rule}' at node {f.node}: {f.message} "
                           f"({len(bad)} error(s) in all)", f"{f.fix}; this is a qwt-export bug, please report it")
        logger.info(format_findings(findings))
        return dict(errors=0, warnings=len(findings), findings=[asdict(f) for f in findings])

    def runtime_copy(self, model: onnx.ModelProto) -> onnx.ModelProto:
        rewritten, _ = rewrite_layers_as_integer_accumulators(model)
        return emulate_fp16_in_fp32(rewritten)[0]

    def session_settings(self) -> dict:
        return dict(level="disable", disable_qdq_fusion=True)

    def coverage(self, optimized: Optional[onnx.ModelProto]) -> dict:
        return dict(NOT_APPLICABLE)

    def build_engine(self, onnx_path: str) -> Optional[dict]:
        from ..runtime.tensorrt import build_engine_next_to

        built = build_engine_next_to(onnx_path)
        logger.info(built.message())
        return built.to_dict()


TRT = TensorRTTarget(
    name="trt", description="TensorRT explicit quantization (symmetric int8, float bias)",
    planner=plan_for_trt, kernels=Kernels.ACCUMULATING, signed_activations=True, int32_bias=False,
    branch_precision="fp16", default_observer="mse", integer_kernels=False,
    check_description=("ONNX Runtime CPU, QDQ fusion off, each Conv/Gemm rewritten to TensorRT's INT8 arithmetic "
                       "(exact accumulator x float32 s_x*s_w + float bias)"),
    execution_providers=(ExecutionProviderPath("CUDAExecutionProvider", "ort-cuda[trt]"),
                         ExecutionProviderPath("TensorrtExecutionProvider", "ort-trt-ep[trt]")),
    tensorrt_engine=True,
)
