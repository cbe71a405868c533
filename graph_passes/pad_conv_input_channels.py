"""Pad the input channels of quantized Convs to a multiple of 4 (ONNX Runtime layout only).

Why: ONNX Runtime fuses DequantizeLinear(uint8) -> Conv(DequantizeLinear(INT8 weights)) ->
QuantizeLinear into QLinearConv, and MLAS runs it with its fast symmetric indirect-conv kernel
(MlasConvSym, requantization fused) only when the input-channel count is a multiple of 4. An
image stem with 3 channels falls back to NHWC im2col (27-byte rows) + generic QGEMM + a separate
requantize pass, slower than the FP32 stem; measured in bench/bench_lite0_batch1.py (variant
``stem_pad4``): padding Lite0's stem to 4 channels gives bit-identical logits and makes the whole
batch-1 INT8 model ~5% faster.

Why this is exact: the padded input channel holds the activation's zero point, which
dequantizes to exactly 0, and its INT8 weights are 0 as well, so every product it adds to the
integer accumulator is 0 -- the accumulator, the requantized output and the INT32 bias (scale
s_x * s_w, unchanged) are the same integers as before. The PyTorch simulation needs no change.

Only run for ``--target ort`` (pipeline.export_folded): the speed-up is a property of ONNX
Runtime's CPU kernels, and the TensorRT layout (symmetric INT8 activations, no uint8 tensor)
never matches the selector anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .helpers import const, int8_weight_dq, optional_input, producer
from .scaffold import apply_all, run_pass

CHANNEL_MULTIPLE = 4  # MLAS MlasConvSym's requirement on input channels


@dataclass
class _Match:
    conv: gs.Node
    weight_dq: gs.Node  # DequantizeLinear(INT8 constant [O, C, kh, kw], per-channel scale, zero point 0)
    input_dq: gs.Node  # DequantizeLinear(uint8 tensor, per-tensor scale, uint8 zero point)
    channels: int  # C, not a multiple of CHANNEL_MULTIPLE


def select_unaligned_qconv(conv: gs.Node) -> Optional[_Match]:
    """Selector. Preconditions, all required (the QDQ unit ORT fuses into QLinearConv):

    - ``conv`` is a Conv with group 1;
    - its weight is DequantizeLinear(INT8 constant of rank >= 3, per-channel scale on axis 0 or
      one per-tensor scale, zero points all 0), and that DequantizeLinear has no other reader (its
      codes get padded);
    - its input is DequantizeLinear of a uint8 tensor with a constant per-tensor scale and a
      constant (or absent, i.e. 0) uint8 zero point;
    - the weight's input-channel count is not a multiple of 4.
    """
    if conv.op != "Conv" or conv.attrs.get("group", 1) != 1 or len(conv.inputs) < 2:
        return None
    found = int8_weight_dq(conv)
    if found is None or len(found.dq.outputs[0].outputs) != 1 or found.codes.ndim < 3:
        return None
    wdq, codes, scale = found
    if scale.size != 1 and (scale.ndim != 1 or wdq.attrs.get("axis", 1) % codes.ndim != 0):
        return None
    channels = codes.shape[1]
    if channels % CHANNEL_MULTIPLE == 0:
        return None
    xdq = producer(conv.inputs[0], "DequantizeLinear")
    if xdq is None:
        return None
    xscale = const(xdq.inputs[1])
    if xscale is None or xscale.size != 1:
        return None
    if optional_input(xdq, 2) is not None:  # DequantizeLinear: x has the zero point's type
        xzp = const(xdq.inputs[2])
        if xzp is None or xzp.dtype != np.uint8 or xzp.size != 1:
            return None
    elif xdq.inputs[0].dtype != np.uint8:
        return None
    return _Match(conv, wdq, xdq, channels)


def _padded_shape(shape, axis: int, extra: int):
    if shape is None:
        return None
    shape = list(shape)
    if isinstance(shape[axis], int):
        shape[axis] += extra
    return shape


def pad_match(graph: gs.Graph, m: _Match) -> None:
    """Action: zero INT8 weight channels up to a multiple of 4, and Pad(mode=constant, value = the
    input's zero point) on axis 1 of the uint8 input, between its producer and the input's
    DequantizeLinear, read through a clone of that DequantizeLinear."""
    codes = m.weight_dq.inputs[0].values
    extra = -m.channels % CHANNEL_MULTIPLE
    widths = [(0, 0)] * codes.ndim
    widths[1] = (0, extra)
    name = m.weight_dq.inputs[0].name
    m.weight_dq.inputs[0] = gs.Constant(f"{name}_padded", np.pad(codes, widths))  # pads with 0
    m.weight_dq.outputs[0].shape = _padded_shape(m.weight_dq.outputs[0].shape, 1, extra)

    xdq = m.input_dq
    x = xdq.inputs[0]
    base = m.conv.name or name
    zero_point = optional_input(xdq, 2)
    if zero_point is None:
        zero_point = gs.Constant(f"{base}.input_pad/zero_point", np.array(0, np.uint8))
    pads = np.zeros(2 * codes.ndim, np.int64)
    pads[codes.ndim + 1] = extra  # end of axis 1 only: [x1_begin, ..., xn_begin, x1_end, ..., xn_end]
    padded = gs.Variable(f"{base}.input_pad:0", dtype=np.uint8, shape=_padded_shape(x.shape, 1, extra))
    graph.nodes.append(gs.Node("Pad", name=f"{base}.input_pad", attrs={"mode": "constant"},
                               inputs=[x, gs.Constant(f"{base}.input_pad/pads", pads), zero_point],
                               outputs=[padded]))
    # A new DequantizeLinear reads the padded tensor: the old one keeps its other readers (if
    # any; cleanup drops it otherwise), and its output name, which tools such as qwt-check map to
    # the unpadded IR value, never names a tensor of another shape.
    old = xdq.outputs[0]
    out = gs.Variable(f"{base}.input_pad/dequantized", dtype=old.dtype, shape=_padded_shape(old.shape, 1, extra))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{base}.input_pad/DequantizeLinear",
                               attrs=dict(xdq.attrs), inputs=[padded] + list(xdq.inputs[1:]), outputs=[out]))
    m.conv.inputs[0] = out


# Pass pad_conv_input_channels:
#   selector select_unaligned_qconv: Conv(group 1) of DQ(uint8 x, per-tensor scale) and
#     DQ(INT8 W, zp 0, read only by this Conv) whose input-channel count is not a multiple of 4;
#   action pad_match: zero INT8 weight channels up to the multiple, Pad(x, its zero point) on
#     axis 1 read through a new DequantizeLinear.
# Preconditions: ONNX Runtime layout (uint8 activations); exact because the padded channel
# dequantizes to 0 and its weights are 0.
def pad_conv_input_channels(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Pad every matching Conv; returns the new model and how many Convs were padded."""
    return run_pass(model, lambda graph: len(apply_all(graph, select_unaligned_qconv, pad_match)))
