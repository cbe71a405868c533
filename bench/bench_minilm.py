"""Transformer figures on all-MiniLM-L6-v2 with real English sentences (issue #5).

    python bench/bench_minilm.py [--num-calib 256] [--methods none,bias-correction,qwt2] [--bits W8A8,W4A8]

Calibration: sentences of Python's bundled pydoc topics; evaluation: 256 *other* sentences of
the same text (disjoint, fixed split). Each INT8 model is made by the public API exactly as
``qwt-export --example minilm --target ort`` makes it (``api.quantize`` -> ``api.export``) and
run in the session ``api.check_session`` gives it. Accuracy = cosine between that file's
sentence embedding (ONNX Runtime) and the FP32 PyTorch embedding. Reference: onnxruntime
``quantize_dynamic`` (QInt8, per-tensor weights, dynamic activations) on our FP32 ONNX
(``api.export_float``). Latency: ONNX Runtime CPU, interleaved rounds in one process
(allow_spinning=0), FP32 vs INT8, batch 1 (one sentence) and batch 8. Everything is measured
in this run; nothing hard-coded.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile

import numpy as np
import onnx
import torch

from qwt_deploy import api
from qwt_deploy.calibration.sequential import CalibrationSettings
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.data.inputs import InputSet
from qwt_deploy.data.text import split_sentences, tokenize
from qwt_deploy.examples import minilm
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, interleaved_latency_ms

TRANSFORMER_KEEP_FLOAT = minilm.TRANSFORMER_KEEP_FLOAT


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--num-eval", type=int, default=256)
    p.add_argument("--methods", default="none,bias-correction,qwt2")
    p.add_argument("--bits", default="W8A8")
    p.add_argument("--keep-float", default=",".join(TRANSFORMER_KEEP_FLOAT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cwac-reference", default="same-input", choices=("same-input", "float-input"))
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "minilm.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    keep_float = tuple(k for k in a.keep_float.split(",") if k)

    tok, model = minilm.load_tokenizer(), minilm.build()
    calib, held_out = split_sentences(a.num_calib, a.num_eval)
    calib_inputs = InputSet(("input_ids", "attention_mask"), tokenize(tok, calib))
    ei, em = tokenize(tok, held_out)
    with torch.no_grad():
        fp = np.concatenate([model(torch.from_numpy(ei[i:i + 64]), torch.from_numpy(em[i:i + 64])).numpy()
                             for i in range(0, len(ei), 64)])

    def deploy(bits: str, method: str) -> api.ExportedModel:
        settings = CalibrationSettings(w_bits=int(bits[1]), a_bits=int(bits[3]), method=method, reference=a.cwac_reference)
        cfg = QuantizeConfig(target="ort", settings=settings, num_calib=len(calib), threads=a.threads,
                             keep_float=keep_float)
        return api.export(api.quantize(model, calib_inputs, cfg))

    runs = [(bits, method) for bits in a.bits.split(",") for method in a.methods.split(",")]
    ready = {runs[0]: deploy(*runs[0])}
    first = ready[runs[0]].quantized
    fp32 = api.export_float(first)  # the captured model in FP32
    fp32_sess = SessionFromOnnx(fp32.SerializeToString(), a.threads, allow_spinning=False)()
    fp32_cos = cosines(minilm.embed_ort(fp32_sess, ei, em), fp)
    report = dict(machine=platform.processor() or platform.machine(), threads=a.threads,
                  cwac_reference=a.cwac_reference, calib_sentences=len(calib),
                  eval_sentences=len(held_out), keep_float=list(keep_float), capture_s=first.timing["load_capture"],
                  fp32_onnx_min_cosine=float(fp32_cos.min()), rows=[])
    print(f"FP32 ONNX vs PyTorch: min cosine {fp32_cos.min():.6f}; {len(calib)} calibration / {len(held_out)} held-out sentences")
    del first

    # reference: ORT dynamic quantization of the same FP32 graph
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as td:
        src, dst = os.path.join(td, "fp32.onnx"), os.path.join(td, "dyn.onnx")
        onnx.save(fp32, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        dyn_bytes = open(dst, "rb").read()
    dyn_sess = SessionFromOnnx(dyn_bytes, a.threads, allow_spinning=False)()
    c = cosines(minilm.embed_ort(dyn_sess, ei, em), fp)
    report["rows"].append(dict(method="ort quantize_dynamic QInt8", bits="W8A8-dyn", cos_mean=float(c.mean()),
                               cos_min=float(c.min()), size_mb=len(dyn_bytes) / 1e6))
    print(f"{'ort quantize_dynamic':24s} cos mean {c.mean():.5f} min {c.min():.5f}")

    sessions = {}
    for bits, method in runs:
        ex = ready.pop((bits, method), None) or deploy(bits, method)
        with tempfile.TemporaryDirectory() as td:
            opt = os.path.join(td, "opt.onnx")
            sess = api.check_session(ex, a.threads, optimized_model_path=opt)
            optimized = onnx.load(opt)
        ops = collections.Counter(n.op_type for n in optimized.graph.node)
        c = cosines(minilm.embed_ort(sess, ei, em), fp)
        row = dict(method=method, bits=bits, cos_mean=float(c.mean()), cos_min=float(c.min()),
                   cos_p05=float(np.percentile(c, 5)), calibrate_s=ex.quantized.result.seconds,
                   export_fold_s=ex.seconds, folded_layers=ex.n_folded, size_mb=len(ex.data) / 1e6,
                   integer_kernels={k: v for k, v in ops.items() if k in ("MatMulIntegerToFloat", "QLinearMatMul",
                                                                           "QGemm", "MatMulInteger", "QLinearAdd")},
                   float_matmuls=ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) + ops.get("Gemm", 0),
                   coverage=ex.quantized.target.coverage(optimized))
        report["rows"].append(row)
        print(f"{method + ' ' + bits:24s} cos mean {c.mean():.5f} min {c.min():.5f} p5 {row['cos_p05']:.5f} "
              f"calib {row['calibrate_s']:.1f}s kernels {row['integer_kernels']} float matmuls {row['float_matmuls']}",
              flush=True)
        if bits == "W8A8" and method == a.methods.split(",")[-1]:
            sessions["int8"] = sess
    if not a.no_latency and sessions:
        sessions["fp32"] = fp32_sess
        sessions["ort_dynamic"] = dyn_sess
        lat = {}
        for b in (1, 8):
            feed = {"input_ids": ei[:b, :int(em[:b].sum(1).max())], "attention_mask": em[:b, :int(em[:b].sum(1).max())]}
            ms = interleaved_latency_ms(sessions, feed, rounds=9, per_round=10)
            lat[f"batch{b}"] = dict(ms, int8_over_fp32=ms["int8"] / ms["fp32"], tokens=int(feed["input_ids"].shape[1]))
            print(f"latency batch {b} ({feed['input_ids'].shape[1]} tokens): " +
                  ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()) + f"; int8/fp32 {ms['int8'] / ms['fp32']:.3f}")
        report["latency_ms"] = lat
    report["size_mb"] = dict(fp32=len(fp32.SerializeToString()) / 1e6)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
