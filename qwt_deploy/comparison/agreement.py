"""Agreement between two sets of outputs, measured in output quantization steps.

Backends legitimately differ from a float simulation by rounding flips, so a fixed 1e-5
tolerance means nothing. The unit here is the output's quantization step: the step of the
output's own quantizer if it has one, else the step an 8-bit asymmetric quantizer over the
reference output's observed range would have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Agreement:
    step: float
    max_steps: float
    mean_steps: float
    within_1_step: float  # fraction of elements with |a - b| <= 1 step
    top1_agreement: float  # fraction of rows whose argmax agrees (classifiers)
    cosine: float

    def to_dict(self) -> dict:
        return asdict(self)


# Slack on "within k steps": two float32 dequantized values one code apart differ by the step
# times (1 +- up to ~3e-5) (each carries the rounding of (code - zero point) * scale, |code - zp|
# <= 255, at 2**-24 relative). With a 1e-6 slack, exact one-code flips counted as beyond one
# step (PP-OCRv4: 0.35% of a GAP's elements at 1.0000022 steps); 1e-3 is far below any real
# second step.
STEP_SLACK = 1e-3


def output_step(reference: np.ndarray) -> float:
    lo, hi = min(float(reference.min()), 0.0), max(float(reference.max()), 0.0)
    return (hi - lo) / 255.0 if hi > lo else 1.0


def compare(reference: np.ndarray, other: np.ndarray, step: float | None = None) -> Agreement:
    step = step or output_step(reference)
    d = np.abs(reference.astype(np.float64) - other.astype(np.float64)) / step
    a, b = reference.reshape(len(reference), -1), other.reshape(len(other), -1)
    cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))
    top1 = float(np.mean(a.argmax(1) == b.argmax(1))) if a.shape[1] > 1 else float("nan")
    return Agreement(step=step, max_steps=float(d.max()), mean_steps=float(d.mean()),
                     within_1_step=float(np.mean(d <= 1.0 + STEP_SLACK)), top1_agreement=top1, cosine=cos)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(softmax(p) || softmax(q)) over rows."""
    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), 1)))


def row_cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Cosine of each sample's output (row) to the reference's, in float64."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = other.reshape(len(other), -1).astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


OUTPUT_KINDS = ("auto", "classes", "embedding")


def output_kind(reference: np.ndarray, requested: str = "auto") -> str:
    """``classes`` (rows of class scores: top-1 agreement means something), ``embedding``
    (rows of a vector space: only distances and angles mean something, so cosine is the
    measure and argmax is noise) or ``tensor`` (anything else: element figures only).

    ``auto`` calls a 2-D output with unit-L2-norm rows an embedding (sentence-transformers and
    CLIP-style models normalise inside the graph); class scores never have that property.
    Unnormalised embeddings need ``requested='embedding'`` (``--output-kind``)."""
    if requested != "auto":
        return requested
    if reference.ndim != 2 or reference.shape[1] < 2:
        return "tensor"
    norms = np.linalg.norm(reference.astype(np.float64), axis=1)
    return "embedding" if np.all(np.abs(norms - 1.0) < 1e-3) else "classes"
