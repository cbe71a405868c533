"""Selector helpers the graph passes share: constant values, producers, optional inputs and the
INT8 weight DequantizeLinear lookup.

They only read the graph. Each pass's selector builds on them and adds its own preconditions
(axis, rank, readers), so a rule such as "zero point 0" means the same thing in every pass.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def const(t, *, build_time: bool = False) -> Optional[np.ndarray]:
    """The value of ``t`` if it is a constant, else None.

    By default only an initializer (``gs.Constant``) counts: the rewriting passes replace those
    tensors, so they must be initializers. ``build_time=True`` also follows what a parser folds
    at build time -- a ``Constant`` node and a ``Constant -> Cast`` chain -- as TensorRT does
    (check_trt_rules)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if not build_time or len(getattr(t, "inputs", [])) != 1:
        return None
    p = t.inputs[0]
    if p.op == "Constant" and "value" in p.attrs:
        v = p.attrs["value"]
        return np.asarray(v.values if isinstance(v, gs.Constant) else v)
    if p.op == "Cast" and p.inputs:
        v = const(p.inputs[0], build_time=True)
        if v is not None and "to" in p.attrs:
            return v.astype(onnx.helper.tensor_dtype_to_np_dtype(int(p.attrs["to"])))
    return None


def producer(t, op: Optional[str] = None) -> Optional[gs.Node]:
    """The one node that produces ``t`` (and is an ``op``, if given), else None."""
    inputs = getattr(t, "inputs", [])
    if len(inputs) != 1 or (op is not None and inputs[0].op != op):
        return None
    return inputs[0]


def optional_input(node: gs.Node, i: int) -> Optional[gs.Tensor]:
    """Input ``i`` of ``node``, or None if it is absent or omitted (an empty name)."""
    if len(node.inputs) <= i:
        return None
    t = node.inputs[i]
    return None if isinstance(t, gs.Variable) and not t.name else t


def zero_point_is_zero(dq: gs.Node) -> bool:
    """A Quantize/DequantizeLinear whose zero point is absent, omitted or a constant all 0."""
    zp = optional_input(dq, 2)
    if zp is None:
        return True
    v = const(zp)
    return v is not None and not np.any(v)


class WeightDQ(NamedTuple):
    dq: gs.Node  # the DequantizeLinear
    codes: np.ndarray  # its constant INT8 input
    scale: np.ndarray  # its constant scale


def int8_weight_dq(layer: gs.Node, index: int = 1) -> Optional[WeightDQ]:
    """Input ``index`` of ``layer`` (its weight) if it is DequantizeLinear(constant INT8 codes,
    constant scale, zero point 0), else None. Axis, rank and reader count are the caller's
    preconditions."""
    if len(layer.inputs) <= index:
        return None
    dq = producer(layer.inputs[index], "DequantizeLinear")
    if dq is None or len(dq.inputs) < 2:
        return None
    codes, scale = const(dq.inputs[0]), const(dq.inputs[1])
    if codes is None or scale is None or codes.dtype != np.int8 or not zero_point_is_zero(dq):
        return None
    return WeightDQ(dq, codes, scale)
