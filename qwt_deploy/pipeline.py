"""The whole export, in pipeline order: load -> capture -> calibrate+compensate -> export
-> fold -> run/check -> report. Each step lives in its own package; this module only
sequences them and times them."""

from __future__ import annotations

import collections
import time
from dataclasses import asdict
from typing import Callable, Optional

import numpy as np
import onnx
import torch

from calibration.data import batches, load_calibration
from calibration.sequential import calibrate
from graph_passes import fold_cwac_into_weight_scales

from . import __version__
from .atomic import atomic_write_bytes, check_writable
from .check.agreement import compare
from .config import ExportConfig
from .errors import QwtError
from .export.qdq import export_onnx
from .load.capture import capture, export_program
from .load.model_file import load_model
from .quantize.placement import PLANNERS
from .quantize.simulate import SimulatedModel
from .report import default_report_path, write_json
from .runtime.onnxruntime import SessionFromOnnx, run

_INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}
_FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "Mul", "GlobalAveragePool",
                  "AveragePool", "Concat", "Sigmoid"}


def int8_coverage(optimized: onnx.ModelProto) -> dict:
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    integer = {k: v for k, v in ops.items() if k in _INTEGER_OPS}
    flt = {k: v for k, v in ops.items() if k in _FLOAT_COMPUTE}
    return dict(integer_ops=sum(integer.values()), compute_ops=sum(integer.values()) + sum(flt.values()),
                by_type={**integer, **{f"float {k}": v for k, v in flt.items()}})


def interleaved_latency_ms(sessions: dict, x: np.ndarray, rounds: int = 7, per_round: int = 5) -> dict:
    """Median per-run time of each session, measured in alternating rounds in one process."""
    import time as _t

    times = {k: [] for k in sessions}
    for s in sessions.values():
        run(s, x)  # warm-up
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = _t.perf_counter()
            for _ in range(per_round):
                run(s, x)
            times[k].append((_t.perf_counter() - t0) / per_round * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def run_export(cfg: ExportConfig, progress: Optional[Callable[[int, int, str], None]] = None,
               log: Callable[[str], None] = print) -> dict:
    t_start = time.perf_counter()
    timing = {}
    check_writable(cfg.output)
    report_path = default_report_path(cfg.output)
    check_writable(report_path)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)

    # 1. load + capture
    t = time.perf_counter()
    loaded = load_model(cfg.model, cfg.model_factory, cfg.trust_pickle)
    program = loaded.program or export_program(loaded.module, torch.zeros((2,) + tuple(cfg.example_shape)))
    graph = capture(program)
    plan = PLANNERS[cfg.target](graph)
    timing["load_capture"] = time.perf_counter() - t

    # 2. calibration data
    t = time.perf_counter()
    in_shape = graph.input_shapes[graph.inputs[0]][1:]
    x = load_calibration(cfg.calib_data, in_shape, cfg.num_calib, cfg.preprocess, cfg.seed)
    if len(x) < cfg.num_calib and cfg.calib_data not in ("synthetic", "bundled"):
        log(f"note: {len(x)} calibration samples available (asked for {cfg.num_calib})")
    timing["data"] = time.perf_counter() - t

    # 3. calibrate + compensate (sequential, closed form)
    result = calibrate(graph, plan, batches(x, cfg.batch_size), cfg.quant, progress)
    timing["calibrate"] = result.seconds

    # 4. export (CWAC as explicit Mul/Add) and 5. fold
    t = time.perf_counter()
    meta = {"qwt_deploy.version": __version__, "qwt_deploy.method": cfg.quant.method,
            "qwt_deploy.bits": f"W{cfg.quant.w_bits}A{cfg.quant.a_bits}", "qwt_deploy.target": cfg.target,
            "qwt_deploy.preprocess": str(cfg.preprocess.to_dict()), "qwt_deploy.input_shape": str(list(in_shape))}
    unfolded = export_onnx(graph, plan, result.params, meta)
    folded, n_folded = fold_cwac_into_weight_scales(unfolded)
    onnx.checker.check_model(folded, full_check=True)
    fp32 = export_onnx(graph, metadata={"qwt_deploy.version": __version__})
    data = folded.SerializeToString()
    atomic_write_bytes(cfg.output, data)
    if cfg.keep_unfolded:
        atomic_write_bytes(cfg.output.replace(".onnx", "") + ".unfolded.onnx", unfolded.SerializeToString())
    timing["export_fold"] = time.perf_counter() - t

    # 6. run + check against the PyTorch simulation
    t = time.perf_counter()
    check_x = _check_inputs(cfg, x, in_shape)
    sim = SimulatedModel(graph, plan, result.params)
    with torch.no_grad():
        ref = sim(torch.from_numpy(check_x)).numpy()
    import tempfile, os
    with tempfile.TemporaryDirectory() as td:
        opt_path = os.path.join(td, "opt.onnx")
        sess = SessionFromOnnx(data, cfg.threads, optimized_model_path=opt_path, allow_spinning=False)()
        got = run(sess, check_x)
        coverage = int8_coverage(onnx.load(opt_path))
    agreement = compare(ref, got)
    latency = None
    if cfg.measure_latency:
        fsess = SessionFromOnnx(fp32.SerializeToString(), cfg.threads, allow_spinning=False)()
        ms = interleaved_latency_ms({"int8": sess, "fp32": fsess}, check_x[:1])
        latency = dict(int8_ms=ms["int8"], fp32_ms=ms["fp32"], ratio=ms["int8"] / ms["fp32"], batch=1, threads=cfg.threads)
    timing["check"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t_start

    report = dict(
        tool=f"qwt-deploy {__version__}", model=loaded.description, output=cfg.output, target=cfg.target,
        config=cfg.to_dict(),
        quantization=dict(method=cfg.quant.method, w_bits=cfg.quant.w_bits, a_bits=cfg.quant.a_bits,
                          calib_method=cfg.quant.calib_method, ridge=cfg.quant.ridge, reference=cfg.quant.reference),
        calibration=dict(samples=int(len(x)), source=cfg.calib_data, batch_size=cfg.batch_size),
        layers=[asdict(l) for l in result.layers], folded_layers=n_folded,
        node_count=dict(unfolded=len(unfolded.graph.node), folded=len(folded.graph.node)),
        int8_coverage=coverage, ort_vs_pytorch=dict(agreement.to_dict(), samples=int(len(check_x))),
        latency=latency, size_bytes=dict(int8=len(data), fp32=len(fp32.SerializeToString())),
        timing_s=timing,
    )
    write_json(report, report_path)
    report["report_path"] = report_path
    return report


def _check_inputs(cfg: ExportConfig, calib: np.ndarray, in_shape) -> np.ndarray:
    """Held-out real photos for the bundled example; else the last calibration samples."""
    n = max(1, cfg.check_samples)
    if cfg.calib_data == "bundled":
        from calibration.photos import crops, evaluation_photos

        return crops(evaluation_photos(), n, cfg.preprocess, cfg.seed + 1)
    return np.ascontiguousarray(calib[-n:])
