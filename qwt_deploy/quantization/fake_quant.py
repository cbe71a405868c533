"""Quantizer arithmetic, written to match ONNX QuantizeLinear/DequantizeLinear.

QuantizeLinear computes ``saturate(round(x / scale) + zero_point)`` with round-half-to-even;
``torch.round`` rounds half to even too, and we divide (not multiply by a reciprocal) so the
simulation rounds the way the backend does. Scales are float32 throughout, as in the graph.

Bit widths below 8 are emulated inside INT8 containers: weights simply use a narrower
integer range; activations clamp to ``[0, 2**bits - 1]`` before a uint8 QuantizeLinear
(the exporter writes that clamp as a Clip node).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor activation quantizer: asymmetric in a uint8 container (ONNX Runtime layout),
    or symmetric with zero point 0 in an int8 container (``signed``, TensorRT layout)."""

    scale: float  # exactly representable in float32
    zero_point: int
    bits: int
    signed: bool = False  # True: symmetric int8 container, zero point 0 (TensorRT layout)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes, held in a float tensor (exact: |code| < 2**24)."""
        s = torch.tensor(self.scale, dtype=torch.float32)
        return torch.div(x, s).round_().add_(self.zero_point).clamp_(self.qmin, self.qmax)

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero_point) * torch.tensor(self.scale, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = self.codes(x)
        return q.sub_(self.zero_point).mul_(torch.tensor(self.scale, dtype=torch.float32))

    @property
    def lo(self) -> float:
        return float(np.float32((self.qmin - self.zero_point) * np.float32(self.scale)))

    @property
    def hi(self) -> float:
        return float(np.float32((self.qmax - self.zero_point) * np.float32(self.scale)))


def act_quant_from_range(lo: float, hi: float, bits: int) -> ActQuant:
    """Asymmetric parameters covering [lo, hi] (widened to include 0, so 0 is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = (1 << bits) - 1
    if hi - lo <= 1e-12:
        return ActQuant(scale=float(np.float32(1.0)), zero_point=0, bits=bits)
    scale = float(np.float32((hi - lo) / qmax))
    zp = int(np.clip(np.round(-lo / scale), 0, qmax))
    return ActQuant(scale=scale, zero_point=zp, bits=bits)


def symmetric_act_quant(q: ActQuant) -> ActQuant:
    """The signed symmetric quantizer (zero point 0) covering the range ``q`` covers.

    TensorRT accepts only zero point 0, so its layout turns whatever range an observer chose
    into ``scale = max(|lo|, |hi|) / (2**(bits-1) - 1)``; codes use [-2**(bits-1), 2**(bits-1)-1]
    (TensorRT clamps INT8 to [-128, 127]).
    """
    absmax = max(abs(q.lo), abs(q.hi))
    qmax = (1 << (q.bits - 1)) - 1
    scale = float(np.float32(absmax / qmax)) if absmax > 1e-12 else float(np.float32(1.0))
    return ActQuant(scale=scale, zero_point=0, bits=q.bits, signed=True)


@dataclass
class WeightQuant:
    """Per-output-channel symmetric weights, narrow range [-(2^(b-1)-1), 2^(b-1)-1]."""

    q: torch.Tensor  # int8 codes, same shape as the weight
    scale: torch.Tensor  # float32 [C_out]
    bits: int

    def dequant(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.q.dim() - 1)
        return self.q.float() * self.scale.reshape(shape)


def _quant_weight_with_absmax(w: torch.Tensor, absmax: torch.Tensor, bits: int) -> WeightQuant:
    qmax = (1 << (bits - 1)) - 1
    scale = (absmax / qmax).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channel: any scale works
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.reshape(shape)), -qmax, qmax).to(torch.int8)
    return WeightQuant(q=q, scale=scale, bits=bits)


def quantize_weight(w: torch.Tensor, bits: int, method: str = "minmax") -> WeightQuant:
    """Per-channel symmetric weight quantization.

    ``minmax`` uses max|w| per channel. ``mse`` searches a per-channel clipping ratio that
    minimizes the weight reconstruction error; it matters at 4-6 bits, where one outlier
    weight otherwise wastes most of the grid.
    """
    flat = w.detach().float().reshape(w.shape[0], -1)
    absmax = flat.abs().amax(dim=1)
    if method == "minmax":
        return _quant_weight_with_absmax(w.float(), absmax, bits)
    if method != "mse":
        raise ValueError(method)
    qmax = (1 << (bits - 1)) - 1
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for ratio in torch.linspace(0.3, 1.0, 71):
        a = absmax * ratio
        s = torch.where(a > 0, a / qmax, torch.ones_like(a)).unsqueeze(1)
        err = ((torch.clamp(torch.round(flat / s), -qmax, qmax) * s - flat) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, a, best)
    return _quant_weight_with_absmax(w.float(), best, bits)


def quantize_bias_int32(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """INT32 bias codes with scale ``s_x * s_w[c]`` (what QLinearConv/QGemm expect)."""
    s = (torch.tensor(input_scale, dtype=torch.float32) * weight_scale.float())
    q = torch.round(bias.double() / s.double())
    return torch.clamp(q, -(2**31), 2**31 - 1).to(torch.int32)


def bias_scale(input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    return torch.tensor(input_scale, dtype=torch.float32) * weight_scale.float()


INT32_BIAS_HEADROOM = 2**28  # |bias code| stays below this; leaves room for the CWAC fold


def fit_weight_scale_to_int32_bias(
    wq: WeightQuant, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float
) -> WeightQuant:
    """Raise a channel's weight scale until its bias fits in INT32 with headroom.

    A BatchNorm-folded channel can have ~zero weights but a large bias. Its max|w| scale is
    then tiny, ``bias / (s_x * s_w)`` overflows INT32, and clamping silently destroys the
    bias. ONNX Runtime's quantizer adjusts the weight scale the same way. The weights of such
    a channel are ~0, so the coarser grid costs nothing.
    """
    if bias is None:
        return wq
    need = (bias.double().abs() / (input_scale * INT32_BIAS_HEADROOM)).float()
    bad = wq.scale < need
    if not bool(bad.any()):
        return wq
    qmax = (1 << (wq.bits - 1)) - 1
    scale = torch.where(bad, need, wq.scale)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.float() / scale.reshape(shape)), -qmax, qmax).to(torch.int8)
    return WeightQuant(q=q, scale=scale, bits=wq.bits)
