"""Class labels of evaluation samples (``--eval-labels``): one integer class per sample."""

from __future__ import annotations

import os

import numpy as np

from qwt_deploy.errors import QwtError


def load_class_labels(path: str) -> np.ndarray:
    """Integer labels from an ``.npy`` (a 1-D integer array) or a text file (one integer per
    line; blank lines skipped). One-line QwtError for anything else."""
    fix = "give a .npy of N integers, or a text file with one integer class per line, in sample order"
    if not os.path.isfile(path):
        raise QwtError(f"--eval-labels {path} does not exist", fix)
    if path.endswith(".npy"):
        try:
            y = np.load(path, allow_pickle=False)
        except Exception as e:
            raise QwtError(f"--eval-labels {path} is not a readable .npy ({type(e).__name__})", fix) from None
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            y = np.array([int(v) for v in lines], np.int64)
        except (ValueError, UnicodeDecodeError):
            raise QwtError(f"--eval-labels {path} has a line that is not an integer", fix) from None
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or not len(y):
        raise QwtError(f"--eval-labels {path} holds {y.dtype} of shape {y.shape}, not N integers", fix)
    if (y < 0).any():
        raise QwtError(f"--eval-labels {path} has negative classes", fix)
    return y.astype(np.int64)
