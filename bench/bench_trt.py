"""Issue #3 figures for the TensorRT layout on EfficientNet-Lite0 with real bundled photos.

    python bench/bench_trt.py [--out bench/results] [--quick] [--methods qwt2,none]

For W8A8 and each method, calibrated on the same 512 real crops, each file made by the public
API exactly as ``qwt-export --target trt|ort`` makes it (``api.quantize`` -> ``api.export``):
1. the TensorRT rule checker on the --target trt graph (run by ``api.export``: an error fails
   the export, so errors are 0; warnings listed);
2. ONNX Runtime (float simulation, QDQ fusion off) on the trt graph vs the PyTorch
   simulation of the same layout: fraction of logits within 1 output step, on the 525
   held-out crops. As qwt-export's check, each quantized Conv/Gemm runs as TensorRT's kernel
   computes it (exact INT32 accumulator x float32 scale + float bias; ``api.check_session``,
   i.e. the trt target's runtime copy); the shipped graph run as written (float convolution of
   dequantized values) is recorded too, as trt_plain_float_vs_sim;
3. top-1 agreement with FP32 on the 525 held-out crops, for the trt layout (that ORT float
   simulation) and the ort layout (ORT with its integer kernels, on the shipped graph incl.
   the channel-pad pass), and their difference in points.
No TensorRT engine is built or timed here: TensorRT cannot be installed on these machines.
Everything is measured in this run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from qwt_deploy import api
from qwt_deploy.calibration.sequential import CalibrationSettings
from qwt_deploy.comparison.agreement import compare, kl_divergence
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.targets import TRT
from qwt_deploy.data.photos import calibration_photos, crops, evaluation_photos
from qwt_deploy.data.preprocess import LITE0
from qwt_deploy.examples.efficientnet_lite0 import build
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run


def logits(session, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run(session, x[i:i + 32]) for i in range(0, len(x), 32)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="64 calibration / 128 eval crops (smoke run)")
    ap.add_argument("--methods", default="qwt2,none")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(2)
    n_cal, n_eval = (64, 128) if a.quick else (512, 525)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "calibration_crops": n_cal, "eval_crops": n_eval, "rows": {}}
    xc = crops(calibration_photos(), n_cal, LITE0, seed=0)
    xe = crops(evaluation_photos(), n_eval, LITE0, seed=1)
    model = build()
    ref = None

    for method in a.methods.split(","):
        row = {}
        for target in ("ort", "trt"):
            t = time.perf_counter()
            cfg = QuantizeConfig(target=target, settings=CalibrationSettings(method=method), num_calib=n_cal, threads=2)
            qm = api.quantize(model, xc, cfg)
            ex = api.export(qm)
            if ref is None:
                ref = logits(SessionFromOnnx(api.export_float(qm).SerializeToString(), threads=2,
                                             allow_spinning=False)(), xe)
            # ort: the file with ORT's integer kernels; trt: ORT float simulation as qwt-export's check runs it
            got = logits(api.check_session(ex, 2), xe)
            row[f"{target}_agreement"] = float(np.mean(got.argmax(1) == ref.argmax(1)))
            row[f"{target}_kl"] = kl_divergence(ref, got)
            row[f"{target}_calib_s"] = qm.result.seconds
            if qm.target is TRT:  # the TensorRT layout: rule findings and its float-simulation check
                row["trt_rule_errors"] = ex.rules["errors"]
                row["trt_rule_warnings"] = [f"{f['rule']} @ {f['node']}" for f in ex.rules["findings"]
                                            if f["severity"] == "warning"]
                with torch.no_grad():
                    sim = qm.simulation()
                    sim_logits = np.concatenate([sim(torch.from_numpy(xe[i:i + 32])).numpy()
                                                 for i in range(0, len(xe), 32)])
                agr = compare(sim_logits, got)
                row["trt_ort_vs_sim"] = agr.to_dict()
                # the shipped graph as written (what api.verify records as plain_float)
                plain = logits(SessionFromOnnx(ex.data, threads=2, allow_spinning=False, disable_qdq_fusion=True)(), xe)
                row["trt_plain_float_vs_sim"] = compare(sim_logits, plain).to_dict()
                row["trt_plain_float_agreement"] = float(np.mean(plain.argmax(1) == ref.argmax(1)))
            print(f"{method:16s} {target}: agreement {row[f'{target}_agreement']:.4f}  KL {row[f'{target}_kl']:.5f}  "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        row["trt_minus_ort_points"] = 100 * (row["trt_agreement"] - row["ort_agreement"])
        print(f"{method:16s} rule errors {row['trt_rule_errors']}, warnings {len(row['trt_rule_warnings'])}; "
              f"ORT float sim vs PyTorch sim within 1 step {row['trt_ort_vs_sim']['within_1_step']:.5f} "
              f"(max {row['trt_ort_vs_sim']['max_steps']:.3f} steps); trt - ort agreement "
              f"{row['trt_minus_ort_points']:+.2f} points", flush=True)
        res["rows"][f"W8A8 {method}"] = row

    with open(os.path.join(a.out, "trt.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
