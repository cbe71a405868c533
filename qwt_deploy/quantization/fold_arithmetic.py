"""The arithmetic of folding CWAC into a layer's weight scale and bias, in one place.

``qwt_deploy.graph_passes.fold_cwac_into_weight_scales`` applies it to the ONNX graph, and the PyTorch
simulation applies it to its own copy of the layer. Both must produce the *same numbers*:
folding re-rounds the bias to INT32 at the new scale ``s_x * |alpha| * s_w``, and that
rounding alone flips ~0.1-0.4% of a layer's output codes against a simulation that applies
``alpha * y + beta`` in float after the layer (measured on EfficientNet-Lite0). Through 50
layers those flips compound. Sharing this module makes the simulation compute exactly what
the deployed (folded) graph computes, so CWAC is fitted, and checked, against it.

Rules (why they exist):
- ``alpha < 0`` would make a negative DequantizeLinear scale, which the ONNX spec and
  TensorRT reject: negate that channel's INT8 codes and use ``|alpha|``.
- ``alpha == 0`` (a dead channel) would make a zero scale: zero the codes, keep the old
  scale, and let the bias carry the constant ``beta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

DEAD_ALPHA = 1e-12


@dataclass
class FoldedLayer:
    codes: np.ndarray  # int8, same shape as the weight
    scale: np.ndarray  # float32 [C_out], > 0
    bias: np.ndarray  # float64 [C_out]: alpha * b + beta, before any INT32 rounding


def fold_affine(codes: np.ndarray, scale: np.ndarray, bias: Optional[np.ndarray],
                alpha: np.ndarray, beta: np.ndarray, axis: int = 0) -> FoldedLayer:
    """``alpha * layer(x) + beta`` as one layer with new codes, scale and float bias.

    ``axis`` is the output-channel axis of ``codes`` (0 for Conv and Gemm with transB).
    """
    alpha = np.asarray(alpha, np.float64).reshape(-1)
    beta = np.asarray(beta, np.float64).reshape(-1)
    shape = [1] * codes.ndim
    shape[axis] = -1
    sign = np.where(alpha < 0, -1, 1).astype(np.int16)
    dead = np.abs(alpha) < DEAD_ALPHA
    new_codes = (codes.astype(np.int16) * sign.reshape(shape)).astype(np.int8)
    new_codes = np.where(dead.reshape(shape), np.int8(0), new_codes).astype(np.int8)
    scale64 = np.asarray(scale, np.float64).reshape(-1)
    new_scale = np.where(dead, scale64, np.abs(alpha) * scale64).astype(np.float32)
    alpha_eff = np.where(dead, 0.0, alpha)
    new_bias = beta + (alpha_eff * np.asarray(bias, np.float64).reshape(-1) if bias is not None else 0.0)
    return FoldedLayer(new_codes, new_scale, np.asarray(new_bias, np.float64))


def int32_bias_codes(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INT32 codes and float32 scale ``s_x * s_w[c]`` of a folded bias (ONNX Runtime layout).

    Raises ValueError if a code overflows INT32 (the caller names the layer and the fix).
    """
    s_b = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    q = np.round(np.asarray(bias, np.float64) / s_b.astype(np.float64))
    if np.any(np.abs(q) > 2**31 - 1):
        raise ValueError("folded bias overflows INT32")
    return q.astype(np.int32), s_b


def deployed_bias(folded: FoldedLayer, input_scale: Optional[float], int32: bool) -> np.ndarray:
    """The bias values the deployed graph adds (float32), INT32-rounded or not."""
    if int32:
        q, s_b = int32_bias_codes(folded.bias, input_scale, folded.scale)
        return (q.astype(np.float64) * s_b.astype(np.float64)).astype(np.float32)
    return folded.bias.astype(np.float32)
