"""``qwt-check --sensitivity``: which layers hurt, as a sorted table, JSON and a PNG bar chart.

Takes qwt-export's model, calibration and quantization flags (the model is quantized exactly
as qwt-export does it), held-out inputs from ``--inputs`` / ``--eval-data`` or the hold-out
split, and writes ``sensitivity.json``, ``sensitivity.txt`` and ``sensitivity.png`` to ``-o``.
"""

from __future__ import annotations

import os
import sys


def render(r: dict) -> str:
    m = "KL" if r["metric"] == "kl" else "1-cos"
    out = [f"qwt-sensitivity: {r['model']}, {r['bits']} {r['method']} ({r['calib_method']} activations), "
           f"target {r['target']}",
           f"held-out data: {r['samples']} samples of {r['source']}",
           f"end-to-end {r['metric']} vs FP32 with every layer quantized: {r['all_quantized']:.5g}",
           f"how: {r['how']}", ""]
    head = ("rank", "layer", "op", f"{m} only this quantized", f"{m} only this float", "gain if float")
    rows = [head] + [(str(i + 1), l["node"], l["op"], f"{l['only_quantized']:.5g}", f"{l['only_float']:.5g}",
                      f"{l['gain']:+.5g}") for i, l in enumerate(r["layers"])]
    w = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out.append(" | ".join(s.ljust(w[i]) for i, s in enumerate(head)))
    out.append("-" * (sum(w) + 3 * (len(w) - 1)))
    out += [" | ".join(s.ljust(w[i]) for i, s in enumerate(row)) for row in rows[1:]]
    t = r["timing_s"]
    out += ["", f"{len(r['layers'])} layers in {t['sensitivity']:.1f} s (quantize {t['quantize']:.1f} s, "
                f"total {t['total']:.1f} s). Keep the top ones float with --keep-float NAME,... or let "
                "qwt-export --auto-fallback --min-agreement 0.99 choose."]
    return "\n".join(out)


def write(report: dict, text: str, report_dir: str) -> dict:
    from ..atomic import atomic_write_bytes
    from ..comparison.sensitivity import LayerSensitivity, SensitivityReport, write_bar_chart
    from ..comparison.plot import model_label
    from ..errors import QwtError
    from ..report import write_json

    if os.path.exists(report_dir) and not os.path.isdir(report_dir):
        raise QwtError(f"report folder {report_dir} is a file", "pass a folder with -o")
    os.makedirs(report_dir, exist_ok=True)
    paths = {k: os.path.join(report_dir, f"sensitivity.{k}") for k in ("json", "txt", "png")}
    write_json(report, paths["json"])
    atomic_write_bytes(paths["txt"], (text + "\n").encode())
    rep = SensitivityReport(metric=report["metric"], samples=report["samples"], source=report["source"],
                            all_quantized=report["all_quantized"], seconds=report["seconds"],
                            layers=[LayerSensitivity(**{k: v for k, v in l.items() if k != "score"})
                                    for l in report["layers"]])
    write_bar_chart(rep, paths["png"], f"{model_label(report['model'])} {report['bits']} {report['method']} "
                                       f"({report['target']}): per-layer sensitivity")
    return paths


def main_from_args(args) -> int:
    """Called by qwt-check's main (inside its error handling) when --sensitivity is given."""
    from ..pipeline import run_sensitivity
    from .export import config_from_args as export_config

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.output = args.output or os.path.join(args.report_dir, "model.int8.onnx")  # never written
    args.target = targets[0] if targets else "ort"
    cfg = export_config(args)
    progress = layer_progress = None
    if not args.quiet:
        from .progress import layer_progress_bar

        progress, layer_progress = layer_progress_bar(), layer_progress_bar("sensitivity")
    inputs = args.inputs if args.inputs not in (None, "bundled") else None
    report = run_sensitivity(cfg, inputs, progress, layer_progress)
    text = render(report)
    paths = write(report, text, args.report_dir)
    print(text)
    print(f"\nwrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":  # python -m qwt_deploy.cli.sensitivity = qwt-check --sensitivity
    from .check import main

    sys.exit(main(sys.argv[1:] + ["--sensitivity"]))
