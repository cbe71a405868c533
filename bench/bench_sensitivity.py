"""Per-layer sensitivity and auto-fallback on EfficientNet-Lite0 (issue 13, section 2).

For W8A8 and W4A8 (4-bit weights emulated in INT8 containers, ``--w-bits 4``), calibrated as
``qwt-export --example efficientnet-lite0`` calibrates (512 crops of the bundled photos), and
measured on real held-out photos (crops of the bundled evaluation photos, never calibrated on):

1. top-1 agreement, mean KL, cosine and SQNR against FP32 with every layer INT8;
2. the per-layer sensitivity (``api.sensitivity``: both losses per layer, one pass per layer and
   variant on a held-out subset) and its wall time;
3. ``api.auto_fallback`` to ``--min-agreement`` (default 0.99, cap 8 layers): the layers chosen,
   agreement and KL after re-calibrating with them float, and the cost: ONNX Runtime batch-1
   latency (interleaved: all-INT8, fallback, FP32) and file size; ONNX Runtime vs the simulation
   on the fallback file (whether ORT runs the float layers as the simulation does).

Writes ``bench/results/sensitivity.json``, ``sensitivity.md`` and one bar chart per setting
(``sensitivity_w8a8.png``, ``sensitivity_w4a8.png``). Everything goes through the public API.

    python bench/bench_sensitivity.py [--bits W8A8,W4A8] [--samples 32] [--eval 256] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from qwt_deploy import api
from qwt_deploy.calibration.sequential import CalibrationSettings
from qwt_deploy.comparison.accuracy import AccuracyGates, HoldOut
from qwt_deploy.comparison.sensitivity import write_bar_chart
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.data.preprocess import LITE0
from qwt_deploy.examples import EXAMPLES
from qwt_deploy.report import write_json


def machine() -> str:
    try:
        model = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                     .stdout.splitlines() if l.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or platform.machine()
    load = os.getloadavg()
    return f"{model}, {os.cpu_count()} cores, load average at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"


def acc_row(a) -> dict:
    return dict(top1_agreement=a.top1_agreement, kl=a.kl, cosine=a.cosine, sqnr_db=a.sqnr_db, samples=a.samples)


def run(bits: str, a, model) -> dict:
    w, act = int(bits[1]), int(bits[3])
    cfg = QuantizeConfig(target="ort", settings=CalibrationSettings(w_bits=w, a_bits=act), num_calib=a.num_calib,
                         preprocess=LITE0, threads=2)
    t = time.perf_counter()
    qm = api.quantize(model, "bundled", cfg, holdout=HoldOut(samples=a.eval))
    t_cal = time.perf_counter() - t
    t = time.perf_counter()
    before = qm.accuracy
    t_eval = time.perf_counter() - t
    print(f"{bits}: calibrated in {t_cal:.0f} s on {len(qm.inputs)} crops; all INT8 on {before.samples} held-out crops: "
          f"agree {before.top1_agreement:.4f}, KL {before.kl:.5f} ({t_eval:.0f} s)", flush=True)

    t = time.perf_counter()
    sens = api.sensitivity(qm, samples=a.samples)
    t_sens = time.perf_counter() - t
    print(f"{bits}: sensitivity of {len(sens.layers)} layers on {sens.samples} crops in {t_sens:.0f} s; top 5: "
          + ", ".join(f"{l.node} (alone {l.only_quantized:.5f}, gain {l.gain:.5f})" for l in sens.layers[:5]), flush=True)
    write_bar_chart(sens, os.path.join(a.out, f"sensitivity_{bits.lower()}.png"),
                    f"EfficientNet-Lite0 {bits} (qwt2): per-layer sensitivity, KL vs FP32")

    gates = AccuracyGates(min_agreement=a.min_agreement)
    t = time.perf_counter()
    fb = api.auto_fallback(qm, gates, max_float_layers=a.max_float_layers, samples=a.samples, ranking=sens)
    t_fb = time.perf_counter() - t
    print(f"{bits}: auto-fallback kept {fb.chosen} float in {t_fb:.0f} s: agree {fb.before.top1_agreement:.4f} -> "
          f"{fb.after.top1_agreement:.4f}, KL {fb.before.kl:.5f} -> {fb.after.kl:.5f}, met {fb.met}", flush=True)

    ex_all = api.export(qm)
    row = dict(bits=bits, calibration_crops=len(qm.inputs), heldout=qm.heldout_source, calibrate_s=t_cal,
               before=acc_row(fb.before), after=acc_row(fb.after), met=fb.met, chosen=fb.chosen, rejected=fb.rejected,
               sensitivity_s=t_sens, sensitivity_samples=sens.samples, sensitivity_how=sens.how,
               fallback_s=t_fb, sensitivity=[l.to_dict() for l in sens.layers],
               search=None if fb.search is None else fb.search.to_dict())
    held = qm.heldout.head(32)
    if fb.chosen:
        ex_fb = api.export(fb.quantized)
        v = api.verify(ex_fb, held, measure_latency=False)
        row["fallback_ort_vs_sim"] = dict(within_1_step=v.agreement.within_1_step, max_steps=v.agreement.max_steps,
                                          top1_agreement=v.agreement.top1_agreement, coverage=v.coverage)
        files = {"all_int8": ex_all, "fallback": ex_fb, "fp32": api.export_float(qm)}
    else:
        files = {"all_int8": ex_all, "fp32": api.export_float(qm)}
    ms = api.latency_ms(files, held, threads=2)
    row["latency_ms_bs1_2thr"] = ms
    row["size_bytes"] = {k: len(m.data) if isinstance(m, api.ExportedModel) else len(m.SerializeToString())
                         for k, m in files.items()}
    print(f"{bits}: latency bs1 " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    return row


def markdown(res: dict) -> str:
    out = [f"# EfficientNet-Lite0: per-layer sensitivity and auto-fallback\n",
           f"{res['machine']}. Target: top-1 agreement >= {res['min_agreement']} on held-out crops, at most "
           f"{res['max_float_layers']} float layers. Sensitivity on {res['samples']} held-out crops.\n",
           "| bits | agree before | KL before | agree after | KL after | met | float layers | sensitivity s | "
           "latency all-INT8 / fallback / FP32 ms | size all-INT8 / fallback MB | ORT vs sim, fallback file |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lat, size = r["latency_ms_bs1_2thr"], r["size_bytes"]
        out.append(f"| {r['bits']} | {r['before']['top1_agreement']:.4f} | {r['before']['kl']:.5f} | "
                   f"{r['after']['top1_agreement']:.4f} | {r['after']['kl']:.5f} | {r['met']} | "
                   f"{', '.join(r['chosen']) or '-'} | {r['sensitivity_s']:.0f} | "
                   f"{lat['all_int8']:.2f} / {lat.get('fallback', lat['all_int8']):.2f} / {lat['fp32']:.2f} | "
                   f"{size['all_int8'] / 1e6:.2f} / {size.get('fallback', size['all_int8']) / 1e6:.2f} | "
                   + (f"{r['fallback_ort_vs_sim']['within_1_step']:.3f} within 1 step, float ops in ORT: "
                      f"{', '.join(r['fallback_ort_vs_sim']['coverage']['flops']['float_ops']) or '-'} |"
                      if r.get("fallback_ort_vs_sim") else "- |"))
    out.append("\nORT vs sim: ONNX Runtime on the fallback file against the simulation, share of output elements "
               "within one step (1.000 = bit-exact). ONNX Runtime (WeightBiasQuantization) re-quantizes a float Conv "
               "that sits between a DequantizeLinear and a QuantizeLinear per tensor, so only the float layers listed "
               "there run float in ORT.")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="W8A8,W4A8")
    ap.add_argument("--samples", type=int, default=32, help="held-out crops for the sensitivity (default 32)")
    ap.add_argument("--eval", type=int, default=256, help="held-out crops for accuracy (default 256)")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--min-agreement", type=float, default=0.99)
    ap.add_argument("--max-float-layers", type=int, default=8)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="64 calibration, 64 eval, 16 sensitivity crops (smoke run)")
    a = ap.parse_args()
    if a.quick:
        a.num_calib, a.eval, a.samples = 64, 64, 16
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(2)
    res = dict(machine=machine(), samples=a.samples, eval=a.eval, min_agreement=a.min_agreement,
               max_float_layers=a.max_float_layers, runs=[])
    model = EXAMPLES["efficientnet-lite0"].build()
    for bits in a.bits.split(","):
        res["runs"].append(run(bits.strip().upper(), a, model))
        write_json(res, os.path.join(a.out, "sensitivity.json"))
    with open(os.path.join(a.out, "sensitivity.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
