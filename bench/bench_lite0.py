"""Issue #2 figures on EfficientNet-Lite0 with real bundled photos.

    python bench/bench_lite0.py [--out bench/results] [--quick]

1. W8A8: top-1 agreement with FP32 on held-out crops for onnxruntime quantize_static
   (QDQ, per-channel, U8S8, same calibration crops), ours --method none, bias-correction, qwt2.
2. W4A8 and W6A6 (emulated): none / bias-correction / qwt2 -- agreement, mean KL to FP32,
   top-1 on the 20 labelled ImageNet images.
3. Latency: ONNX Runtime CPU, 2 threads, batch 1 and 8, FP32 vs quantize_static vs ours,
   interleaved rounds in one process (allow_spinning=0).
4. Wall time of the whole `qwt-export --example efficientnet-lite0` command.
Our files are made by the public API exactly as qwt-export makes them for --target ort
(``api.quantize`` -> ``api.export``, channel-pad pass included) and run in the session
``api.check_session`` gives them. Everything is measured on this machine in this run; nothing
is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from qwt_deploy import api
from qwt_deploy.calibration.sequential import CalibrationSettings
from qwt_deploy.comparison.agreement import kl_divergence
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.data.photos import calibration_photos, crops, evaluation_photos, labelled_evaluation_photos
from qwt_deploy.data.preprocess import LITE0
from qwt_deploy.examples.efficientnet_lite0 import build
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, interleaved_latency_ms, run


def logits(session, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run(session, x[i:i + 32]) for i in range(0, len(x), 32)])


def quantize_static_model(fp32_path: str, calib: np.ndarray, out: str, input_name: str = "input") -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out + ".pre.onnx"
    quant_pre_process(fp32_path, pre)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    with open(out, "rb") as f:
        return f.read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="64 calibration / 128 eval crops (smoke run)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(2)
    n_cal, n_eval = (64, 128) if a.quick else (512, 525)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "calibration_crops": n_cal, "eval_crops": n_eval}

    xc = crops(calibration_photos(), n_cal, LITE0, seed=0)
    xe = crops(evaluation_photos(), n_eval, LITE0, seed=1)
    lab = labelled_evaluation_photos()
    xl = np.stack([LITE0.center(Image.open(p.path)) for p in lab])
    yl = np.array([p.label for p in lab])
    res["calibration_photos"] = len(calibration_photos())
    res["eval_photos"] = len(evaluation_photos())

    model = build()

    def deploy(bits, method) -> api.ExportedModel:
        """What ``qwt-export --example efficientnet-lite0 --method <method>`` ships (metadata aside)."""
        settings = CalibrationSettings(w_bits=bits[0], a_bits=bits[1], method=method)
        return api.export(api.quantize(model, xc, QuantizeConfig(target="ort", settings=settings, num_calib=n_cal)))

    ready = {((8, 8), "none"): deploy((8, 8), "none")}  # the first row below; any quantized model gives FP32
    fp32 = api.export_float(ready[(8, 8), "none"].quantized).SerializeToString()  # the captured model in FP32
    tmp = tempfile.mkdtemp()
    fp32_path = os.path.join(tmp, "fp32.onnx")
    with open(fp32_path, "wb") as f:
        f.write(fp32)
    fp32_sess = SessionFromOnnx(fp32, threads=2)()
    ref_e, ref_l = logits(fp32_sess, xe), logits(fp32_sess, xl)
    res["fp32_top1_labelled"] = float(np.mean(ref_l.argmax(1) == yl))

    def score(name, session, size_bytes, seconds=None):
        le, ll = logits(session, xe), logits(session, xl)
        row = dict(agreement=float(np.mean(le.argmax(1) == ref_e.argmax(1))), kl=kl_divergence(ref_e, le),
                   top1_labelled=float(np.mean(ll.argmax(1) == yl)), size_mb=size_bytes / 1e6)
        if seconds is not None:
            row["calib_s"] = seconds
        res.setdefault("rows", {})[name] = row
        print(f"{name:34s} agree {row['agreement']:.4f}  KL {row['kl']:.5f}  top1@20 {row['top1_labelled']:.2f}", flush=True)
        return row

    models = {}
    t = time.perf_counter()
    models["quantize_static"] = quantize_static_model(fp32_path, xc, os.path.join(tmp, "qs.onnx"))
    score("W8A8 onnxruntime quantize_static", SessionFromOnnx(models["quantize_static"], threads=2)(),
          len(models["quantize_static"]), time.perf_counter() - t)

    for bits in [(8, 8), (4, 8), (6, 6)]:
        for method in ["none", "bias-correction", "qwt2"]:
            ex = ready.pop((bits, method), None) or deploy(bits, method)
            name = f"W{bits[0]}A{bits[1]} qwt-deploy {method}"
            score(name, api.check_session(ex, 2), len(ex.data), ex.quantized.result.seconds)
            if bits == (8, 8) and method == "qwt2":
                models["qwt2"] = ex

    # latency, interleaved
    lat = {}
    for bs in (1, 8):
        sess = {"fp32": SessionFromOnnx(fp32, threads=2, allow_spinning=False)(),
                "quantize_static": SessionFromOnnx(models["quantize_static"], threads=2, allow_spinning=False)(),
                "qwt2": api.check_session(models["qwt2"], 2)}  # the shipped file, as qwt-export's check runs it
        ms = interleaved_latency_ms(sess, xe[:bs], rounds=15, per_round=10 if bs == 1 else 3)
        lat[f"bs{bs}"] = dict(ms, qwt2_over_fp32=ms["qwt2"] / ms["fp32"],
                              qwt2_over_quantize_static=ms["qwt2"] / ms["quantize_static"])
        print(f"latency bs{bs}: {ms}  ratios {lat[f'bs{bs}']['qwt2_over_fp32']:.3f} vs FP32, "
              f"{lat[f'bs{bs}']['qwt2_over_quantize_static']:.3f} vs quantize_static", flush=True)
        del sess
    res["latency_ms"] = lat

    # whole command wall time
    out = os.path.join(tmp, "lite0.int8.onnx")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qwt_deploy.cli.export", "--example", "efficientnet-lite0", "-o", out,
                        "--quiet", "--num-calib", str(n_cal)], capture_output=True, text=True)
    res["qwt_export_wall_s"] = time.perf_counter() - t
    res["qwt_export_rc"] = p.returncode
    print(p.stdout[-2500:], p.stderr[-1000:])
    with open(out.replace(".onnx", ".report.json")) as f:
        res["qwt_export_report"] = json.load(f)
    print(f"qwt-export wall: {res['qwt_export_wall_s']:.1f} s", flush=True)

    with open(os.path.join(a.out, "lite0.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
