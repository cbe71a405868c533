"""Issue #3 figures for the TensorRT layout on EfficientNet-Lite0 with real bundled photos.

    python bench/bench_trt.py [--out bench/results] [--quick] [--methods qwt2,none]

For W8A8 and each method, calibrated on the same 512 real crops:
1. the TensorRT rule checker on the --target trt graph (errors must be 0; warnings listed);
2. ONNX Runtime (float simulation, QDQ fusion off) on the trt graph vs the PyTorch
   simulation of the same layout: fraction of logits within 1 output step, on the 525
   held-out crops. As qwt-export's check, each quantized Conv/Gemm runs as TensorRT's kernel
   computes it (exact INT32 accumulator x float32 scale + float bias; see
   pipeline.trt_float_simulation); the shipped graph run as written (float convolution of
   dequantized values) is recorded too, as trt_plain_float_vs_sim;
3. top-1 agreement with FP32 on the 525 held-out crops, for the trt layout (that ORT float
   simulation) and the ort
   layout (ORT with its integer kernels), and their difference in points.
No TensorRT engine is built or timed here: TensorRT cannot be installed on these machines.
Everything is measured in this run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from calibration.data import batches  # noqa: E402
from calibration.photos import calibration_photos, crops, evaluation_photos  # noqa: E402
from calibration.preprocess import LITE0  # noqa: E402
from calibration.sequential import CalibrationSettings, calibrate  # noqa: E402
from graph_passes import check_trt_rules, fold_cwac_into_weight_scales  # noqa: E402
from graph_passes.check_trt_rules import errors  # noqa: E402
from qwt_deploy.check.agreement import compare, kl_divergence  # noqa: E402
from qwt_deploy.examples.efficientnet_lite0 import build  # noqa: E402
from qwt_deploy.export.qdq import export_onnx  # noqa: E402
from qwt_deploy.load.capture import capture, export_program  # noqa: E402
from qwt_deploy.pipeline import trt_float_simulation  # noqa: E402
from qwt_deploy.quantize.placement import plan_for_ort, plan_for_trt  # noqa: E402
from qwt_deploy.quantize.simulate import SimulatedModel  # noqa: E402
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run  # noqa: E402


def logits(model_bytes: bytes, x: np.ndarray, float_sim: bool = False, session=None) -> np.ndarray:
    s = session or SessionFromOnnx(model_bytes, threads=2, allow_spinning=False, disable_qdq_fusion=float_sim)()
    return np.concatenate([run(s, x[i:i + 32]) for i in range(0, len(x), 32)])


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
    graph = capture(export_program(build(), torch.zeros(2, 3, 224, 224)))
    ref = logits(export_onnx(graph).SerializeToString(), xe)

    for method in a.methods.split(","):
        row = {}
        for target, planner in (("ort", plan_for_ort), ("trt", plan_for_trt)):
            plan = planner(graph)
            t = time.perf_counter()
            r = calibrate(graph, plan, batches(xc, 32), CalibrationSettings(method=method))
            model, _ = fold_cwac_into_weight_scales(export_onnx(graph, plan, r.params))
            # trt: ORT float simulation as qwt-export's check runs it (exact INT32 accumulators)
            got = logits(None, xe, session=trt_float_simulation(model, 2)) if target == "trt" else \
                logits(model.SerializeToString(), xe)
            row[f"{target}_agreement"] = float(np.mean(got.argmax(1) == ref.argmax(1)))
            row[f"{target}_kl"] = kl_divergence(ref, got)
            row[f"{target}_calib_s"] = r.seconds
            if target == "trt":
                findings = check_trt_rules(model)
                row["trt_rule_errors"] = len(errors(findings))
                row["trt_rule_warnings"] = [f"{f.rule} @ {f.node}" for f in findings if f.severity == "warning"]
                with torch.no_grad():
                    sim = SimulatedModel(graph, plan, r.params)
                    sim_logits = np.concatenate([sim(torch.from_numpy(xe[i:i + 32])).numpy()
                                                 for i in range(0, len(xe), 32)])
                agr = compare(sim_logits, got)
                row["trt_ort_vs_sim"] = agr.to_dict()
                plain = logits(model.SerializeToString(), xe, float_sim=True)  # shipped graph as written
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
