"""Bit-faithful emulation of ONNX Runtime's integer requantization (QLinearConv, QGemm).

Why: ORT fuses "DQ -> Conv -> Q" into QLinearConv, which accumulates ``(x - zp_x) * w``
exactly in INT32, adds the INT32 bias, and requantizes with one float32 multiplier per
channel::

    y = saturate(rint(float32(acc + b) * float32(s_x * s_w[c] / s_y)) + zp_y)

A QDQ-semantics simulation (float conv of dequantized values, then divide by ``s_y`` and
round) agrees except at rounding ties: ~1e-5 of each layer's codes flip. That is harmless
for one layer, but through EfficientNet-Lite0's 50 layers the flips compound until only
~93% of the logits stay within one output step of ORT (measured). Computing the same
integer accumulator and the same float32 multiplier brings that to 100%.

The accumulator is computed as a float32 convolution of integer-valued tensors, which is
exact while partial sums stay below 2**24 (|x - zp| <= 255, |w| <= 127: typical sums are
orders of magnitude smaller); ORT itself converts ``acc + b`` to float32 before scaling, and the
simulation forms that sum exactly (float64) before the one float32 rounding.

Residual Adds: ORT fuses "DQ, DQ -> Add -> Q" into QLinearAdd, which never dequantizes: it
maps the uint8 codes straight to the output grid with two float32 ratios and two FMAs (see
``qlinear_add``). Adding the dequantized values and dividing by ``s_y`` rounds differently in
~5e-5 of the codes near ties (EfficientNet-Lite1's _blocks.5 Add, measured); through the
following layers that took Lite1 to ~95% of the logits within one step of ORT.

Preconditions for a node to run on this path (otherwise ORT keeps it in float and so does
the simulation): the ONNX Runtime layout (uint8 activations, INT32 bias); a weighted op
whose input and output both carry 8-bit quantizers; no activation left between the op and
its QuantizeLinear (a fused ReLU/Clip must be made redundant by Q's saturation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .fake_quant import ActQuant


def made_redundant_by_q(act, q: Optional[ActQuant]) -> bool:
    """True when QuantizeLinear's saturation already performs this ReLU/Clip exactly.

    Q saturates to [qmin, qmax]; if the clip bounds map outside that range (same rint test
    as ONNX Runtime's IsClipMadeRedundantByQ), Q(clip(x)) == Q(x) for every x. Dropping
    the node keeps the graph a plain DQ -> Conv -> Q unit, which ORT fuses into
    QLinearConv; with the Clip left in, ORT fuses Conv+Clip into a float FusedConv first.
    """
    if q is None:
        return False
    lo_ok = act.lo is None or round(act.lo / q.scale) + q.zero_point <= q.qmin
    hi_ok = act.hi is None or round(act.hi / q.scale) + q.zero_point >= q.qmax
    return lo_ok and hi_ok


@dataclass
class IntegerLayer:
    """One fused integer kernel: INT8 codes, INT32 bias and the requantization multiplier."""

    codes: torch.Tensor  # float32 holding the INT8 weight codes
    bias: Optional[torch.Tensor]  # float64 holding the INT32 bias codes (exactly: they reach 2**28)
    multiplier: torch.Tensor  # float32 [C_out]: float32(s_x * s_w[c]) / s_y, as ORT computes it
    x: ActQuant
    y: ActQuant

    @classmethod
    def build(cls, codes: np.ndarray, scale: np.ndarray, bias_codes: Optional[np.ndarray],
              x: ActQuant, y: ActQuant) -> "IntegerLayer":
        m = (np.float32(x.scale) * np.asarray(scale, np.float32)) / np.float32(y.scale)
        return cls(torch.from_numpy(codes.astype(np.float32)),
                   None if bias_codes is None else torch.from_numpy(bias_codes.astype(np.float64)),
                   torch.from_numpy(m.astype(np.float32)), x, y)

    def __call__(self, linear_op, x_dequantized: torch.Tensor) -> torch.Tensor:
        """``linear_op(x, w)`` is the op's own forward (conv or linear) without bias."""
        s_x = torch.tensor(self.x.scale, dtype=torch.float32)
        x_centered = torch.round(x_dequantized / s_x)  # (x - zp_x) exactly: x is k * s_x
        acc = linear_op(x_centered, self.codes)
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        if self.bias is not None:
            # ORT adds the bias in INT32 and converts the sum to float32 once. Bias codes above
            # 2**24 (INT32_BIAS_HEADROOM allows 2**28: CWAC folds on near-dead channels) are not
            # float32s, and float32(acc) + float32(b) rounds twice (measured on a 2**27 + 20 bias:
            # code 100 where ORT gives 101); in float64 the sum is exact, then rounded once.
            acc = (acc.double() + self.bias.reshape(shape)).float()
        q = torch.round(acc * self.multiplier.reshape(shape)).add_(self.y.zero_point)
        q = q.clamp_(self.y.qmin, self.y.qmax)
        return q.sub_(self.y.zero_point).mul_(torch.tensor(self.y.scale, dtype=torch.float32))


def integer_matmul(a: torch.Tensor, b: torch.Tensor, qa: ActQuant, qb: ActQuant) -> torch.Tensor:
    """An activation x activation MatMul (attention's Q.K^T, P.V) as ONNX Runtime's
    MatMulIntegerToFloat computes it: the exact integer product of the centred codes, converted
    to float32, times ``float32(s_a * s_b)``. A float MatMul of the dequantized values rounds
    differently in ~85% of elements (by ~1 ulp); the next quantizer turns a few of those into
    one-step flips that BERT's attention amplifies. float64 keeps the accumulator exact for any
    sequence length (ORT's is INT32)."""
    ca = torch.round(a.double() / qa.scale)  # (code - zero point): a is exactly k * s_a
    cb = torch.round(b.double() / qb.scale)
    return torch.matmul(ca, cb).float() * (np.float32(qa.scale) * np.float32(qb.scale))


def qlinear_add(a: torch.Tensor, b: torch.Tensor, qa: ActQuant, qb: ActQuant, qc: ActQuant) -> torch.Tensor:
    """``Q(DQ(a) + DQ(b))`` as ONNX Runtime's QLinearAdd computes it on x86 (MLAS
    ``MlasQLinearAddKernelAvx2Helper``, intrinsics/avx2/qladd_avx2.cpp; ORT 1.32), for inputs of
    the same shape. On the raw codes ``A``, ``B`` (zero points not subtracted)::

        rA = float32(s_a / s_c);  rB = float32(s_b / s_c)
        fixed = float32(zp_c) - fma(rA, zp_a, float32(rB * zp_b))   # GCC contracts this to an FMA
        C = saturate(rint(fma(A, rA, fma(B, rB, fixed))))

    Each FMA rounds once: the product of an 8-bit integer and a float32 is exact in float64, and
    so is its sum with a float32 of similar magnitude, so the float64 result cast to float32 is
    the FMA's. The fixed part's FMA (rather than a product and a sum) is what ORT 1.32's build
    computes: checked against ORT on all 65536 code pairs x 300 random scale/zero-point draws
    (0 mismatches; the unfused fixed part 32, QDQ float arithmetic 90). Returns the dequantized
    output, as the QuantizeLinear after it leaves it."""
    f32 = np.float32
    sc = f32(qc.scale)
    ra, rb = f32(f32(qa.scale) / sc), f32(f32(qb.scale) / sc)
    fixed = f32(f32(qc.zero_point) - f32(np.float64(ra) * qa.zero_point + np.float64(f32(rb * f32(qb.zero_point)))))
    ca = torch.round(a.double() / float(f32(qa.scale))) + qa.zero_point  # the codes: a is exactly k * s_a
    cb = torch.round(b.double() / float(f32(qb.scale))) + qb.zero_point
    t = (cb * float(rb) + float(fixed)).float()
    y = (ca * float(ra) + t.double()).float()
    q = torch.round(y).clamp_(qc.qmin, qc.qmax)
    return q.sub_(qc.zero_point).mul_(torch.tensor(qc.scale, dtype=torch.float32))


def qlinear_mul(a: torch.Tensor, b: torch.Tensor, qa: ActQuant, qb: ActQuant, qc: ActQuant) -> torch.Tensor:
    """``Q(DQ(a) * DQ(b))`` as ONNX Runtime's QLinearMul computes it on x86 (MLAS
    ``MlasQLinearMulVectorS16``, mlas/lib/qlmul.cpp): the exact integer product of the centred
    codes, times one float32 ratio, plus the output zero point, each step rounded to float32::

        ratio = float32(float32(s_a * s_b) / s_c)
        C = saturate(rint(float32(float32(float32(A - zp_a) * (B - zp_b)) * ratio) + zp_c))

    Multiplying the dequantized values and dividing by ``s_c`` disagrees at rounding ties
    (47 of 6.5M code pairs over 100 scale draws, measured; and fused-multiply-add arithmetic 26);
    this formula 0. On a YOLOv8 detector those ties were the first codes to differ from ORT
    (a SiLU's Mul), and the following Sigmoids amplified each one-code flip to 5 steps.
    Broadcasting follows torch's rules (ORT fuses broadcasting Muls too). Returns the
    dequantized output, as the QuantizeLinear after it leaves it."""
    f32 = np.float32
    ratio = float(f32(f32(f32(qa.scale) * f32(qb.scale)) / f32(qc.scale)))
    ca = torch.round(a / torch.tensor(qa.scale, dtype=torch.float32))  # (code - zero point): a is k * s_a
    cb = torch.round(b / torch.tensor(qb.scale, dtype=torch.float32))
    y = (ca * cb) * torch.tensor(ratio, dtype=torch.float32)  # |ca * cb| <= 65025: exact in float32
    q = torch.round(y.add_(float(qc.zero_point))).clamp_(qc.qmin, qc.qmax)
    return q.sub_(qc.zero_point).mul_(torch.tensor(qc.scale, dtype=torch.float32))


# MLAS's logistic: Eigen's rational approximation (``MlasLogisticConstants``, mlas/lib/logistic.cpp),
# evaluated with FMAs by the x86 kernels. Odd numerator over even denominator, on [-18, 18].
_LOGISTIC_ALPHA = np.array([4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                            8.51377133304701e-03, 2.48287947061529e-01], np.float32)  # alpha_9 .. alpha_1
_LOGISTIC_BETA = np.array([6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                           1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01], np.float32)


def _fma32(a: np.ndarray, b, c) -> np.ndarray:
    """float32 fused multiply-add: the product of two float32s is exact in float64, so one
    float64 add then one cast rounds as the FMA does (up to double-rounding ties, which never
    occurred on the table inputs checked against ORT)."""
    return (a.astype(np.float64) * np.float64(b) + np.float64(c)).astype(np.float32)


def mlas_logistic(x: np.ndarray) -> np.ndarray:
    """``MlasComputeLogistic`` in float32, as ONNX Runtime's x86 kernels evaluate it."""
    v = np.clip(x.astype(np.float32), np.float32(-18.0), np.float32(18.0))
    v2 = v * v
    p = _fma32(v2, _LOGISTIC_ALPHA[0], _LOGISTIC_ALPHA[1])
    for a in _LOGISTIC_ALPHA[2:]:
        p = _fma32(p, v2, a)
    p = p * v
    q = _fma32(v2, _LOGISTIC_BETA[0], _LOGISTIC_BETA[1])
    for b in _LOGISTIC_BETA[2:]:
        q = _fma32(q, v2, b)
    return (p / q + np.float32(0.5)).astype(np.float32)


def qlinear_sigmoid_table(qx: ActQuant, qy: ActQuant) -> torch.Tensor:
    """The 256-entry table ONNX Runtime's QLinearSigmoid looks codes up in (contrib
    ``QlinearBuildLookupTable``): each input code dequantized in float32, MLAS's logistic, then
    ``MlasQuantizeLinear`` (divide, clamp, round half to even). Returned as dequantized outputs,
    indexed by input code.

    Why not ``Q(torch.sigmoid(DQ(x)))``: the approximation differs from the exact logistic by a
    few ulp, which moves a handful of codes across a rounding tie (2 of 102,400 table entries
    over 400 random scale draws, measured); through the Mul of a SiLU those flips reached 6 output
    steps on a YOLOv8 detector. The table agrees with ORT's on every entry checked."""
    codes = np.arange(qx.qmin, qx.qmin + 256)
    x = (np.float32(qx.scale) * (codes - qx.zero_point).astype(np.float32)).astype(np.float32)
    y = (mlas_logistic(x) / np.float32(qy.scale)).astype(np.float32)
    q = np.clip(np.rint(y), qy.qmin - qy.zero_point, qy.qmax - qy.zero_point)
    return torch.from_numpy((q.astype(np.float32) * np.float32(qy.scale)).astype(np.float32))


def qlinear_sigmoid(x: torch.Tensor, table: torch.Tensor, qx: ActQuant) -> torch.Tensor:
    """QLinearSigmoid on the dequantized input ``x``: a lookup of its codes in ``table``
    (from ``qlinear_sigmoid_table``). Returns the dequantized output, as the Q after it leaves it."""
    s = torch.tensor(qx.scale, dtype=torch.float32)
    idx = torch.round(x / s).add_(qx.zero_point - qx.qmin).long()
    return table[idx]
