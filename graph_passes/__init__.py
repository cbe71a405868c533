"""Step 5 of the pipeline: ONNX graph passes on onnx-graphsurgeon.

Each pass is a pure *selector* (does this node group match?) and an *action* (the
rewrite), ends with ``graph.cleanup().toposort()``, and states its preconditions.
"""

from .fold_cwac_into_weight_scales import fold_cwac_into_weight_scales

__all__ = ["fold_cwac_into_weight_scales"]
