"""Why is EfficientNet-Lite0 INT8 at batch 1 only ~0.50x FP32 in ONNX Runtime CPU, and can an honest
graph or session change bring it to <= 0.45x (issue #2, figure 3)?

    python bench/bench_lite0_batch1.py                       # quantize in-process (~1 min), then measure
    python bench/bench_lite0_batch1.py --model lite0.onnx    # from `qwt-export --example efficientnet-lite0 --no-pad-conv-channels`
    python bench/bench_lite0_batch1.py --model lite0.onnx --variants stem_pad4,uint8_nchw_pad4 --repeats 5
    python bench/bench_lite0_batch1.py --model lite0.onnx --threads 1     # the same without thread wake-ups

What it measures (everything in this run, nothing hard-coded):
1. Per-op-category ORT profile (``enable_profiling``) of FP32 and INT8 at batch 1, interleaved: stem,
   expand (1x1), depthwise (3x3/5x5), project (1x1), head, the rest by op type. It shows where INT8
   loses to FP32's NCHWc kernels.
2. Latency ratios INT8/FP32 for graph variants of the *shipped* INT8 model and for session options.
   "int8" is qwt-export's file without its channel-pad pass (``--no-pad-conv-channels``); variant
   stem_pad4 is that pass, i.e. the file qwt-export ships by default.
   Per variant, FP32 + shipped INT8 + the variant are alive in one process (as in bench_lite0.py;
   ``session.intra_op.allow_spinning`` = "0" on every session) and run in interleaved rounds;
   per-round ratios -> median, p25..p75 over rounds and repeats, the ratio of 10th-percentile single
   runs, and the variant over the shipped INT8 in the same rounds ("/int8", the least load-sensitive
   figure on a shared machine). FP32 is always ORT's default best: ORT_ENABLE_ALL, the same threads,
   the same spinning setting. Session options that might help FP32 too get an FP32 twin.
3. Exactness / accuracy of each variant on the held-out real crops (agreement with FP32 top-1;
   quantize_static's 0.9581 is the floor named in the issue).

Variants (rewrites of the exported ONNX, see each function's docstring for why it may help):
  stem_pad4       pad the 3-channel stem input to 4 channels (zero weights): exact
  dw_u8           depthwise weights as uint8 with zero point 128: exact, other MLAS kernel
  dw_per_tensor   depthwise weights per tensor: NOT exact (re-quantized)
  dw_float        depthwise convs in float between quantized activations (mixed precision)
  uint8_nhwc      graph input = raw uint8 HWC pixels (scale 1/128, zp 127 is exact for Lite0)
  uint8_nchw_pad4 raw uint8 CHW pixels + stem_pad4
  uint8_nhwc_pad4 raw uint8 HWC pixels + stem_pad4
Session options (on the INT8 session; FP32 twins "fp32+<option>" where one could help FP32 too):
  opt_qdqisint8allowed, opt_x64quantprecision, opt_dynamic_block_base4, opt_disable_prepacking,
  opt_thread_affinity
Writes bench/results/lite0_batch1.json.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, interleaved_samples_ms

SPIN_OFF = {"session.intra_op.allow_spinning": "0"}


# ----------------------------------------------------------------------------- graph variants
def _maps(m):
    g = m.graph
    init = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    return g, init, prod, cons


def _arr(init, name):
    return numpy_helper.to_array(init[name])


def _set(init, name, arr):
    init[name].CopyFrom(numpy_helper.from_array(arr, name))


def _convs(m, kind: str):
    """Depthwise Conv nodes (group == channels); kind is 'depthwise'."""
    g, init, prod, _ = _maps(m)
    out = []
    for n in g.node:
        if n.op_type != "Conv" or n.input[1] not in prod:
            continue
        w = _arr(init, prod[n.input[1]].input[0])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if kind == "depthwise" and group > 1 and w.shape[1] == 1:
            out.append(n)
    return out


def stem_pad4(m0: onnx.ModelProto) -> onnx.ModelProto:
    """MLAS's symmetric indirect-conv kernel (MlasConvSym, fused requantization) needs input
    channels % 4 == 0; a 3-channel stem falls back to NHWC im2col (27-byte rows) + generic QGEMM +
    a separate requantize pass. Pad the uint8 stem input with one channel (value = zero point)
    and the INT8 weights with a zero channel: the integer result is identical.
    The shipped pass (graph_passes/pad_conv_input_channels.py, on by default for --target ort) does
    it; a model exported with it already has the pad, so this variant needs an unpadded INT8 model
    (the in-process build below, or --model from `qwt-export --no-pad-conv-channels`)."""
    from qwt_deploy.graph_passes import pad_conv_input_channels

    m, n = pad_conv_input_channels(m0)
    if n == 0:
        raise ValueError("no Conv to pad: the INT8 model is already padded (export it with --no-pad-conv-channels)")
    return m


def dw_u8(m0: onnx.ModelProto) -> onnx.ModelProto:
    """Depthwise weights stored as uint8 = int8 + 128 with zero point 128 (same real values).
    ORT then skips the symmetric depthwise kernel for MlasConvDepthwise (U8U8) + requantize."""
    m = copy.deepcopy(m0)
    g, init, prod, _ = _maps(m)
    for conv in _convs(m, "depthwise"):
        wdq = prod[conv.input[1]]
        _set(init, wdq.input[0], (_arr(init, wdq.input[0]).astype(np.int16) + 128).astype(np.uint8))
        name = wdq.input[2] + ".u8"
        g.initializer.append(numpy_helper.from_array(
            (_arr(init, wdq.input[2]).astype(np.int16) + 128).astype(np.uint8), name))
        wdq.input[2] = name
    return m


def dw_per_tensor(m0: onnx.ModelProto) -> onnx.ModelProto:
    """Depthwise weights per tensor (re-quantized at the largest channel scale; bias re-quantized
    at s_x * s_w): tests whether MLAS's per-channel requantization costs anything. NOT exact."""
    m = copy.deepcopy(m0)
    g, init, prod, _ = _maps(m)
    for conv in _convs(m, "depthwise"):
        wdq, bdq, xdq = prod[conv.input[1]], prod[conv.input[2]], prod[conv.input[0]]
        s = _arr(init, wdq.input[1]).astype(np.float64)
        smax = s.max()
        w = _arr(init, wdq.input[0]).astype(np.float64) * (s / smax)[:, None, None, None]
        b = _arr(init, bdq.input[0]).astype(np.float64) * _arr(init, bdq.input[1]).astype(np.float64)
        bs = np.float32(float(_arr(init, xdq.input[1])) * np.float32(smax))
        # new initializers (zero points/scales may be shared with other layers)
        for dq, arrays in ((wdq, [np.clip(np.round(w), -127, 127).astype(np.int8), np.array(smax, np.float32),
                                  np.array(0, np.int8)]),
                           (bdq, [np.round(b / bs).astype(np.int32), np.array(bs, np.float32), np.array(0, np.int32)])):
            for i, arr in enumerate(arrays):
                name = f"{dq.input[i]}.per_tensor"
                g.initializer.append(numpy_helper.from_array(arr, name))
                dq.input[i] = name
        for dq in (wdq, bdq):
            for a in [a for a in dq.attribute if a.name == "axis"]:
                dq.attribute.remove(a)
    return m


def dw_float(m0: onnx.ModelProto) -> onnx.ModelProto:
    """Mixed precision: depthwise convs in float (weights dequantized once), activations quantized
    before and after. NB: ORT's WeightBiasQuantization pass would re-quantize such float weights
    and fuse a QLinearConv again, so this variant is timed with that pass disabled."""
    m = copy.deepcopy(m0)
    g, init, prod, cons = _maps(m)
    for conv in _convs(m, "depthwise"):
        for k in (1, 2):
            dq = prod[conv.input[k]]
            q = _arr(init, dq.input[0]).astype(np.float64)
            s, z = _arr(init, dq.input[1]).astype(np.float64), _arr(init, dq.input[2]).astype(np.float64)
            shape = [-1] + [1] * (q.ndim - 1)
            f = (q - (z.reshape(shape) if z.ndim else z)) * (s.reshape(shape) if s.ndim else s)
            name = conv.input[k] + ".float"
            g.initializer.append(numpy_helper.from_array(f.astype(np.float32), name))
            conv.input[k] = name
    used = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in used for o in n.output):
            keep.append(n)
            used.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return m


def _input_quantizer(m):
    g, init, prod, cons = _maps(m)
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == g.input[0].name)
    return g, init, cons, q


def _check_pixel_codes(init, q):
    scale, zp = float(_arr(init, q.input[1])), int(_arr(init, q.input[2]))
    if scale != 1 / 128 or zp != 127:
        raise ValueError(f"input quantizer is ({scale}, {zp}), not (1/128, 127): raw uint8 pixels would not be exact")


def uint8_nhwc(m0: onnx.ModelProto) -> onnx.ModelProto:
    """Graph input = raw uint8 pixels, HWC (what image decoders produce). With Lite0's (x-127)/128
    normalisation the input quantizer (1/128, 127) maps pixel p to code p exactly, so the
    QuantizeLinear disappears and ORT's NHWC layout cancels the Transpose."""
    m = copy.deepcopy(m0)
    g, init, cons, q = _input_quantizer(m)
    _check_pixel_codes(init, q)
    d = g.input[0].type.tensor_type.shape.dim
    new = helper.make_tensor_value_info("image", TensorProto.UINT8,
                                        [d[0].dim_param or d[0].dim_value, d[2].dim_value, d[3].dim_value, d[1].dim_value])
    tr = helper.make_node("Transpose", ["image"], [q.output[0]], name="image_hwc_to_chw", perm=[0, 3, 1, 2])
    g.node.insert(list(g.node).index(q), tr)
    g.node.remove(q)
    g.input.remove(g.input[0])
    g.input.insert(0, new)
    return m


def uint8_nchw(m0: onnx.ModelProto) -> onnx.ModelProto:
    """Graph input = raw uint8 pixels, CHW (no input QuantizeLinear; exact, see uint8_nhwc)."""
    m = copy.deepcopy(m0)
    g, init, cons, q = _input_quantizer(m)
    _check_pixel_codes(init, q)
    g.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    for n in cons[q.output[0]]:
        n.input[list(n.input).index(q.output[0])] = g.input[0].name
    g.node.remove(q)
    return m


VARIANTS = {
    "stem_pad4": stem_pad4,
    "dw_u8": dw_u8,
    "dw_per_tensor": dw_per_tensor,
    "dw_float": dw_float,
    "uint8_nhwc": uint8_nhwc,
    "uint8_nchw_pad4": lambda m: stem_pad4(uint8_nchw(m)),
    "uint8_nhwc_pad4": lambda m: stem_pad4(uint8_nhwc(m)),  # ORT moves the Pad to the HWC innermost axis
}
EXACT = {"stem_pad4", "dw_u8", "uint8_nhwc", "uint8_nchw_pad4", "uint8_nhwc_pad4"}  # same integer arithmetic as shipped
DISABLED_OPTIMIZERS = {"dw_float": ["WeightBiasQuantization"]}
# session-option variants of the shipped INT8 model (FP32 keeps ORT's defaults + spinning off)
SESSION_OPTIONS = {
    "opt_qdqisint8allowed": {"session.qdqisint8allowed": "1"},
    "opt_x64quantprecision": {"session.x64quantprecision": "1"},
    "opt_dynamic_block_base4": {"session.dynamic_block_base": "4"},
    "opt_disable_prepacking": {"session.disable_prepacking": "1"},
    "opt_thread_affinity": {"session.intra_op_thread_affinities": "2"},  # pin the one worker thread to CPU 2
}
# a session option that speeds up INT8 only counts if it does not speed up FP32 as much: the FP32 twin
# ("fp32+<option>") is timed too, so the table shows both ratios
FP32_TWINS = ("opt_dynamic_block_base4", "opt_thread_affinity")


# ----------------------------------------------------------------------------- sessions
def session(model, threads: int, config: dict | None = None, disabled=(), profile_prefix=None):
    """The session qwt-export's check and latency use (``SessionFromOnnx``, spinning off), with a
    variant's extra config entries, disabled ORT optimizers or profiling."""
    return SessionFromOnnx(model, threads, allow_spinning=False, config_entries=config,
                           disabled_optimizers=tuple(disabled), profile_prefix=profile_prefix)()


def feed(s, x: np.ndarray) -> dict:
    """x is the normalised float NCHW batch; raw-pixel variants get the uint8 pixels it came from."""
    i = s.get_inputs()[0]
    if i.type == "tensor(uint8)":
        px = np.round(x * 128 + 127).astype(np.uint8)
        return {i.name: px.transpose(0, 2, 3, 1).copy() if i.shape[-1] == 3 else px}
    return {i.name: x}


def interleaved_ratios(sessions: dict, x: np.ndarray, rounds: int, per_round: int) -> dict:
    """Per round: ms of each session (``interleaved_samples_ms``, every sample kept); ratio to
    'fp32' in that round. Raw-pixel variants get their own uint8 feed (``feed``)."""
    feeds = {k: feed(s, x) for k, s in sessions.items()}
    got = interleaved_samples_ms(sessions, None, rounds, per_round, warmup=3, feeds=feeds)
    return {k: dict(ms=v.round_ms, single_ms=v.run_ms, ratio=[a / b for a, b in zip(v.round_ms, got["fp32"].round_ms)])
            for k, v in got.items()}


def _category(ev) -> str:
    name, op = ev["name"], ev["args"]["op_name"]
    for key in ("_conv_stem", "_expand_conv", "_depthwise_conv", "_project_conv", "_conv_head"):
        if key in name and ("Conv" in op or "Reorder" in op):
            return key.strip("_")
    return op


def profile_categories(models: dict, x: np.ndarray, threads: int, runs: int, tmp: str) -> dict:
    """Mean us per run of each op category, sessions profiled in interleaved runs."""
    sessions = {}
    for k, (model, config, disabled) in models.items():
        warm = session(model, threads, config, disabled)
        for _ in range(5):
            warm.run(None, feed(warm, x))
        sessions[k] = session(model, threads, config, disabled, os.path.join(tmp, f"prof_{k}"))
    for _ in range(runs):
        for s in sessions.values():
            s.run(None, feed(s, x))
    out = {}
    for k, s in sessions.items():
        path = s.end_profiling()
        with open(path) as f:
            events = json.load(f)
        os.remove(path)
        n_runs = sum(1 for e in events if e.get("name") == "model_run")
        us, count = collections.defaultdict(float), collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                us[_category(e)] += e["dur"]
                count[_category(e)] += 1
        run_us = [e["dur"] for e in events if e.get("name") == "model_run"]
        out[k] = dict(categories={c: dict(us=us[c] / n_runs, nodes=count[c] // n_runs) for c in us},
                      run_us_median=float(np.median(run_us)))
    return out


CONV_CATEGORIES = ("conv_stem", "expand_conv", "depthwise_conv", "project_conv", "conv_head")


def amdahl_bounds(profile: dict) -> dict:
    """What the profile says INT8/FP32 can at best be, per INT8 model (kernel times, us per run):
    - convs_only: the INT8 conv kernels alone over FP32's whole run (every other INT8 op free);
    - depthwise_floor: the INT8 depthwise convs alone over FP32's whole run;
    - ideal_pointwise_speedup: INT8 depthwise as measured + every other FP32 kernel divided by the
      best per-category INT8 speed-up seen on the 1x1 convs (no Q/Add/Transpose overhead at all)."""
    fp = profile["fp32"]["categories"]
    fp_total = sum(v["us"] for v in fp.values())
    out = {}
    for k, p in profile.items():
        if k == "fp32":
            continue
        c = p["categories"]
        us = lambda cat, d=c: d.get(cat, {"us": 0.0})["us"]
        best = max(us(cat, fp) / us(cat) for cat in ("expand_conv", "project_conv") if us(cat) > 0)
        out[k] = dict(convs_only=sum(us(cat) for cat in CONV_CATEGORIES) / fp_total,
                      depthwise_floor=us("depthwise_conv") / fp_total,
                      depthwise_speedup=us("depthwise_conv", fp) / max(us("depthwise_conv"), 1e-9),
                      pointwise_speedup=best,
                      ideal_pointwise_speedup=(us("depthwise_conv") + (fp_total - us("depthwise_conv", fp)) / best) / fp_total)
    return out


# ----------------------------------------------------------------------------- models
def build_models(model_path: str | None):
    """FP32 (``api.export_float``: the reference qwt-export's latency check uses) and the INT8
    model: ``--model``, or quantized in-process as ``qwt-export --example efficientnet-lite0
    --no-pad-conv-channels`` does (``api.quantize`` -> ``api.export``)."""
    from qwt_deploy import api
    from qwt_deploy.config import QuantizeConfig
    from qwt_deploy.examples.efficientnet_lite0 import build

    if model_path:
        return api.export_float(build()), onnx.load(model_path)  # nothing quantized with --model
    t = time.perf_counter()
    qm = api.quantize(build(), "bundled", QuantizeConfig(target="ort"))  # qwt-export's defaults: qwt2 W8A8, 512 crops
    int8 = api.export(qm, pad_conv_channels=False).folded  # the unpadded baseline: stem_pad4 is one of the variants
    print(f"quantized in-process in {time.perf_counter() - t:.0f} s ({qm.settings.method}, {len(qm.inputs)} crops)")
    return api.export_float(qm), int8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="INT8 ONNX from qwt-export --no-pad-conv-channels (default: quantize Lite0 "
                    "in-process, qwt2 W8A8, stem unpadded)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="fresh sessions per repeat (default 3)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--profile-runs", type=int, default=100)
    ap.add_argument("--eval-crops", type=int, default=525)
    ap.add_argument("--variants", default=",".join(list(VARIANTS) + list(SESSION_OPTIONS)),
                    help="comma list of variants to time (default: all)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="lite0_batch1_")
    import onnxruntime as ort

    from qwt_deploy.data.photos import crops, evaluation_photos
    from qwt_deploy.data.preprocess import LITE0

    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "onnxruntime": ort.__version__, "threads": a.threads, "batch": a.batch, "load_before": os.getloadavg(),
           "session_config_all": SPIN_OFF, "command": " ".join(["python"] + sys.argv),
           "model": a.model or "quantized in-process (api.quantize defaults for --target ort: qwt2 W8A8, 512 "
                                  "bundled crops; api.export pad_conv_channels=False)"}
    fp32, int8 = build_models(a.model)
    names = [v for v in a.variants.split(",") if v]
    models = {"fp32": (fp32.SerializeToString(), {}, ()), "int8": (int8.SerializeToString(), {}, ())}
    for v in names:
        if v in VARIANTS:
            models[v] = (VARIANTS[v](int8).SerializeToString(), {}, DISABLED_OPTIMIZERS.get(v, ()))
        elif v in SESSION_OPTIONS:
            models[v] = (models["int8"][0], SESSION_OPTIONS[v], ())
            if v in FP32_TWINS:
                models[f"fp32+{v}"] = (models["fp32"][0], SESSION_OPTIONS[v], ())
        else:
            raise SystemExit(f"unknown variant {v}. Fix: pick from {', '.join(list(VARIANTS) + list(SESSION_OPTIONS))}")

    # 3. exactness / agreement on held-out crops (before timing: it also checks every variant runs)
    xe = crops(evaluation_photos(), a.eval_crops, LITE0, seed=1)
    res["eval_crops"] = len(xe)
    res["pixels_exact"] = bool(np.abs(xe * 128 + 127 - np.round(xe * 128 + 127)).max() < 1e-3)

    def logits(k):
        m, config, disabled = models[k]
        s = session(m, a.threads, config, disabled)
        return np.concatenate([s.run(None, feed(s, xe[i:i + 32]))[0] for i in range(0, len(xe), 32)])

    ref, base = logits("fp32"), logits("int8")
    acc = {}
    for k in models:
        if k.startswith("fp32"):
            continue
        out = base if k == "int8" else logits(k)
        acc[k] = dict(agreement_with_fp32=float(np.mean(out.argmax(1) == ref.argmax(1))),
                      max_abs_diff_to_shipped_int8=float(np.abs(out - base).max()),
                      identical_to_shipped_int8=bool(np.array_equal(out, base)))
        print(f"{k:26s} agreement {acc[k]['agreement_with_fp32']:.4f}  identical to shipped INT8: "
              f"{acc[k]['identical_to_shipped_int8']}", flush=True)
    res["accuracy"] = acc
    broken = [k for k in EXACT if k in acc and not acc[k]["identical_to_shipped_int8"]]
    if broken:  # a rewrite documented as exact changed the logits: its timing would compare different work
        print(f"WARNING: not bit-identical to the shipped INT8 model although documented exact: {broken}")
    res["exact_rewrites_not_identical"] = broken

    # 2. interleaved latency ratios
    x = xe[:a.batch]
    # one group per variant: {fp32, shipped int8, variant (+ its FP32 twin)} alive together, the setting
    # of bench_lite0.py (3 sessions). With every variant alive at once (~12 sessions, ~100 MB of
    # weights against a 32 MB L3) each run starts colder than in the figure the issue asks for.
    # The "/int8" column (variant over shipped INT8, same rounds) is the least load-sensitive number.
    groups = [[k] + ([f"fp32+{k}"] if f"fp32+{k}" in models else []) for k in models
              if not k.startswith("fp32") and k != "int8"] or [[]]
    acc_lat = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in range(a.repeats):
        line = []
        for grp in groups:
            keys = ["fp32", "int8"] + grp
            sessions = {k: session(models[k][0], a.threads, models[k][1], models[k][2]) for k in keys}
            got = interleaved_ratios(sessions, x, a.rounds, a.per_round)
            del sessions
            for k in keys:
                d = acc_lat[k]
                d["ms"] += got[k]["ms"]
                d["ratio"] += got[k]["ratio"]
                d["single"] += got[k]["single_ms"]
                d["fp32_single"] += got["fp32"]["single_ms"]
                d["fp32_ms"] += got["fp32"]["ms"]
                d["vs_int8"] += [u / v for u, v in zip(got[k]["ms"], got["int8"]["ms"])]
                d[f"rep{r}"] += got[k]["ratio"]
            line += [f"{k} {np.median(got[k]['ratio']):.3f}" for k in keys[1:] if k != "int8"]
            line += [f"(int8 {np.median(got['int8']['ratio']):.3f})"]
        print(f"repeat {r + 1}/{a.repeats}: " + "  ".join(line), flush=True)
    lat = {}
    for k, d in acc_lat.items():
        ms, ratios = np.array(d["ms"]), np.array(d["ratio"])
        lat[k] = dict(ms_median=float(np.median(ms)), ms_min=float(ms.min()),
                      ratio_median=float(np.median(ratios)), ratio_p25=float(np.percentile(ratios, 25)),
                      ratio_p75=float(np.percentile(ratios, 75)),
                      ratio_per_repeat=[float(np.median(d[f"rep{r}"])) for r in range(a.repeats)],
                      ratio_to_shipped_int8=float(np.median(d["vs_int8"])),
                      ratio_of_min_ms=float(ms.min() / min(d["fp32_ms"])),
                      ratio_of_p10_single_run=float(np.percentile(d["single"], 10) / np.percentile(d["fp32_single"], 10)),
                      ms_p10_single_run=float(np.percentile(d["single"], 10)))
    res["latency"] = lat
    res["rounds"], res["per_round"], res["repeats"] = a.rounds, a.per_round, a.repeats

    # 1. per-category profile: FP32, shipped INT8 and the best variant
    best = min((k for k in lat if not k.startswith("fp32") and k != "int8"), key=lambda k: lat[k]["ratio_median"],
               default=None)
    prof_models = {k: models[k] for k in dict.fromkeys(["fp32", "int8"] + [k for k in ("stem_pad4", best) if k in models])}
    res["profile"] = profile_categories(prof_models, x, a.threads, a.profile_runs, tmp)
    res["load_after"] = os.getloadavg()
    res["bounds"] = amdahl_bounds(res["profile"])

    print(f"\nper-category ORT profile, batch {a.batch}, {a.threads} threads, us per run (nodes)")
    cats = sorted(set().union(*[set(p["categories"]) for p in res["profile"].values()]),
                  key=lambda c: -max(p["categories"].get(c, {"us": 0})["us"] for p in res["profile"].values()))
    print(f"{'category':26s}" + "".join(f"{k:>18s}" for k in res["profile"]))
    for c in cats:
        cells = [p["categories"].get(c, {"us": 0, "nodes": 0}) for p in res["profile"].values()]
        print(f"{c:26s}" + "".join(f"{e['us']:12.0f} ({e['nodes']:2d})" for e in cells))
    print(f"{'model_run (median)':26s}" + "".join(f"{p['run_us_median']:18.0f}" for p in res["profile"].values()))

    for k, v in res["bounds"].items():
        print(f"bound [{k}]: " + ", ".join(f"{n} {x:.3f}" for n, x in v.items()))
    print(f"\nlatency, batch {a.batch}, {a.threads} threads, interleaved, {a.repeats}x{a.rounds} rounds of "
          f"{a.per_round} runs (load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f})")
    print(f"{'variant':26s} {'ms med':>8s} {'ms p10':>7s} {'ratio med':>10s} {'p25..p75':>14s} {'p10 ratio':>9s} "
          f"{'/int8':>6s} {'per repeat':>22s} {'agree':>7s} exact")
    for k, v in lat.items():
        ag = acc.get(k, {})
        print(f"{k:26s} {v['ms_median']:8.2f} {v['ms_p10_single_run']:7.2f} {v['ratio_median']:10.3f} "
              f"{v['ratio_p25']:6.3f}..{v['ratio_p75']:6.3f} {v['ratio_of_p10_single_run']:9.3f} "
              f"{v['ratio_to_shipped_int8']:6.3f} "
              f"{' '.join(f'{r:.3f}' for r in v['ratio_per_repeat']):>22s} "
              f"{ag.get('agreement_with_fp32', 1.0):7.4f} {ag.get('identical_to_shipped_int8', '')}")
    path = os.path.join(a.out, "lite0_batch1.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
