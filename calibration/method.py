"""The compensation method, parsed once from ``--method`` into a typed value.

A method is a per-layer compensation (none, bias correction, QwT-v2 CWAC) plus, optionally,
QwT (v1) block branches. ``Method.parse("qwt,qwt2")`` is the only place the string is read;
everything downstream asks ``method.layer`` and ``method.block_branches``. ``str(method)``
gives back the canonical spelling (written into the ONNX metadata and reports).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qwt_deploy.errors import QwtError


class LayerCompensation(enum.Enum):
    """What is fitted per quantized Conv/Gemm/MatMul output channel."""

    NONE = "none"  # plain PTQ
    BIAS_CORRECTION = "bias-correction"  # beta only, alpha fixed at 1 (AIMET, Brevitas)
    CWAC = "qwt2"  # QwT-v2 channel-wise affine compensation: alpha and beta


BLOCK_BRANCHES = "qwt"  # QwT (v1): one closed-form linear branch per residual block


@dataclass(frozen=True)
class Method:
    layer: LayerCompensation = LayerCompensation.CWAC
    block_branches: bool = False

    # the spellings --method accepts, in --help order
    CHOICES = ("none", "bias-correction", "qwt", "qwt2", "qwt,qwt2", "qwt,bias-correction")

    @classmethod
    def parse(cls, text: "str | Method") -> "Method":
        if isinstance(text, Method):
            return text
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        layers = [p for p in parts if p != BLOCK_BRANCHES]
        known = {c.value for c in LayerCompensation}
        bad = [p for p in layers if p not in known]
        if not parts or bad or len(layers) > 1 or parts.count(BLOCK_BRANCHES) > 1 \
                or (BLOCK_BRANCHES in parts and layers == ["none"]):
            raise QwtError(f"--method {text!r} is not a compensation method",
                           "use one of " + ", ".join(cls.CHOICES))
        layer = LayerCompensation(layers[0]) if layers else LayerCompensation.NONE
        return cls(layer=layer, block_branches=BLOCK_BRANCHES in parts)

    @property
    def fits_layers(self) -> bool:
        """Per-layer compensation is fitted (CWAC, or bias correction = CWAC with alpha = 1)."""
        return self.layer is not LayerCompensation.NONE

    def __str__(self) -> str:
        if not self.block_branches:
            return self.layer.value
        return BLOCK_BRANCHES if self.layer is LayerCompensation.NONE else f"{BLOCK_BRANCHES},{self.layer.value}"
