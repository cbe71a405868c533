"""Issue #5 figures: QwT (v1) block branches vs QwT-v2 CWAC vs plain PTQ, per model.

    python bench/bench_methods.py [--models lite0,fashion-cnn,fashion-vit,minilm] [--quick] [--out bench/results]

For each available model and each method (none, bias-correction, qwt, qwt2, qwt,qwt2) at
W8A8 and W4A8 (emulated), through the public API exactly as qwt-export runs it
(``api.quantize`` -> ``api.export`` with --target ort: capture, QwT branch insertion, ort
placement, sequential calibrate+compensate, QDQ export, CWAC fold, the channel-pad pass,
full onnx check), each file run in the session ``api.check_session`` gives it, it measures:

- accuracy: EfficientNet-Lite0 top-1 agreement with FP32 (and KL) on held-out real crops;
  Fashion-MNIST CNN/ViT top-1 on the 10,000 test images (real labels); MiniLM (if its example
  is registered) mean cosine of the output to FP32;
- extra parameters as % of the model: deployed (QwT branches; CWAC folds into existing
  scales/biases) and before folding (CWAC's 2 per channel + branches);
- ONNX Runtime CPU latency of every method's deployed file (the graph qwt-export ships)
  against plain INT8 (``none``), batch 1, measured in interleaved rounds in one process with
  allow_spinning=0;
- calibration + compensation wall time (the sequential loop incl. the branch fits).

Models whose weights/data are missing are skipped with the reason (the Fashion-MNIST weights
come from scripts/train_fashion_mnist.py; the data from the Debian package). Writes
``methods.json`` in --out and prints markdown tables. Nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback

import numpy as np
import torch

from qwt_deploy import api
from qwt_deploy.calibration.sequential import CalibrationSettings
from qwt_deploy.comparison.agreement import kl_divergence
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.data.inputs import InputSet
from qwt_deploy.quantization.placement import DEFAULT_KEEP_FLOAT
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, interleaved_latency_ms, run

METHODS = ["none", "bias-correction", "qwt", "qwt2", "qwt,qwt2"]
BITS = [(8, 8), (4, 8)]
MODEL_KEYS = {"lite0": "efficientnet-lite0", "fashion-cnn": "fashion-cnn", "fashion-vit": "fashion-vit",
              "minilm": "minilm"}


def outputs(session, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    return np.concatenate([run(session, x[i:i + chunk]) for i in range(0, len(x), chunk)])


def find_example(key: str):
    from qwt_deploy.examples import EXAMPLES

    name = MODEL_KEYS.get(key, key)
    if name in EXAMPLES:
        return EXAMPLES[name]
    for k, ex in EXAMPLES.items():  # e.g. "all-minilm-l6-v2"
        if name in k:
            return ex
    return None


def deploy(ex, model, calibration, bits, method: str, threads: int) -> api.ExportedModel:
    """The file ``qwt-export --example <ex> --target ort --method <method>`` ships (metadata aside)."""
    cfg = QuantizeConfig(target="ort", settings=CalibrationSettings(w_bits=bits[0], a_bits=bits[1], method=method),
                         num_calib=len(calibration), threads=threads, example_shape=tuple(ex.input_shape) or (3, 224, 224),
                         keep_float=ex.keep_float if ex.keep_float is not None else DEFAULT_KEEP_FLOAT)
    return api.export(api.quantize(model, calibration, cfg))


def method_row(bits, method: str, accuracy: dict, exported: api.ExportedModel) -> dict:
    """One table row: the accuracy figures plus calibration time, size and the extra
    parameters (qwt-export's report: api.model_report), the same for every model."""
    rep = api.model_report(exported)
    comp = rep["compensation"]
    return dict(bits=f"W{bits[0]}A{bits[1]}", method=method, **accuracy, calib_s=exported.quantized.result.seconds,
                nodes=rep["node_count"]["folded"], size_mb=len(exported.data) / 1e6,
                extra_params_deployed=comp["extra_params_deployed"],
                extra_params_deployed_pct=comp["extra_params_deployed_pct"],
                compensation_params_pct=comp["compensation_params_pct"], model_params=comp["model_params"],
                blocks_found=comp["blocks_found"], blocks_kept=comp["blocks_kept"],
                block_r2=[round(b["r2"], 4) for b in comp["blocks"]])


def measure(ex, ref: np.ndarray, got: np.ndarray, labels) -> dict:
    if labels is not None:
        return dict(measure="top-1 accuracy", value=float(np.mean(got.argmax(-1) == labels)))
    if "cosine" in ex.accuracy_measure.lower():
        a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        return dict(measure="mean cosine to FP32", value=float(cos.mean()))
    return dict(measure="top-1 agreement with FP32", value=float(np.mean(got.argmax(-1) == ref.argmax(-1))),
                kl=kl_divergence(ref, got))


def bench_minilm(quick: bool, threads: int, log) -> dict:
    """all-MiniLM-L6-v2 (token ids + mask inputs) through the API with the example's settings
    (as ``qwt-export --example minilm``); cosine of the sentence embedding to FP32 on held-out
    pydoc sentences."""
    try:
        from qwt_deploy.data.text import split_sentences, tokenize
        from qwt_deploy.examples import minilm
        ex = find_example("minilm")
        model, tok = ex.build(), minilm.load_tokenizer()
    except Exception as e:
        return dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    n_cal, n_eval = (64, 128) if quick else (512, 1000)
    cal_s, ev_s = split_sentences(n_cal, n_eval)
    calib = InputSet(("input_ids", "attention_mask"), tokenize(tok, cal_s))
    ei, em = tokenize(tok, ev_s)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(ei[i:i + 64]), torch.from_numpy(em[i:i + 64])).numpy()
                              for i in range(0, len(ei), 64)])
    res = dict(example="all-MiniLM-L6-v2", accuracy_measure="mean cosine of the sentence embedding to FP32 (pydoc sentences)",
               calibration_samples=len(cal_s), eval_samples=len(ev_s), rows=[], fp32=dict(value=1.0))
    log(f"\n## MiniLM: {len(cal_s)} calibration / {len(ev_s)} evaluation sentences")
    feeds = {"input_ids": ei[:1], "attention_mask": em[:1]}
    for bits in BITS:
        sessions = {}
        for method in METHODS:
            exported = deploy(ex, model, calib, bits, method, threads)
            sessions[method] = api.check_session(exported, threads)
            got = minilm.embed_ort(sessions[method], ei, em)
            cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-30)
            row = method_row(bits, method, dict(measure="mean cosine to FP32", value=float(cos.mean()),
                                                min_cosine=float(cos.min())), exported)
            res["rows"].append(row)
            log(f"{row['bits']} {method:16s} cosine {row['value']:.5f}  +params {row['extra_params_deployed_pct']:.2f}%  "
                f"calib {row['calib_s']:.1f}s  blocks kept {row['blocks_kept']}/{row['blocks_found']}")
        ms = interleaved_latency_ms(sessions, feeds, rounds=9 if quick else 21, per_round=10)
        _record_latency(res, bits, ms, log)
        del sessions
    return res


def bench_model(key: str, quick: bool, threads: int, log) -> dict:
    if key == "minilm":
        return bench_minilm(quick, threads, log)
    ex = find_example(key)
    if ex is None:
        return dict(skipped=f"no example '{MODEL_KEYS.get(key, key)}' registered in qwt_deploy.examples")
    try:
        model = ex.build()
    except Exception as e:  # missing weights / packages: report, do not fail the other models
        return dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    lite = ex.name == "efficientnet-lite0"
    n_cal = 64 if quick else 512
    n_eval = (128 if lite else 2000) if quick else None  # None: the example's full evaluation set
    try:
        xc = ex.calibration(n_cal, 0)
        xe, ye = ex.evaluation(n_eval, 1)
    except Exception as e:
        return dict(skipped=f"data: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    ready = {(BITS[0], METHODS[0]): deploy(ex, model, xc, BITS[0], METHODS[0], threads)}
    fp32 = api.export_float(ready[BITS[0], METHODS[0]].quantized)  # the captured model in FP32 (any method's)
    ref = outputs(SessionFromOnnx(fp32.SerializeToString(), threads, allow_spinning=False)(), xe)
    res = dict(example=ex.name, accuracy_measure=ex.accuracy_measure, calibration_samples=int(len(xc)),
               eval_samples=int(len(xe)), rows=[])
    res["fp32"] = measure(ex, ref, ref, ye)
    log(f"\n## {ex.name}: {len(xc)} calibration samples, {len(xe)} evaluation samples; FP32 {res['fp32']}")
    for bits in BITS:
        sessions = {}
        for method in METHODS:
            exported = ready.pop((bits, method), None) or deploy(ex, model, xc, bits, method, threads)
            sessions[method] = api.check_session(exported, threads)
            row = method_row(bits, method, measure(ex, ref, outputs(sessions[method], xe), ye), exported)
            res["rows"].append(row)
            log(f"{row['bits']} {method:16s} {row['measure']} {row['value']:.4f}  +params {row['extra_params_deployed_pct']:.2f}% "
                f"(unfolded {row['compensation_params_pct']:.2f}%)  calib {row['calib_s']:.1f}s  "
                f"blocks kept {row['blocks_kept']}/{row['blocks_found']}")
        ms = interleaved_latency_ms(sessions, xe[:1], rounds=9 if quick else 21, per_round=10)
        _record_latency(res, bits, ms, log)
        del sessions
    return res


def _record_latency(res: dict, bits: tuple, ms: dict, log) -> None:
    """Store each method's batch-1 latency, and its ratio to plain INT8 (``none``), in the rows of ``bits``."""
    for row in res["rows"]:
        if row["bits"] == f"W{bits[0]}A{bits[1]}":
            row["latency_ms_bs1"] = ms[row["method"]]
            row["latency_vs_none"] = ms[row["method"]] / ms["none"]
    log(f"{bits} latency bs1 (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))


def markdown(name: str, r: dict) -> str:
    if "skipped" in r:
        return f"### {name}\nskipped: {r['skipped']}\n"
    lines = [f"### {r['example']} ({r['accuracy_measure']}; {r['calibration_samples']} calibration / "
             f"{r['eval_samples']} evaluation samples; FP32 {r['fp32']['value']:.4f})", "",
             "| bits | method | accuracy | extra params deployed | compensation params (before fold) | "
             "QwT blocks kept | ORT latency bs1 vs none | calib+comp s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        kept = f"{row['blocks_kept']}/{row['blocks_found']}" if row["blocks_found"] else "-"
        lines.append(f"| {row['bits']} | {row['method']} | {row['value']:.4f} | {row['extra_params_deployed_pct']:.2f}% "
                     f"({row['extra_params_deployed']:,}) | {row['compensation_params_pct']:.2f}% | {kept} | "
                     f"{row.get('latency_vs_none', float('nan')):.3f}x ({row.get('latency_ms_bs1', float('nan')):.3f} ms) | "
                     f"{row['calib_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lite0,fashion-cnn,fashion-vit,minilm",
                    help="comma-separated: lite0, fashion-cnn, fashion-vit, minilm (default all)")
    ap.add_argument("--quick", action="store_true", help="64 calibration samples; 128 Lite0 crops / 2000 test images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)  # api.quantize sets it too (QuantizeConfig.threads)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "methods.json")
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "threads": a.threads, "quick": a.quick, "models": {}}
    for key in [m.strip() for m in a.models.split(",") if m.strip()]:
        t = time.perf_counter()
        try:
            r = bench_model(key, a.quick, a.threads, lambda s: print(s, flush=True))
        except Exception as e:
            traceback.print_exc()
            r = dict(skipped=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        r["wall_s"] = time.perf_counter() - t
        res["models"][key] = r
        with open(path, "w") as f:  # after every model, so a long run keeps what it measured
            json.dump(res, f, indent=2)
    print()
    for key, r in res["models"].items():
        print(markdown(key, r))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
