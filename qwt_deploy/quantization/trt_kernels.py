"""How TensorRT computes a quantized Conv/Gemm, emulated for the simulation of ``--target trt``.

TensorRT fuses DQ(x) -> Conv(DQ(W)) -> bias into one INT8 kernel: it accumulates
``sum(q_x * q_w)`` exactly in INT32, then scales the accumulator by ``s_x * s_w[c]`` and adds
the float bias. A QDQ-semantics float simulation (a float32 convolution of the dequantized
values) differs from that by float rounding in the accumulation, which moves ~1e-5 of each
layer's values across a rounding boundary of the next quantizer; through EfficientNet-Lite0's
50 layers those one-step flips compound until only ~80% of the logits stay within one step
of another float implementation (ONNX Runtime's), measured.

So the simulation computes the exact accumulator (a float32 convolution of integer-valued
tensors: exact while partial sums stay below 2**24, i.e. always for INT8 layers of this
size in practice), times the float32 product ``float32(s_x) * s_w[c]``, plus the float bias:
two float32 roundings, in that order. ``qwt_deploy.graph_passes.rewrite_layers_as_integer_accumulators``
gives ONNX Runtime the same arithmetic for the check, so the two agree bit for bit up to the
rare accumulator overflow of 2**24 and the float pooling ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .fake_quant import ActQuant


@dataclass
class AccumulatorLayer:
    """One TensorRT INT8 layer: INT8 weight codes, the per-channel float32 accumulator scale
    ``float32(s_x) * s_w[c]`` and the float bias."""

    codes: torch.Tensor  # float32 holding the INT8 weight codes
    scale: torch.Tensor  # float32 [C_out]
    bias: Optional[torch.Tensor]  # float32 [C_out]
    x: ActQuant

    @classmethod
    def build(cls, codes: np.ndarray, weight_scale: np.ndarray, bias: Optional[np.ndarray], x: ActQuant):
        scale = np.float32(x.scale) * np.asarray(weight_scale, np.float32)
        return cls(torch.from_numpy(codes.astype(np.float32)), torch.from_numpy(scale.astype(np.float32)),
                   None if bias is None else torch.from_numpy(np.asarray(bias, np.float32)), x)

    def __call__(self, linear_op, x_dequantized: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``linear_op(x, w)`` is the layer without bias (conv or linear)."""
        xq = torch.div(x_dequantized, torch.tensor(self.x.scale, dtype=torch.float32)).round_()
        acc = linear_op(xq, self.codes)
        shape = [1] * acc.dim()
        shape[channel_dim % acc.dim()] = -1
        y = acc.mul_(self.scale.reshape(shape))
        return y if self.bias is None else y.add_(self.bias.reshape(shape))
