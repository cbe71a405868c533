"""qwt-export's accuracy flags: held-out data, the FP32 gates, --save-fp32 and --auto-fallback.

The gates have their own ``dest`` names (``gate_*``): qwt-check reuses qwt-export's parser and
has its own ``--min-agreement`` / ``--min-cosine`` (backend vs fake-quant), which replace these
there without one leaking into the other.
"""

from __future__ import annotations

import argparse
import math

from ..errors import QwtError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("accuracy against FP32 (held-out data, never calibrated on)")
    g.add_argument("--eval-data", metavar="FILE", help="held-out inputs for the accuracy report, in any form "
                   "--calib-data takes (default: the example's/bundled photos' own held-out set, else 10%% of the "
                   "calibration samples, at least 32, held out before calibrating)")
    g.add_argument("--eval-labels", metavar="FILE", help="one integer class per --eval-data sample (.npy, or text "
                   "with one per line): top-1 accuracy of FP32 and INT8 side by side")
    g.add_argument("--holdout", type=float, default=0.1, metavar="FRACTION", help="share of the calibration "
                   "samples held out when no --eval-data is given (default 0.1; at least 32 samples; nothing is "
                   "held out of fewer than 64)")
    g.add_argument("--min-agreement", dest="gate_min_agreement", type=float, default=None, metavar="F",
                   help="exit 1 when the top-1 agreement with FP32 on held-out data is below F (classifiers), e.g. 0.99")
    g.add_argument("--max-kl", dest="gate_max_kl", type=float, default=None, metavar="KL",
                   help="exit 1 when the mean KL(FP32 || INT8) on held-out data is above KL (classifiers)")
    g.add_argument("--min-cosine", dest="gate_min_cosine", type=float, default=None, metavar="C",
                   help="exit 1 when the mean output cosine to FP32 on held-out data is below C")
    g.add_argument("--save-fp32", action="store_true", help="also write the FP32 ONNX (the reference the "
                   "latency and accuracy are measured against) beside the model: m.int8.onnx -> m.fp32.onnx")
    g.add_argument("--auto-fallback", action="store_true", help="keep the most sensitive layers float, "
                   "greedily, until the --min-agreement/--max-kl/--min-cosine target is met on held-out data "
                   "(ranked by per-layer sensitivity, then re-calibrated once); the report lists them and their "
                   "latency and size cost")
    g.add_argument("--max-float-layers", type=int, default=8, metavar="N", help="--auto-fallback: at most N "
                   "layers kept float (default 8)")
    g.add_argument("--sensitivity-samples", type=int, default=32, metavar="N", help="held-out samples the "
                   "per-layer sensitivity runs on (default 32)")


def config_fields(a) -> dict:
    """The ExportConfig fields of these flags, checked (one-line QwtError, exit 2)."""
    if not (0.0 < a.holdout < 1.0) or not math.isfinite(a.holdout):
        raise QwtError(f"--holdout {a.holdout} is not a fraction between 0 and 1", "use e.g. --holdout 0.1")
    for flag, v in (("--max-float-layers", a.max_float_layers), ("--sensitivity-samples", a.sensitivity_samples)):
        if v < 1:
            raise QwtError(f"{flag} {v} is below 1", f"pass {flag} 1 or more")
    gates = {k: getattr(a, "gate_" + k, None) for k in ("min_agreement", "max_kl", "min_cosine")}
    for k, v in gates.items():
        if v is not None and (not math.isfinite(v) or v < 0 or (k != "max_kl" and v > 1)):
            raise QwtError(f"--{k.replace('_', '-')} {v} is out of range",
                           "give a fraction in 0..1 for --min-agreement/--min-cosine, a non-negative --max-kl")
    if a.auto_fallback and not any(v is not None for v in gates.values()):
        raise QwtError("--auto-fallback needs a target", "add --min-agreement 0.99 (or --max-kl / --min-cosine)")
    if a.eval_labels and not a.eval_data:
        raise QwtError("--eval-labels needs --eval-data", "pass the evaluation inputs the labels belong to")
    return dict(eval_data=a.eval_data, eval_labels=a.eval_labels, holdout_fraction=a.holdout,
                save_fp32=a.save_fp32, auto_fallback=a.auto_fallback, max_float_layers=a.max_float_layers,
                sensitivity_samples=a.sensitivity_samples, **gates)
