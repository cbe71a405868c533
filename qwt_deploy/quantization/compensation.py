"""What compensation hands to the quantized model, as the simulation and the exporter read it.

The solvers live one layer up, in :mod:`qwt_deploy.calibration`; these are their results:

- :class:`AffineFit`: QwT-v2 CWAC (or bias correction), ``y_fp ~= alpha * y_q + beta`` per
  output channel of one weighted layer;
- :class:`BlockBranch`: a QwT (v1) linear branch added to a block output (implemented by
  :class:`qwt_deploy.calibration.qwt_branch.BranchFit`).

They are defined here, below the solvers, so that ``quantize`` never imports ``calibration``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class AffineFit:
    alpha: np.ndarray  # float32 [C]
    beta: np.ndarray  # float32 [C]
    mse_before: float  # mean over channels of E[(y_fp - y_q)^2]
    mse_after: float  # same after compensation
    var_fp: float  # mean over channels of Var(y_fp), for SQNR-style normalization

    @property
    def error_reduction(self) -> float:
        return 1.0 - self.mse_after / self.mse_before if self.mse_before > 0 else 0.0


class BlockBranch(Protocol):
    """A fitted QwT (v1) branch: ``apply(x, y) = y + W·x + b`` in the deployed precision."""

    kind: str  # "conv" | "linear"
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    groups: int
    kept: bool
    precision: str  # "fp32" | "fp16"

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
