"""``qwt-check``: cross-backend accuracy of a quantized model, and TensorRT rule linting."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from ..errors import InternalError, QwtError
from ..log import configure as configure_logging

DESCRIPTION = """\
Quantize a model exactly as qwt-export does (same flags, same seed: same file), then run one
set of real held-out inputs through every backend and say whether they agree:

  PyTorch FP32 | PyTorch fake-quant (per target) | ONNX Runtime CPU (ort layout: integer kernels;
  trt layout: float simulation) | ONNX Runtime CUDA / TensorRT EP and a TensorRT engine, where present |
  with --openvino: OpenVINO CPU (both layouts in integer kernels; also compared with ONNX Runtime)

Errors are measured in output quantization steps, not fixed float tolerances: backends
legitimately differ by rounding flips of about one step. Models with several inputs (token ids
+ attention mask) work the same way; an output of unit-norm rows (a sentence embedding) is
gated on its mean row cosine instead, and top-1 is not reported for it (argmax of an embedding
means nothing). Per layer it reports the SQNR of each
quantized path against FP32 and the first layer where a backend parts from its PyTorch
fake-quant, so a mismatch is traced to where it starts.

Exit codes: 0 all tolerances met, 1 a tolerance exceeded (use it to gate CI), 2 bad input.
"""

EPILOG = """\
examples:
  # the built-in example on held-out real photos, both layouts
  qwt-check --example efficientnet-lite0 --targets ort,trt -o lite0-check

  # your model and calibration data, held-out inputs, strict gate
  qwt-check model.pt2 --calib-data calib.npy --inputs heldout.npy --targets ort,trt --atol-steps 1 --min-agreement 0.999

  # check a file you already exported (same flags as the export), e.g. after editing it
  qwt-check model.pt2 --calib-data calib.npy --inputs heldout.npy --onnx ort=model.int8.onnx

  # a transformer with token inputs: all-MiniLM-L6-v2 on its held-out sentences
  qwt-check --example minilm --targets ort,trt

  # your token model: .npz files with one array per input, named as the inputs
  #   numpy.savez("tokens.npz", input_ids=ids, attention_mask=mask)  (int64, N x seq, right-padded)
  qwt-check bert.pt2 --calib-data tokens.npz --inputs heldout_tokens.npz

  # lint any QDQ ONNX file (made by any tool) against TensorRT's explicit-quantization rules
  qwt-check --lint trt model.onnx
  qwt-check --lint trt model.onnx --all-findings    # every finding, not 3 per rule (or --json)

Writes REPORT_DIR/check.json (every figure), REPORT_DIR/check.txt (the table) and
REPORT_DIR/sqnr.png (where is the damage: per-layer SQNR against FP32, each backend over its
fake-quant; do the backends agree: per-layer share of elements off their fake-quant, the gate,
the first divergence).
"""

DEFAULT_MIN_COSINE = 0.995  # = CheckConfig.min_cosine (why: see there)
_HIDDEN = ("output", "target", "no_latency", "keep_unfolded", "labels",
           "save_fp32", "auto_fallback", "max_float_layers", "gate_max_kl")  # qwt-export flags that mean nothing here


def build_parser() -> argparse.ArgumentParser:
    from .export import build_parser as export_parser

    p = argparse.ArgumentParser(prog="qwt-check", description=DESCRIPTION, epilog=EPILOG, parents=[export_parser()],
                                conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in p._actions:  # reuse qwt-export's model/calibration/quantization flags; hide the export-only ones
        if a.dest in _HIDDEN:
            a.help = argparse.SUPPRESS
        elif a.dest == "model":
            a.help = "model file (as for qwt-export), or the ONNX file to lint with --lint"
    p.add_argument("-o", "--report-dir", default="qwt-check-report", help="folder for check.json, check.txt and "
                   "sqnr.png (default ./qwt-check-report)")
    c = p.add_argument_group("check")
    # --target too (qwt-export's spelling), so a command line copied from qwt-export works here
    c.add_argument("--targets", "--target", dest="targets", default="ort", help="comma-separated backend layouts to "
                   "check: ort, trt (default ort; --target is the same flag)")
    c.add_argument("--inputs", help="held-out inputs: 'bundled' (the example's own held-out data the calibration never "
                   "saw: photos, test images, sentences; default for --example), a preprocessed .npy/.npz (N,C,H,W), "
                   "an image folder (same preprocessing flags), or for a model with several inputs an .npz with one "
                   "array per input named as the inputs")
    c.add_argument("--num-inputs", type=int, default=128, help="inputs to run (default 128)")
    c.add_argument("--check-batch", type=int, default=8, help="inputs per batch (default 8; intermediates of every "
                   "layer are held for one batch)")
    c.add_argument("--atol-steps", type=float, default=None, help="an element agrees when it is within this many "
                   "output quantization steps of the backend's PyTorch fake-quant (default 1)")
    c.add_argument("--min-agreement", type=float, default=None, help="fraction of elements that must agree, per "
                   "output and backend; also the per-layer divergence threshold (default 0.999). Embedding outputs "
                   "are gated on --min-cosine only, unless --atol-steps or --min-agreement is given")
    c.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE, help="embedding outputs: mean cosine "
                   f"of the rows to the backend's PyTorch fake-quant (default {DEFAULT_MIN_COSINE:g})")
    c.add_argument("--large-error-steps", type=float, default=2.0, help="also name the first layer whose mean error "
                   "vs fake-quant reaches this many steps: where a broken layer starts even when float-kernel rounding "
                   "flips make every later layer diverge a little (default 2)")
    c.add_argument("--output-kind", default="auto", choices=("auto", "classes", "embedding"), help="what the output "
                   "rows are: class scores (top-1 reported) or embeddings (cosine gate); auto: unit-norm rows are "
                   "embeddings (default)")
    c.add_argument("--onnx", action="append", default=[], metavar="TARGET=FILE",
                   help="check this already exported file for TARGET instead of re-exporting (repeatable)")
    c.add_argument("--no-layers", action="store_true", help="compare outputs only (no per-layer SQNR/divergence)")
    c.add_argument("--no-gpu", action="store_true", help="don't try CUDA / TensorRT paths")
    c.add_argument("--openvino", action="store_true", help="also run each file in OpenVINO CPU (openvino-cpu[T]; "
                   "pip install openvino): gated against the fake-quant like every backend, compared with ONNX Runtime "
                   "on the same file, and the precision each quantized layer executed in (a float fallback fails)")
    c.add_argument("--show-layers", action="store_true", help="print the per-layer table, not just its summary")
    c.add_argument("--lint", metavar="BACKEND", choices=("trt",), help="only lint MODEL (an ONNX file) against the "
                   "backend's QDQ rules: prints the findings grouped by rule with counts, exit 1 on errors")
    c.add_argument("--all-findings", action="store_true", help="with --lint: list every finding, not the first 3 "
                   "of each rule")
    c.add_argument("--json", action="store_true", help="with --lint: print the findings as JSON on stdout (counts, "
                   "and every finding grouped by rule)")
    c.add_argument("--sensitivity", action="store_true", help="per-layer sensitivity instead of the backend check: "
                   "for each quantized layer the end-to-end KL (cosine for non-classifiers) vs FP32 on held-out "
                   "data (--inputs, --eval-data, or the hold-out split) when only it is quantized and when only it "
                   "is left float; writes sensitivity.json/.txt/.png to -o (--sensitivity-samples, default 32)")
    return p


def run_lint(backend: str, path: str, show_all: bool = False, as_json: bool = False) -> int:
    import json

    import onnx

    if not path:
        raise QwtError("--lint needs an ONNX file", "run qwt-check --lint trt model.onnx")
    if os.path.isdir(path):
        raise QwtError(f"ONNX path {path} is a folder, not a file", "pass the path of a .onnx file")
    if not os.path.isfile(path):
        raise QwtError(f"ONNX file {path} does not exist", "pass the path of a .onnx file")
    try:
        from qwt_deploy.graph_passes.check_trt_rules import check_trt_rules, findings_to_dict, format_findings
    except ImportError:
        raise QwtError("the TensorRT rule checker is not available in this install",
                       "install a qwt-deploy version with qwt_deploy.graph_passes.check_trt_rules") from None
    try:
        model = onnx.load(path)
    except Exception as e:
        raise QwtError(f"{path} is not a readable ONNX model ({type(e).__name__})", "pass an ONNX file") from None
    if not model.ir_version and not model.opset_import and not model.graph.node:  # protobuf parses b"" as a model
        raise QwtError(f"{path} is not an ONNX file (empty, or no ONNX model in it)", "pass an ONNX file") from None
    findings = check_trt_rules(model)
    errors = [f for f in findings if f.severity == "error"]
    if as_json:
        print(json.dumps(dict(model=path, backend=backend, **findings_to_dict(findings)), indent=1))
        return 1 if errors else 0
    print(format_findings(findings, show_all=show_all) if findings else f"{path}: no findings")
    print(f"\n{path}: {len(errors)} error(s), {len(findings) - len(errors)} warning(s) against TensorRT's "
          "explicit-quantization rules")
    return 1 if errors else 0


def _fmt(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-" if v is None else ("inf" if v > 0 else ("-inf" if v < 0 else "nan"))
    return format(v, spec)


def output_table(r: dict) -> str:
    rows = [("path", "vs", "output", "max steps", "mean steps", f"within {r['settings']['atol_steps']:g}",
             "cosine", "min cosine", "top-1 agree", "gate")]
    for c in r["outputs"]:
        gate = "" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")
        top1 = _fmt(c["top1_agreement"], ".4f") if c.get("kind", "classes") == "classes" else f"n/a ({c['kind']})"
        rows.append((c["path"], c["reference"], c["output"], _fmt(c["max_steps"], ".2f"), _fmt(c["mean_steps"], ".4f"),
                     _fmt(c["within_atol"], ".5f"), _fmt(c["cosine"], ".6f"), _fmt(c.get("min_cosine"), ".6f"), top1,
                     gate))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    line = "-" * (sum(w) + 3 * (len(w) - 1))
    out = [" | ".join(s.ljust(w[i]) for i, s in enumerate(rows[0])), line]
    out += [" | ".join(s.ljust(w[i]) for i, s in enumerate(row)) for row in rows[1:]]
    return "\n".join(out)


def layer_summary(r: dict, show_all: bool = False) -> str:
    layers = r["layers"]
    if not layers:
        return "per-layer comparison: off"
    paths = [p["name"] for p in r["paths"] if p["kind"] != "fp32" and p["ran"] and p["layerwise"]]
    out = []
    if show_all:
        head = ["value", "node", "op"] + [f"SQNR {p}" for p in paths]
        rows = [head] + [[l["value"], l["node"], l["op"]] + [_fmt(l["sqnr_db"].get(p), ".1f") for p in paths]
                         for l in layers]
        w = [max(len(row[i]) for row in rows) for i in range(len(head))]
        out += [" | ".join(s.ljust(w[i]) for i, s in enumerate(row)) for row in rows] + [""]
    out.append(f"per-layer SQNR vs FP32 over {len(layers)} layer outputs (dB):")
    for p in paths:
        vals = [(l["sqnr_db"].get(p), l) for l in layers if l["sqnr_db"].get(p) is not None]
        finite = [(v, l) for v, l in vals if math.isfinite(v)]
        if not finite:
            continue
        worst = min(finite, key=lambda t: t[0])
        out.append(f"  {p:<28} mapped {len(vals)}/{len(layers)}, final {_fmt(finite[-1][0], '.1f')}, "
                   f"lowest {_fmt(worst[0], '.1f')} at {worst[1]['node'] or worst[1]['value']}")
    for key, d in r["first_divergence"].items():
        if d is None:
            out.append(f"  {key}: no layer diverges (every layer >= {r['settings']['min_agreement']:g} of elements "
                       f"within {r['settings']['atol_steps']:g} step(s))")
        else:
            out.append(f"  {key}: FIRST DIVERGES at {d['node'] or d['value']} ({d['op']}, value {d['value']}, "
                       f"tensor {d['tensor']}): {d['within_atol']:.4%} within tolerance, max {d['max_steps']:.1f} steps")
        big = r.get("first_large_error", {}).get(key, "absent")
        if big == "absent" or (d is None and big is None):
            continue
        limit = r["settings"].get("large_error_steps")
        out.append(f"  {key}: " + (f"no layer reaches a mean error of {limit:g} steps (what diverges above "
                                    "are scattered small flips; no layer jumps)" if big is None else
                                    f"first layer with mean error >= {limit:g} steps: {big['node'] or big['value']} "
                                    f"({big['op']}, value {big['value']}): mean {big['mean_steps']:.2f} steps, "
                                    f"{big['within_atol']:.4%} within tolerance"))
    return "\n".join(out)


def render(r: dict, show_layers: bool = False) -> str:
    out = [f"qwt-check: {r['model']}, {r['settings']['bits']} {r['settings']['method']}, "
           f"{r['settings']['num_inputs']} inputs ({r['settings']['inputs']})", ""]
    out.append("paths:")
    for p in r["paths"]:
        state = "ran" if p["ran"] else f"SKIPPED: {p['skipped']}"
        out.append(f"  {p['name']:<28} {state}" + (f"  ({p['description']})" if p["ran"] else ""))
    if r["fp32_capture_vs_module_max_abs"] is not None:
        out.append(f"  {'pytorch-fp32':<28} = your PyTorch module within {r['fp32_capture_vs_module_max_abs']:.2e} "
                   "(max abs, first batch)")
    for t, f in r["files"].items():
        if f["identical_to_reexport"] is not None:
            out.append(f"  file checked for {t}: {f['source']} ("
                       + ("byte-identical to qwt-export with these flags)" if f["identical_to_reexport"]
                          else "DIFFERS from what qwt-export writes with these flags)"))
    for t, m in r["marking_check"].items():
        out.append(f"  marked intermediates on ort-cpu[{t}]: integer kernels {m['marked']['integer_ops']}/"
                   f"{m['marked']['compute_ops']} (unmarked {m['unmarked']['integer_ops']}/{m['unmarked']['compute_ops']}), "
                   f"final output changed by {m['final_output_max_diff_steps']:.2f} steps"
                   + ("" if m.get("same_integer_kernels", True) else " -- INTEGER KERNELS DIFFER")
                   + "".join(f"; {k} {a}->{b}" for k, (a, b) in m.get("float_ops_changed", {}).items()))
    for pname, pr in r.get("openvino_precisions", {}).items():
        out.append(f"  executed precision on {pname}: {pr['integer']}/{pr['quantized_layers']} quantized layers in "
                   f"integer kernels ({', '.join(f'{k} {v}' for k, v in sorted(pr['by_precision'].items()))})"
                   + (f" -- FLOAT FALLBACK: {', '.join(pr['float_fallback'][:5])}" if pr["float_fallback"] else ""))
    out += ["", output_table(r), ""]
    s = r["settings"]
    for oname, kind in r.get("output_kinds", {}).items():
        gates = []
        if kind != "embedding" or s["step_gate_embeddings"]:
            gates.append(f">= {s['min_agreement']:g} of elements within {s['atol_steps']:g} step(s)")
        if kind == "embedding":
            gates.append(f"mean row cosine >= {s['min_cosine']:g}")
        out.append(f"gate on {oname} ({kind}): backend vs its PyTorch fake-quant, " + " and ".join(gates))
        if kind == "embedding":
            for c in r["outputs"]:
                if c["output"] == oname:
                    out.append(f"  embedding cosine {c['path']} vs {c['reference']}: mean {c['cosine']:.6f}, "
                               f"lowest row {c['min_cosine']:.6f}")
    for note in r.get("notes", []):
        out.append("note: " + note)
    out += ["", layer_summary(r, show_layers), ""]
    out.append(f"wall time {r['timing_s']['total']:.1f} s "
               f"(quantize+export {r['timing_s']['quantize_export']:.1f} s, run+compare {r['timing_s']['run_compare']:.1f} s)")
    out.append("RESULT: " + ("PASS" if r["passed"] else "FAIL\n  " + "\n  ".join(r["failures"])))
    return "\n".join(out)


def config_from_args(a):
    from ..comparison.cross_backend import CheckConfig
    from .export import config_from_args as export_config

    a.output = a.output or os.path.join(a.report_dir, "model.int8.onnx")  # never written; qwt-export needs a name
    a.target = "ort"
    ecfg = export_config(a)
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    if not targets:
        raise QwtError("--targets is empty", "pass --targets ort,trt")
    inputs = a.inputs or ("bundled" if a.example else None)
    if not inputs:
        raise QwtError("no held-out inputs given", "pass --inputs heldout.npy (preprocessed like the calibration "
                       "data, never used for calibration), an image folder, or for token models an .npz with one "
                       "array per input")
    onnx_files = {}
    for spec in a.onnx:
        t, sep, path = spec.partition("=")
        if not sep or not path:
            raise QwtError(f"--onnx {spec} is not TARGET=FILE", "write e.g. --onnx ort=model.int8.onnx")
        onnx_files[t.strip()] = path
    step_gate_embeddings = a.atol_steps is not None or a.min_agreement is not None  # asked for: gate them too
    a.atol_steps = 1.0 if a.atol_steps is None else a.atol_steps
    a.min_agreement = 0.999 if a.min_agreement is None else a.min_agreement
    for name in ("atol_steps", "min_agreement", "min_cosine", "large_error_steps"):
        v = getattr(a, name)
        if not math.isfinite(v) or v < 0:
            raise QwtError(f"--{name.replace('_', '-')} {v} is not a non-negative number", "use e.g. 1 and 0.999")
    if a.check_batch < 1:
        raise QwtError("--check-batch must be at least 1", "use 8")
    return CheckConfig(export=ecfg, targets=targets, inputs=inputs, num_inputs=a.num_inputs, batch_size=a.check_batch,
                       atol_steps=a.atol_steps, min_agreement=a.min_agreement, min_cosine=a.min_cosine,
                       step_gate_embeddings=step_gate_embeddings, output_kind=a.output_kind, onnx_files=onnx_files,
                       large_error_steps=a.large_error_steps,
                       layerwise=not a.no_layers, gpu=not a.no_gpu, openvino=a.openvino)


def write_reports(report: dict, text: str, report_dir: str) -> dict:
    from ..atomic import atomic_write_bytes
    from ..comparison.plot import write_sqnr_plot
    from ..report import write_json

    if os.path.exists(report_dir) and not os.path.isdir(report_dir):
        raise QwtError(f"report folder {report_dir} is a file", "pass a folder with -o")
    os.makedirs(report_dir, exist_ok=True)
    paths = dict(json=os.path.join(report_dir, "check.json"), text=os.path.join(report_dir, "check.txt"))
    write_json(report, paths["json"])
    atomic_write_bytes(paths["text"], (text + "\n").encode())
    if report["layers"]:
        paths["plot"] = os.path.join(report_dir, "sqnr.png")
        write_sqnr_plot(report, paths["plot"])
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(-1 if args.quiet else 1 if getattr(args, "verbose", False) else 0)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.lint:
            return run_lint(args.lint, args.model, show_all=args.all_findings, as_json=args.json)
        if args.sensitivity:
            from .sensitivity import main_from_args

            return main_from_args(args)
        cfg = config_from_args(args)
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR  # Polygraphy's per-runner info lines would drown the table
        from ..pipeline import run_check_files

        progress = batch_progress = None
        if not args.quiet:
            from tqdm import tqdm

            from .progress import layer_progress_bar

            progress = layer_progress_bar()

            def batch_progress(i, total, _state={}):
                if "bar" not in _state:
                    _state["bar"] = tqdm(total=total, desc="run+compare", unit="input", file=sys.stderr)
                _state["bar"].update(i - _state["bar"].n)
                if i >= total:
                    _state["bar"].close()
        report = run_check_files(cfg, progress=progress, batch_progress=batch_progress)
        text = render(report, args.show_layers)
        files = write_reports(report, text, args.report_dir)
    except QwtError as e:
        print(f"qwt-check: error: {e}", file=sys.stderr)
        return 2
    except InternalError as e:
        print(f"qwt-check: internal error (a qwt-deploy bug, please report it): {e}", file=sys.stderr)
        return 3
    print(text)
    print(f"\nwrote {', '.join(files.values())}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
