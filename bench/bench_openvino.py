"""OpenVINO as a second CPU runtime for the same INT8 QDQ file (issue #14), on EfficientNet-Lite0
with real held-out photos.

    python bench/bench_openvino.py                  # 512 calibration / 525 held-out crops (~15 min here)
    python bench/bench_openvino.py --quick          # 64 / 128 crops, fewer timing rounds (smoke run)
    python bench/bench_openvino.py --skip-nncf      # without the NNCF row

Bench-only dependency: NNCF (``pip install nncf``), for the ``nncf.quantize`` row only; it is not a
dependency of qwt-deploy. OpenVINO itself is the ``[openvino]`` extra.

What it measures, all in this one run (nothing hard-coded):

1. Latency of ONNX Runtime and OpenVINO x FP32 / INT8 x batch 1 / 8, every session alive in one
   process and timed in interleaved rounds (``runtime.onnxruntime.interleaved_samples_ms``; ORT
   sessions with ``session.intra_op.allow_spinning=0`` so an idle one does not steal the other's
   cores). OpenVINO FP32 twice: with the f32 hint (what accuracy checks use) and with its default
   (bf16 float layers on a CPU with BF16). INT8 = qwt2 files as qwt-export ships them, ``--target
   ort`` and ``--target trt``. Figure 1: OpenVINO on the ort file <= 0.65x ORT on it, <= 0.45x
   OpenVINO's own f32 FP32, at batch 1.
2. Serving: ``qwt-serve --runtime openvino`` vs ``--runtime onnxruntime`` (2 threads, batching on),
   8 concurrent loopback clients posting .npy crops, the two servers measured alternately.
   Figure 2: throughput >= 1.4x, p99 <= 3x p50.
3. Agreement of OpenVINO with ONNX Runtime on the same file, in output quantization steps (all
   logits) and top-1 (all held-out crops). Figure 3: >= 99% within 1 step and >= 99% same top-1.
4. Accuracy of qwt2 vs ONNX Runtime ``quantize_static`` vs NNCF ``nncf.quantize`` (defaults), same
   FP32 ONNX and calibration crops, each file run in both runtimes: top-1 agreement with FP32 and
   mean KL to FP32 on the held-out crops, and which precision OpenVINO ran each quantized layer in.

Writes bench/results/openvino.json and bench/results/openvino.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import onnx
from onnx import numpy_helper
import torch

# run as a script, its folder is on sys.path: one quantize_static recipe for every bench
from bench_lite0 import quantize_static_model

from qwt_deploy import api
from qwt_deploy.comparison.agreement import compare, kl_divergence, output_step
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.data.photos import calibration_photos, crops, evaluation_photos
from qwt_deploy.data.preprocess import LITE0
from qwt_deploy.examples.efficientnet_lite0 import build
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, interleaved_samples_ms, run
from qwt_deploy.runtime.openvino import InferencePrecision, OpenVinoSession, layer_precisions, probe_openvino

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logits(session, x: np.ndarray, bs: int = 32) -> np.ndarray:
    return np.concatenate([run(session, x[i:i + bs]) for i in range(0, len(x), bs)])


def nncf_model(fp32: bytes, calib: np.ndarray, input_name: str) -> bytes:
    import nncf

    ds = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda x: {input_name: x})
    q = nncf.quantize(onnx.load_from_string(fp32), ds, subset_size=len(calib))  # NNCF's defaults otherwise
    return q.SerializeToString()


def machine() -> dict:
    model = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if l.startswith("Model name")), platform.processor())
    return dict(cpu=model, cores=os.cpu_count(), platform=platform.platform(), load_before=os.getloadavg())


# ---- 1. latency ------------------------------------------------------------------------------
def latency(files: dict[str, bytes], xe: np.ndarray, threads: int, rounds: int) -> dict:
    out = {}
    for bs in (1, 8):
        s = {"ort:fp32": SessionFromOnnx(files["fp32"], threads, allow_spinning=False)(),
             "ort:qwt2-ort": SessionFromOnnx(files["qwt2-ort"], threads, allow_spinning=False)(),
             "ov-f32:fp32": OpenVinoSession(files["fp32"], threads, InferencePrecision.F32),
             "ov-default:fp32": OpenVinoSession(files["fp32"], threads, InferencePrecision.DEFAULT),
             "ov:qwt2-ort": OpenVinoSession(files["qwt2-ort"], threads),
             "ov:qwt2-trt": OpenVinoSession(files["qwt2-trt"], threads)}
        samples = interleaved_samples_ms(s, xe[:bs], rounds=rounds, per_round=10 if bs == 1 else 3, warmup=3)
        med = {k: float(np.median(v.round_ms)) for k, v in samples.items()}
        # per-round ratios: both sides of a ratio ran seconds apart, so load changes cancel
        ratio = lambda a, b: float(np.median(np.array(samples[a].round_ms) / np.array(samples[b].round_ms)))  # noqa: E731
        out[f"bs{bs}"] = dict(median_ms=med, p10_run_ms={k: float(np.percentile(v.run_ms, 10)) for k, v in samples.items()},
                              ratio_to_ort_fp32={k: ratio(k, "ort:fp32") for k in s},
                              ov_int8_over_ort_int8=ratio("ov:qwt2-ort", "ort:qwt2-ort"),
                              ov_int8_over_ov_f32_fp32=ratio("ov:qwt2-ort", "ov-f32:fp32"))
        print(f"latency bs{bs}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()), flush=True)
        print(f"  OV INT8 / ORT INT8 {out[f'bs{bs}']['ov_int8_over_ort_int8']:.3f}, "
              f"OV INT8 / OV f32 FP32 {out[f'bs{bs}']['ov_int8_over_ov_f32_fp32']:.3f}", flush=True)
        del s
    return out


# ---- 2. serving ------------------------------------------------------------------------------
class Served:
    def __init__(self, model: str, runtime: str, threads: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "qwt_deploy.cli.serve", model, "--port", "0",
                                      "--threads", str(threads), "--runtime", runtime],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"qwt-serve did not start: {line!r} {self.proc.stderr.read()[-1000:]}")
        self.port = int(m.group(1))

    def stop(self):
        self.proc.terminate()
        self.proc.communicate(timeout=20)


def load(port: int, bodies: list[bytes], clients: int, per_client: int) -> dict:
    lat, errors = [], []

    def client(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(per_client):
            t0 = time.perf_counter()
            c.request("POST", "/v1/predict", body=bodies[(k * per_client + i) % len(bodies)],
                      headers={"Content-Type": "application/x-npy"})
            r = c.getresponse()
            r.read()
            lat.append(time.perf_counter() - t0)
            if r.status != 200:
                errors.append(r.status)
        c.close()

    ts = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return dict(requests=len(lat), errors=len(errors), wall_s=wall, throughput_rps=len(lat) / wall,
                p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)))


def serving(model: str, xe: np.ndarray, threads: int, rounds: int, per_client: int) -> dict:
    import io

    bodies = []
    for x in xe[:64]:
        b = io.BytesIO()
        np.save(b, x[None])
        bodies.append(b.getvalue())
    servers = {r: Served(model, r, threads) for r in ("onnxruntime", "openvino")}
    try:
        for s in servers.values():  # warm-up (first batch sizes compile nothing in ORT; OpenVINO's statics exist)
            load(s.port, bodies, 8, 4)
        runs = {r: [] for r in servers}
        for _ in range(rounds):  # alternate, so machine load hits both alike
            for r, s in servers.items():
                runs[r].append(load(s.port, bodies, 8, per_client))
    finally:
        for s in servers.values():
            s.stop()
    out = {}
    for r, rs in runs.items():
        out[r] = dict(throughput_rps=float(np.median([x["throughput_rps"] for x in rs])),
                      p50_ms=float(np.median([x["p50_ms"] for x in rs])), p99_ms=float(np.median([x["p99_ms"] for x in rs])),
                      errors=sum(x["errors"] for x in rs), rounds=rs)
    out["throughput_ratio_openvino_over_onnxruntime"] = float(np.median(
        [o["throughput_rps"] / r["throughput_rps"] for o, r in zip(runs["openvino"], runs["onnxruntime"])]))
    out["openvino_p99_over_p50"] = out["openvino"]["p99_ms"] / out["openvino"]["p50_ms"]
    print(f"serving 8 clients: ORT {out['onnxruntime']['throughput_rps']:.1f} req/s, OV {out['openvino']['throughput_rps']:.1f} "
          f"req/s (x{out['throughput_ratio_openvino_over_onnxruntime']:.2f}); OV p50 {out['openvino']['p50_ms']:.1f} "
          f"p99 {out['openvino']['p99_ms']:.1f} ms", flush=True)
    return out


# ---- 3 + 4. agreement and accuracy -----------------------------------------------------------
def accuracy(files: dict[str, bytes], steps: dict[str, float], xe: np.ndarray, threads: int) -> dict:
    ref = logits(SessionFromOnnx(files["fp32"], threads)(), xe)
    rows = {}
    for name, data in files.items():
        if name == "fp32":
            continue
        ort = logits(SessionFromOnnx(data, threads)(), xe)
        ovs = OpenVinoSession(data, threads)
        ov = logits(ovs, xe)
        step = steps.get(name) or output_step(ort)
        a = compare(ort, ov, step)
        prec = layer_precisions(ovs, onnx.load_from_string(data))
        rows[name] = dict(
            ort=dict(top1_vs_fp32=float(np.mean(ort.argmax(1) == ref.argmax(1))), kl_vs_fp32=kl_divergence(ref, ort)),
            openvino=dict(top1_vs_fp32=float(np.mean(ov.argmax(1) == ref.argmax(1))), kl_vs_fp32=kl_divergence(ref, ov)),
            openvino_vs_ort=dict(a.to_dict(), step_source="output quantizer" if steps.get(name) else "8-bit grid over ORT's range"),
            openvino_layers=dict(integer=prec.integer, quantized=len(prec.layers), by_precision=prec.by_precision,
                                 float_fallback=[l.node for l in prec.float_fallback]))
        print(f"{name:16s} ORT agree {rows[name]['ort']['top1_vs_fp32']:.4f} KL {rows[name]['ort']['kl_vs_fp32']:.5f} | "
              f"OV agree {rows[name]['openvino']['top1_vs_fp32']:.4f} KL {rows[name]['openvino']['kl_vs_fp32']:.5f} | "
              f"OV~ORT within 1 step {a.within_1_step:.4f} top-1 {a.top1_agreement:.4f} max {a.max_steps:.2f} steps | "
              f"OV integer layers {prec.integer}/{len(prec.layers)}", flush=True)
    return rows


def layerwise(data: bytes, xe: np.ndarray, threads: int) -> list[dict]:
    """Where OpenVINO and ONNX Runtime part, layer by layer: every activation DequantizeLinear
    output (the codes the next layer reads) marked as a graph output in both runtimes, the
    difference in that tensor's own quantization steps. (Marking can change what a runtime fuses;
    the final output is compared unmarked in :func:`accuracy`.)"""
    from qwt_deploy.comparison.runners import mark_outputs

    m = onnx.load_from_string(data)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    acts = []
    for n in g.node:
        q = producer.get(n.input[0])
        if n.op_type == "DequantizeLinear" and q is not None and q.op_type == "QuantizeLinear" and n.input[1] in inits:
            src = producer.get(q.input[0])
            acts.append((n.output[0], float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0]), q.input[0],
                         src.op_type if src is not None else "input"))
    marked = mark_outputs(m, [a[0] for a in acts]).SerializeToString()
    ort, ov = SessionFromOnnx(marked, threads)(), OpenVinoSession(marked, threads)
    names = [o.name for o in ort.get_outputs()]
    x = xe[:32]
    r1 = dict(zip(names, ort.run(None, {ort.get_inputs()[0].name: x})))
    r2 = dict(zip(names, ov.run(None, {ov.get_inputs()[0].name: x})))
    rows = []
    for name, scale, tensor, op in acts:
        d = np.abs(r1[name].astype(np.float64) - r2[name]) / scale
        rows.append(dict(tensor=tensor, op=op, same_code=float(np.mean(d < 0.5)), beyond_1=float(np.mean(d > 1.001)),
                         max_codes=float(d.max())))
    return rows


def markdown(res: dict) -> str:
    m = res["machine"]
    L = [f"# OpenVINO vs ONNX Runtime on EfficientNet-Lite0 (issue #14)", "",
         f"`python bench/bench_openvino.py{' --quick' if res['quick'] else ''}` on {m['cpu']}, {m['cores']} cores, "
         f"load {m['load_before'][0]:.2f} before / {res['load_after'][0]:.2f} after; {res['versions']}; "
         f"{res['calibration_crops']} calibration / {res['eval_crops']} held-out crops; {res['threads']} threads.", "",
         "## Latency (interleaved in one process; ratio = median of per-round ratios)", "",
         "| runtime : file | bs1 median ms | bs8 median ms | ratio to ORT FP32 (bs1 / bs8) |", "|---|---|---|---|"]
    lat = res["latency"]
    for k in lat["bs1"]["median_ms"]:
        L.append(f"| {k} | {lat['bs1']['median_ms'][k]:.2f} | {lat['bs8']['median_ms'][k]:.2f} | "
                 f"{lat['bs1']['ratio_to_ort_fp32'][k]:.2f} / {lat['bs8']['ratio_to_ort_fp32'][k]:.2f} |")
    f1a, f1b = lat["bs1"]["ov_int8_over_ort_int8"], lat["bs1"]["ov_int8_over_ov_f32_fp32"]
    L += ["", f"Figure 1 (bs1): OpenVINO INT8 / ORT INT8 = **{f1a:.3f}** (need <= 0.65), OpenVINO INT8 / OpenVINO f32 "
          f"FP32 = **{f1b:.3f}** (need <= 0.45)."]
    if res.get("serving"):
        s = res["serving"]
        L += ["", "## qwt-serve, 8 concurrent loopback clients (.npy crops, 2 threads, batching on)", "",
              "| runtime | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
        for r in ("onnxruntime", "openvino"):
            L.append(f"| {r} | {s[r]['throughput_rps']:.1f} | {s[r]['p50_ms']:.1f} | {s[r]['p99_ms']:.1f} | {s[r]['errors']} |")
        L += ["", f"Figure 2: throughput OpenVINO / ORT = **{s['throughput_ratio_openvino_over_onnxruntime']:.2f}** "
              f"(need >= 1.4), OpenVINO p99 / p50 = **{s['openvino_p99_over_p50']:.2f}** (need <= 3)."]
    L += ["", "## Accuracy and agreement (held-out crops; both runtimes on each file)", "",
          "| file | ORT top-1 vs FP32 | ORT KL | OV top-1 vs FP32 | OV KL | OV vs ORT within 1 step | OV vs ORT same top-1 "
          "| max steps | OV integer layers |", "|---|---|---|---|---|---|---|---|---|"]
    for k, r in res["accuracy"].items():
        a = r["openvino_vs_ort"]
        L.append(f"| {k} | {r['ort']['top1_vs_fp32']:.4f} | {r['ort']['kl_vs_fp32']:.5f} | {r['openvino']['top1_vs_fp32']:.4f} "
                 f"| {r['openvino']['kl_vs_fp32']:.5f} | {a['within_1_step']:.4f} | {a['top1_agreement']:.4f} | "
                 f"{a['max_steps']:.2f} | {r['openvino_layers']['integer']}/{r['openvino_layers']['quantized']} |")
    a = res["accuracy"]["qwt2-ort"]["openvino_vs_ort"]
    L += ["", f"Figure 3 (qwt2, ort file): **{a['within_1_step']:.4f}** of logits within 1 output step "
          f"(step {a['step']:.4f}), **{a['top1_agreement']:.4f}** same top-1 (need >= 0.99 each).", ""]
    if res.get("layerwise"):
        L += ["## Where OpenVINO and ONNX Runtime part (qwt2 ort file, 32 crops, activation codes)", "",
              "| quantized tensor | producer | same code | > 1 code apart | max codes |", "|---|---|---|---|---|"]
        L += [f"| {r['tensor']} | {r['op']} | {r['same_code']:.4f} | {r['beyond_1']:.4f} | {r['max_codes']:.0f} |"
              for r in res["layerwise"]]
        L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="64 calibration / 128 held-out crops, fewer rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-nncf", action="store_true")
    ap.add_argument("--skip-serving", action="store_true")
    a = ap.parse_args()
    status = probe_openvino()
    if not status.available:
        sys.exit(f"bench_openvino: {status.reason}; pip install openvino")
    torch.set_num_threads(a.threads)
    import onnxruntime

    n_cal, n_eval = (64, 128) if a.quick else (512, 525)
    res = dict(machine=machine(), quick=a.quick, threads=a.threads, calibration_crops=n_cal, eval_crops=n_eval,
               versions=f"OpenVINO {status.version}, ONNX Runtime {onnxruntime.__version__}")
    t0 = time.perf_counter()
    xc = crops(calibration_photos(), n_cal, LITE0, seed=0)
    xe = crops(evaluation_photos(), n_eval, LITE0, seed=1)
    model = build()
    files, steps = {}, {}
    for target in ("ort", "trt"):  # what qwt-export --example efficientnet-lite0 --target T ships (metadata aside)
        ex = api.export(api.quantize(model, xc, QuantizeConfig(target=target, num_calib=n_cal)))
        files[f"qwt2-{target}"] = ex.data
        steps[f"qwt2-{target}"] = api.output_quant_step(ex.quantized, ex.quantized.graph.outputs[0])
        if target == "ort":
            files["fp32"] = api.export_float(ex.quantized).SerializeToString()
    print(f"exported qwt2 ort/trt in {time.perf_counter() - t0:.0f} s", flush=True)
    tmp = tempfile.mkdtemp()
    fp32_path = os.path.join(tmp, "fp32.onnx")
    with open(fp32_path, "wb") as f:
        f.write(files["fp32"])
    input_name = onnx.load_from_string(files["fp32"]).graph.input[0].name
    files["quantize_static"] = quantize_static_model(fp32_path, xc, os.path.join(tmp, "qs.onnx"), input_name)
    if not a.skip_nncf:
        files["nncf"] = nncf_model(files["fp32"], xc, input_name)

    rounds = 7 if a.quick else 15
    res["latency"] = latency(files, xe, a.threads, rounds)
    if not a.skip_serving:
        path = os.path.join(tmp, "lite0.int8.onnx")
        with open(path, "wb") as f:
            f.write(files["qwt2-ort"])
        res["serving"] = serving(path, xe, a.threads, 3 if a.quick else 5, 10 if a.quick else 25)
    res["accuracy"] = accuracy(files, steps, xe, a.threads)
    res["layerwise"] = layerwise(files["qwt2-ort"], xe, a.threads)
    res["load_after"] = os.getloadavg()
    res["wall_s"] = time.perf_counter() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "openvino.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "openvino.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
