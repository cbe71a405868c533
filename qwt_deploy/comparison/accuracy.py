"""How far a quantized model is from its FP32 original, on data it was never calibrated on.

Three things, one idea (accuracy against FP32):

- :func:`holdout_split`: which calibration samples are held out for evaluation (default 10%,
  at least 32, disjoint from the ones calibrated on, chosen by a seeded permutation);
- :func:`measure`: top-1 agreement (classifiers), mean KL(FP32 || INT8), mean output cosine,
  SQNR in dB and, given labels, top-1 accuracy of both models side by side (:class:`Accuracy`);
- :class:`AccuracyGates`: the ``--min-agreement`` / ``--max-kl`` / ``--min-cosine`` bars and
  which of them a measurement misses, in words.

Element figures (within k quantization steps) are :mod:`.agreement`'s; this module reuses its
KL, cosine and output-kind rules so the two never disagree about what an output is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import QwtError
from .agreement import kl_divergence, output_kind, row_cosines
from .layerwise import sqnr_db as layer_sqnr_db


@dataclass(frozen=True)
class HoldOut:
    """How much calibration data ``quantize`` holds out when no evaluation data is given."""

    fraction: float = 0.1  # of the loaded calibration samples
    minimum: int = 32  # never fewer; with fewer than 2x this many samples nothing is held out
    samples: int = 256  # evaluation samples taken from a source's own held-out set (examples, bundled photos)

    def __post_init__(self):
        if not (0.0 < self.fraction < 1.0) or not math.isfinite(self.fraction):
            raise QwtError(f"hold-out fraction {self.fraction} is not between 0 and 1", "use e.g. 0.1")
        if self.minimum < 1 or self.samples < 1:
            raise QwtError("hold-out sizes must be at least 1", "use the defaults (32 and 256)")


def holdout_size(n: int, holdout: HoldOut = HoldOut()) -> int:
    """Samples held out of ``n``: ``max(minimum, ceil(fraction * n))``, or 0 when that would
    leave fewer than ``minimum`` to calibrate on (then the caller says accuracy is unmeasured)."""
    k = max(holdout.minimum, math.ceil(holdout.fraction * n))
    return k if n - k >= holdout.minimum else 0


def holdout_split(n: int, holdout: HoldOut = HoldOut(), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, held-out indices) of ``n`` samples: disjoint, together all of
    ``range(n)``, each sorted; the held-out ones drawn by a permutation seeded with ``seed``."""
    k = holdout_size(n, holdout)
    held = np.sort(np.random.default_rng(seed).permutation(n)[:k]) if k else np.zeros(0, np.int64)
    mask = np.ones(n, bool)
    mask[held] = False
    return np.flatnonzero(mask), held


@dataclass
class Accuracy:
    """One model's (first) output against FP32 on held-out data. ``None``: not meaningful for
    this output kind (KL and top-1 need class scores) or no labels given."""

    samples: int
    source: str  # where the held-out data came from
    kind: str  # classes | embedding | tensor (agreement.output_kind)
    top1_agreement: Optional[float]  # rows whose argmax equals FP32's
    kl: Optional[float]  # mean KL(softmax(FP32) || softmax(INT8)), nats
    cosine: float  # mean row cosine to FP32
    sqnr_db: float  # 10 log10(|FP32|^2 / |INT8 - FP32|^2) over all elements
    fp32_top1: Optional[float] = None  # with labels: top-1 accuracy of FP32
    int8_top1: Optional[float] = None  # with labels: top-1 accuracy of the quantized model

    def to_dict(self) -> dict:
        return asdict(self)

    def value(self, metric: str) -> Optional[float]:
        return {"agreement": self.top1_agreement, "kl": self.kl, "cosine": self.cosine}[metric]


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Over all elements; an all-zero reference gives a very low finite figure, not -inf."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - other.astype(np.float64)) ** 2))
    return layer_sqnr_db(max(float(np.sum(ref ** 2)), 1e-300), noise)


def measure(fp32: np.ndarray, quantized: np.ndarray, labels: Optional[np.ndarray] = None, source: str = "",
            kind: str = "auto") -> Accuracy:
    """``quantized`` outputs against ``fp32`` (same rows); top-1 accuracy of both with ``labels``."""
    if fp32.shape != quantized.shape:
        raise ValueError(f"outputs differ in shape: {fp32.shape} vs {quantized.shape}")
    kind = output_kind(fp32, kind)
    classes = kind == "classes"
    a, b = fp32.reshape(len(fp32), -1), quantized.reshape(len(quantized), -1)
    acc = Accuracy(samples=int(len(fp32)), source=source, kind=kind,
                   top1_agreement=float(np.mean(a.argmax(1) == b.argmax(1))) if classes else None,
                   kl=kl_divergence(a, b) if classes else None, cosine=float(np.mean(row_cosines(a, b))),
                   sqnr_db=sqnr_db(fp32, quantized))
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(fp32):
            raise QwtError(f"{len(labels)} labels for {len(fp32)} evaluation samples",
                           "give one integer class label per evaluation sample, in the same order")
        if classes:
            acc.fp32_top1 = float(np.mean(a.argmax(1) == labels))
            acc.int8_top1 = float(np.mean(b.argmax(1) == labels))
    return acc


@dataclass(frozen=True)
class AccuracyGates:
    """Bars an export must clear on held-out data (None: not gated)."""

    min_agreement: Optional[float] = None  # top-1 agreement with FP32 (classifiers)
    max_kl: Optional[float] = None  # mean KL(FP32 || INT8)
    min_cosine: Optional[float] = None  # mean output cosine to FP32

    def __post_init__(self):
        for name in ("min_agreement", "max_kl", "min_cosine"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise QwtError(f"--{name.replace('_', '-')} {v} is not a non-negative number",
                               "use e.g. --min-agreement 0.99, --max-kl 0.01, --min-cosine 0.999")
        for name in ("min_agreement", "min_cosine"):
            v = getattr(self, name)
            if v is not None and v > 1:
                raise QwtError(f"--{name.replace('_', '-')} {v} is above 1", "give a fraction, e.g. 0.99")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.min_agreement, self.max_kl, self.min_cosine))

    def to_dict(self) -> dict:
        return asdict(self)

    def check_kind(self, kind: str) -> None:
        """Top-1 agreement and KL need class scores; QwtError (bad input) otherwise."""
        if kind != "classes" and (self.min_agreement is not None or self.max_kl is not None):
            raise QwtError(f"--min-agreement and --max-kl need a classifier output; this model's output is a {kind}",
                           "gate it with --min-cosine")

    def missed(self, acc: Accuracy) -> list[str]:
        """One line per bar ``acc`` misses, naming the figure, its value and the bar."""
        out = []
        if self.min_agreement is not None and (acc.top1_agreement is None or acc.top1_agreement < self.min_agreement):
            out.append(f"top-1 agreement with FP32 {_f(acc.top1_agreement)} < --min-agreement {self.min_agreement:g}")
        if self.max_kl is not None and (acc.kl is None or acc.kl > self.max_kl):
            out.append(f"mean KL to FP32 {_f(acc.kl, '.5f')} > --max-kl {self.max_kl:g}")
        if self.min_cosine is not None and acc.cosine < self.min_cosine:
            out.append(f"output cosine to FP32 {acc.cosine:.6f} < --min-cosine {self.min_cosine:g}")
        return out

    def met(self, acc: Accuracy) -> bool:
        return not self.missed(acc)


def _f(v: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)
