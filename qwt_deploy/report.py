"""The run summary: a JSON report next to the model and a readable terminal table."""

from __future__ import annotations

import json
import math
import os

from .atomic import atomic_write_bytes


def write_json(report: dict, path: str) -> None:
    atomic_write_bytes(path, json_bytes(report))


def json_bytes(report: dict) -> bytes:
    """The report as written: sorted keys, NaN/inf as null."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return (json.dumps(clean(report), indent=2, sort_keys=True) + "\n").encode()


def table(rows: list[tuple[str, str]], title: str) -> str:
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    out = [title, line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line]
    return "\n".join(out)


def summary_rows(r: dict) -> list[tuple[str, str]]:
    q, a, lat, cov = r["quantization"], r["ort_vs_pytorch"], r.get("latency") or {}, r["int8_coverage"]
    rows = [
        ("model", r["model"]),
        ("output", r["output"]),
        ("method / bits", f"{q['method']}  W{q['w_bits']}A{q['a_bits']}  ({q['calib_method']} activations)"),
        ("calibration", f"{r['calibration']['samples']} samples from {r['calibration']['source']}, {r['timing_s']['calibrate']:.1f} s"),
        ("compensated layers", f"{len(r['layers'])}, folded {r['folded_layers']} (no extra nodes)"),
    ]
    if r.get("float_nodes"):
        kinds = {}
        for f in r["float_nodes"]:
            kinds[f["op_type"]] = kinds.get(f["op_type"], 0) + 1
        rows.append(("float nodes (ONNX)", f"{len(r['float_nodes'])} kept float, run by ONNX Runtime in the simulation "
                     f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})"))
    c = r.get("compensation") or {}
    if c.get("blocks_found"):
        r2 = [b["r2"] for b in c["blocks"]]
        rows.append(("QwT block branches", f"{c['blocks_kept']}/{c['blocks_found']} kept (R^2 > 0; R^2 "
                     f"{min(r2):.3f}..{max(r2):.3f}), +{c['branch_params']:,} {c.get('branch_precision', 'float')} params "
                     f"= {c.get('branch_bytes', 0) / 1e3:.1f} kB ({c['extra_params_deployed_pct']:.2f}% of "
                     f"{c['model_params']:,})"))
    rows += [
        ("INT8 kernels in ORT", f"{cov['integer_ops']}/{cov['compute_ops']} compute ops ({', '.join(f'{k} {v}' for k, v in sorted(cov['by_type'].items()))})"
         if cov.get("applicable", True) else cov["note"]),
        *([("conv/matmul FLOPs", f"{cov['flops']['share']:.1%} in integer kernels"
            + (f" (float: {', '.join(cov['flops']['float_ops'][:4])}{', ...' if len(cov['flops']['float_ops']) > 4 else ''})"
               if cov['flops']['float_ops'] else ""))]
          if (cov.get("flops") or {}).get("share") is not None else []),
        ("ORT vs PyTorch sim", f"top-1 agree {a['top1_agreement']:.3f}, within 1 step {a['within_1_step']:.4f}, "
                               f"max {a['max_steps']:.2f} steps, cosine {a['cosine']:.5f}"),
        *accuracy_rows(r),
        ("file size", f"{r['size_bytes']['int8'] / 1e6:.2f} MB (FP32 {r['size_bytes']['fp32'] / 1e6:.2f} MB)"),
    ]
    outs = a.get("outputs") or {}
    if len(outs) > 1:  # several outputs: each one's agreement (the row above is the worst)
        rows.insert(-1, ("  per output", ", ".join(f"{k} {o['within_1_step']:.4f}" for k, o in outs.items())))
    d = r.get("first_diverging_layer")
    if a["within_1_step"] < 0.999:
        where = (f"first diverging layer {d.get('node') or d.get('value')} ({d.get('within_atol', float('nan')):.4f} within 1 step)"
                 if d else "no single layer below 99.9%: rounding flips spread over many layers")
        rows.insert(-1, ("WARNING", f"ONNX Runtime is not within 1 step of the simulation on "
                                    f"{1 - a['within_1_step']:.2%} of output elements; {where}"))
    if lat:
        rows.append(("latency bs1, 2 thr", f"INT8 {lat['int8_ms']:.2f} ms vs FP32 {lat['fp32_ms']:.2f} ms ({lat['ratio']:.2f}x)"))
    ov = r.get("openvino")
    if ov and ov.get("error"):
        rows.append((f"OpenVINO {ov['version']}", f"cannot compile the file ({ov['error']})"))
    elif ov:  # only where openvino is installed (runtime.openvino.export_report)
        g, lp = ov["vs_onnxruntime"], ov["layer_precisions"]
        rows.append((f"OpenVINO {ov['version']} vs ORT", f"{g['within_1_step']:.4f} within 1 step, top-1 "
                     f"{g['top1_agreement']:.4f}; {lp['integer']}/{lp['quantized_layers']} quantized layers in integer"))
        if ov.get("latency"):
            o = ov["latency"]
            rows.append(("OpenVINO bs1", f"INT8 {o['openvino_int8']:.2f} ms ({o['ratio_to_onnxruntime_int8']:.2f}x ORT INT8, "
                         f"{o['ratio_to_openvino_fp32']:.2f}x its FP32)"))
    rows.append(("total wall time", f"{r['timing_s']['total']:.1f} s"))
    return rows


def _g(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def accuracy_rows(r: dict) -> list[tuple[str, str]]:
    """INT8 against FP32 on held-out data, the gates, and the auto-fallback (issue 13)."""
    acc = r.get("accuracy")
    if not acc:
        return [("INT8 vs FP32", f"not measured: held-out data {(r.get('calibration') or {}).get('held_out', 'none')}")]
    figs = ([f"top-1 agree {acc['top1_agreement']:.4f}", f"KL {acc['kl']:.5f}"] if acc["kind"] == "classes" else [])
    figs += [f"cosine {acc['cosine']:.5f}", f"SQNR {_g(acc['sqnr_db'], '.1f')} dB"]
    rows = [("INT8 vs FP32", f"{', '.join(figs)} on {acc['samples']} held-out samples ({acc['source']})")]
    ao = r.get("accuracy_onnxruntime")
    if ao:  # ORT differs from the simulation: the file's own figures
        f2 = ([f"top-1 agree {ao['top1_agreement']:.4f}", f"KL {ao['kl']:.5f}"] if ao["kind"] == "classes" else [])
        rows.append(("  in ONNX Runtime", ", ".join(f2 + [f"cosine {ao['cosine']:.5f}"])
                     + " (the file as ORT runs it; it differs from the simulation, see WARNING)"))
    if acc.get("fp32_top1") is not None:
        rows.append(("top-1 accuracy", f"FP32 {acc['fp32_top1']:.2%} vs INT8 {acc['int8_top1']:.2%} "
                                       f"({acc['samples']} labelled samples)"))
    fb = r.get("fallback")
    if fb:
        b, a = fb["before"], fb["after"]
        what = (f"top-1 agree {_g(b['top1_agreement'], '.4f')} -> {_g(a['top1_agreement'], '.4f')}, "
                f"KL {_g(b['kl'], '.5f')} -> {_g(a['kl'], '.5f')}" if b["kind"] == "classes" else
                f"cosine {b['cosine']:.5f} -> {a['cosine']:.5f}")
        chosen, rej = fb["chosen"], fb.get("rejected")
        if chosen:
            text = f"{len(chosen)} layer(s) kept float (cap {fb['max_float_layers']}): {', '.join(chosen)}; {what}"
        elif rej:
            ra = rej["accuracy"]
            text = (f"every layer stays INT8: the search's {len(rej['layers'])} float layer(s) "
                    f"({', '.join(rej['layers'])}) did not help once re-calibrated (top-1 agree "
                    f"{_g(ra['top1_agreement'], '.4f')}, KL {_g(ra['kl'], '.5f')}, cosine {ra['cosine']:.5f})")
        elif fb["met"]:
            text = "not needed: the target is met with every layer INT8"
        else:
            text = "no layer kept float brings the target closer"
        met = (r.get("accuracy_gates") or {}).get("passed", fb["met"])  # the gate's verdict (ORT's figures if measured)
        rows.append(("auto-fallback", text + ("" if met else "; TARGET NOT MET")))
        lat, size = fb.get("latency_ms"), fb.get("size_bytes")
        if chosen and (lat or size):
            cost = []
            if lat:
                cost.append(f"latency bs1 {lat['all_int8']:.2f} -> {lat['fallback']:.2f} ms ({lat['ratio']:.2f}x)")
            if size:
                cost.append(f"size {size['all_int8'] / 1e6:.3f} -> {size['fallback'] / 1e6:.3f} MB")
            rows.append(("fallback cost", ", ".join(cost) + " (all-INT8 -> with float layers)"))
    g = r.get("accuracy_gates")
    if g:
        bars = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in g.items()
                         if k in ("min_agreement", "max_kl", "min_cosine") and v is not None)
        rows.append(("accuracy gate", f"PASS ({bars})" if g["passed"] else "FAIL: " + "; ".join(g["failures"])))
    return rows


def layer_rows(r: dict, top: int = 8) -> str:
    layers = [l for l in r["layers"] if l.get("mse_before", 0) > 0]
    layers.sort(key=lambda l: -(l["sqnr_after_db"] - l["sqnr_before_db"]))
    lines = [f"{'layer':<34} {'alpha min..max':>16} {'SQNR dB before->after':>22}"]
    for l in layers[:top]:
        lines.append(f"{l['name'][:34]:<34} {l['alpha_min']:>7.3f}..{l['alpha_max']:<7.3f} "
                     f"{l['sqnr_before_db']:>9.1f} -> {l['sqnr_after_db']:<9.1f}")
    return "\n".join(lines)


def default_report_path(onnx_path: str) -> str:
    return sibling_path(onnx_path, ".report.json")


def sibling_path(onnx_path: str, suffix: str) -> str:
    """``m.int8.onnx`` -> ``m.int8<suffix>``: only a final ``.onnx`` is dropped (never one in a
    folder name such as ``runs.onnx/m.onnx``)."""
    base = onnx_path[:-5] if onnx_path.endswith(".onnx") else onnx_path
    return base + suffix


def file_size(path: str) -> int:
    return os.path.getsize(path)
