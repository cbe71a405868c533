"""Step 5 of the pipeline: ONNX graph passes on onnx-graphsurgeon.

Each pass is a pure *selector* (does this node group match?) and an *action* (the
rewrite), ends with ``graph.cleanup().toposort()``, and states its preconditions.
"""

from .check_trt_rules import Finding, check_trt_rules, format_findings
from .emulate_fp16_in_fp32 import emulate_fp16_in_fp32
from .fold_cwac_into_weight_scales import fold_cwac_into_weight_scales
from .pad_conv_input_channels import pad_conv_input_channels
from .rewrite_layers_as_integer_accumulators import rewrite_layers_as_integer_accumulators

__all__ = ["fold_cwac_into_weight_scales", "check_trt_rules", "format_findings", "Finding",
           "rewrite_layers_as_integer_accumulators", "emulate_fp16_in_fp32", "pad_conv_input_channels"]
