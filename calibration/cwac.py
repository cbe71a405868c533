"""Closed-form compensation of a quantized layer's output, per output channel.

QwT-v2's channel-wise affine compensation (CWAC) fits, for each output channel c,

    y_fp[c] ~= alpha[c] * y_q[c] + beta[c]

by least squares over every calibration sample and spatial position (or token). Each
channel is an independent 1-D regression, so the solution only needs per-channel sums:

    alpha = (cov(y_q, y_fp) + lam) / (var(y_q) + lam)      beta = mean(y_fp) - alpha * mean(y_q)

``lam = ridge * mean_c var(y_q)`` pulls alpha towards 1 with a strength set relative to the
layer's typical variance: a channel whose output barely varies (dead or constant channel)
falls back to alpha = 1 (pure bias correction) instead of dividing by ~0.

Bias correction (AIMET, Brevitas) is the same fit with alpha fixed at 1.

Sums are accumulated streaming over batches in float64, on data shifted by a per-channel
offset taken from the first batch (so E[y^2] - E[y]^2 does not cancel catastrophically).
Within one batch the reduction runs in float32 (torch's pairwise summation; a float64
reduction over NCHW is ~20x slower and dominated calibration time); the per-batch partial
sums are added in float64. Nothing but 6 vectors of length C is kept per layer.
"""

from __future__ import annotations

import numpy as np
import torch

from qwt_deploy.quantization.compensation import AffineFit
from qwt_deploy.quantization.simulate import apply_affine


class ChannelStats:
    """Streaming first and second moments of (y_q, y_fp), per channel."""

    def __init__(self, channel_dim: int = 1):
        self.channel_dim = channel_dim
        self.n = 0
        self.shift_q = self.shift_f = None
        self.sq = self.sf = self.sqq = self.sqf = self.sff = None

    def update(self, y_q: torch.Tensor, y_fp: torch.Tensor) -> None:
        cd = self.channel_dim % y_q.dim()
        dims = tuple(d for d in range(y_q.dim()) if d != cd)
        shape = [1] * y_q.dim()
        shape[cd] = -1
        if self.shift_q is None:
            self.shift_q = y_q.mean(dim=dims).detach()
            self.shift_f = y_fp.mean(dim=dims).detach()
            c = self.shift_q.numel()
            self.sq, self.sf, self.sqq, self.sqf, self.sff = (torch.zeros(c, dtype=torch.float64) for _ in range(5))
        a = y_q - self.shift_q.reshape(shape)
        b = y_fp - self.shift_f.reshape(shape)
        buf = torch.empty_like(a)
        self.sq += a.sum(dim=dims).double()
        self.sf += b.sum(dim=dims).double()
        self.sqq += torch.mul(a, a, out=buf).sum(dim=dims).double()
        self.sqf += torch.mul(a, b, out=buf).sum(dim=dims).double()
        self.sff += torch.mul(b, b, out=buf).sum(dim=dims).double()
        self.n += y_q.numel() // self.shift_q.numel()

    def moments(self):
        n = float(self.n)
        mq, mf = self.sq / n, self.sf / n
        var_q = self.sqq / n - mq * mq
        cov = self.sqf / n - mq * mf
        var_f = self.sff / n - mf * mf
        return (mq + self.shift_q.double(), mf + self.shift_f.double(),
                var_q.clamp_min(0), cov, var_f.clamp_min(0))


def _mse(alpha, beta, mq, mf, var_q, cov, var_f):
    # E[(y_f - a y_q - b)^2] from the centered moments
    d = mf - alpha * mq - beta
    return var_f - 2 * alpha * cov + alpha * alpha * var_q + d * d


def fit_affine(stats: ChannelStats, ridge: float, fix_alpha: bool = False) -> AffineFit:
    """Solve CWAC (or bias correction if ``fix_alpha``) from accumulated moments."""
    mq, mf, var_q, cov, var_f = stats.moments()
    if fix_alpha:
        alpha = torch.ones_like(mq)
    else:
        lam = ridge * float(var_q.mean()) if var_q.numel() else 0.0
        alpha = torch.where(var_q + lam > 0, (cov + lam) / (var_q + lam + 1e-300), torch.ones_like(mq))
    beta = mf - alpha * mq
    before = _mse(torch.ones_like(mq), torch.zeros_like(mq), mq, mf, var_q, cov, var_f)
    after = _mse(alpha, beta, mq, mf, var_q, cov, var_f)
    return AffineFit(
        alpha=alpha.numpy().astype(np.float32),
        beta=beta.numpy().astype(np.float32),
        mse_before=float(before.clamp_min(0).mean()),
        mse_after=float(after.clamp_min(0).mean()),
        var_fp=float(var_f.mean()),
    )


class ChannelAffineCompensation:
    """QwT-v2 CWAC as a calibration algorithm: collect :meth:`statistics` of (y_q, y_fp) per
    output channel, :meth:`solve` the closed form, :meth:`apply` ``alpha * y + beta``.
    :func:`qwt_deploy.calibration.sequential.calibrate` dispatches these three steps per
    weighted layer; the fit is folded into the layer's weight scale and bias at export."""

    fix_alpha = False  # bias correction: see qwt_deploy.calibration.bias_correction

    def __init__(self, ridge: float = 1e-3):
        self.ridge = ridge

    def statistics(self, channel_dim: int) -> ChannelStats:
        return ChannelStats(channel_dim)

    def solve(self, stats: ChannelStats) -> AffineFit:
        return fit_affine(stats, self.ridge, fix_alpha=self.fix_alpha)

    @staticmethod
    def apply(y: torch.Tensor, fit: AffineFit, channel_dim: int = 1, shift=None) -> torch.Tensor:
        """``alpha * y + beta`` per channel (``shift`` replaces beta when given)."""
        return apply_affine(y, fit, channel_dim, shift)
