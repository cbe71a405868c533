"""Activation range observers: min-max, percentile and MSE.

All three stream over calibration batches. Percentile and MSE work on a 2048-bin histogram
over the observed [min, max], built in a second pass, so memory does not grow with the
calibration set and results are deterministic.
"""

from __future__ import annotations

from typing import Iterable

import torch

from qwt_deploy.quantization.fake_quant import ActQuant, act_quant_from_range

BINS = 2048


def _minmax(batches: Iterable[torch.Tensor]) -> tuple[float, float]:
    lo, hi = float("inf"), float("-inf")
    for b in batches:
        mn, mx = torch.aminmax(b)
        lo, hi = min(lo, float(mn)), max(hi, float(mx))
    if not (torch.isfinite(torch.tensor([lo, hi])).all()):
        from qwt_deploy.errors import QwtError

        raise QwtError("an activation became NaN or Inf during calibration",
                       "check the calibration data's preprocessing (range, dtype) and the model's numerics")
    return lo, hi


def _histogram(batches, lo: float, hi: float) -> torch.Tensor:
    h = torch.zeros(BINS, dtype=torch.float64)
    for b in batches:
        h += torch.histc(b.float(), BINS, lo, hi).double()
    return h


def observe(batches: list[torch.Tensor], method: str, bits: int, percentile: float = 99.99) -> ActQuant:
    """Quantizer parameters for a tensor seen as a list of calibration batches."""
    lo, hi = _minmax(batches)
    if method == "minmax" or hi - lo <= 1e-12:
        return act_quant_from_range(lo, hi, bits)
    hist = _histogram(batches, lo, hi)
    width = (hi - lo) / BINS
    if method == "percentile":
        cdf = torch.cumsum(hist, 0) / hist.sum()
        tail = (100.0 - percentile) / 100.0
        i_lo = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        i_hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        p_lo = lo + i_lo * width if lo < 0 else lo
        p_hi = lo + (i_hi + 1) * width
        return act_quant_from_range(max(p_lo, lo), min(p_hi, hi), bits)
    if method == "mse":
        return _mse_search(hist, lo, hi, bits)
    raise ValueError(f"unknown calibration method {method!r}")


def _mse_search(hist: torch.Tensor, lo: float, hi: float, bits: int) -> ActQuant:
    """Shrink [lo, hi] by a common factor; keep the range whose quantization MSE is lowest."""
    centers = torch.linspace(lo, hi, BINS + 1, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    best, best_err = None, float("inf")
    for t in torch.linspace(0.2, 1.0, 81, dtype=torch.float64):
        q = act_quant_from_range(lo * float(t), hi * float(t), bits)
        s = q.scale
        codes = torch.clamp(torch.round(centers / s) + q.zero_point, q.qmin, q.qmax)
        err = float((hist * (centers - (codes - q.zero_point) * s) ** 2).sum())
        if err < best_err:
            best, best_err = q, err
    return best
