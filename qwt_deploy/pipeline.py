"""The whole export, in pipeline order: load -> capture -> calibrate+compensate -> export
-> fold -> run/check -> report. Each step lives in its own package; this module only
sequences them and times them."""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx
import torch

from calibration.data import batches, load_model_inputs
from calibration.inputs import InputSet
from calibration.qwt_branch import compensation_summary, with_qwt_branches
from calibration.sequential import CalibrationResult, calibrate
from graph_passes import fold_cwac_into_weight_scales, pad_conv_input_channels

from . import __version__
from .atomic import atomic_write_bytes, check_writable
from .check.agreement import compare
from .config import ExportConfig
from .errors import QwtError
from .export.qdq import export_onnx
from .load.capture import capture, export_program
from .load.model_file import LoadedModel, load_model
from .quantize.placement import PLANNERS
from .quantize.simulate import SimulatedModel
from .report import default_report_path, write_json
from .runtime.onnxruntime import SessionFromOnnx, interleaved_latency_ms, run

_INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}
_FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "Mul", "GlobalAveragePool",
                  "AveragePool", "Concat", "Sigmoid"}


def int8_coverage(optimized: onnx.ModelProto) -> dict:
    """Integer kernels vs float compute ops in ONNX Runtime's optimized graph.

    ORT fuses a quantized transformer Linear into ``MatMulIntegerToFloat`` (float output) and
    leaves the layer's bias as a separate float ``Add``. That Add is the integer kernel's
    epilogue, not float compute the quantizer missed, so counting it as float would make the
    coverage look worse than it is; hiding it would hide that it runs. It is counted apart:
    ``bias_epilogues`` and ``by_type["bias epilogue Add"]``, outside ``compute_ops``. An Add is
    one when, precisely: one input is a constant vector ``[N]`` (leading 1s allowed), the other is
    the output of a ``MatMulIntegerToFloat`` whose weight is a constant ``[K, N]`` and which
    nothing else reads (not a graph output either).
    """
    g = optimized.graph
    ops = collections.Counter(n.op_type for n in g.node)
    consts = {i.name: tuple(i.dims) for i in g.initializer}
    consts.update({n.output[0]: tuple(a.t.dims) for n in g.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    producer = {o: n for n in g.node for o in n.output}
    readers = collections.Counter(i for n in g.node for i in n.input if i)
    graph_outputs = {o.name for o in g.output}

    def bias_epilogue(n) -> bool:
        if n.op_type != "Add" or len(n.input) != 2:
            return False
        for acc, bias in (n.input, n.input[::-1]):
            mm, b = producer.get(acc), consts.get(bias)
            if (mm is None or mm.op_type != "MatMulIntegerToFloat" or b is None or readers[acc] != 1
                    or acc in graph_outputs or len(b) < 1 or any(d != 1 for d in b[:-1])):
                continue
            w = consts.get(mm.input[1]) if len(mm.input) > 1 else None
            if w is not None and len(w) == 2 and w[-1] == b[-1]:
                return True
        return False

    epilogues = sum(1 for n in g.node if bias_epilogue(n))
    ops["Add"] -= epilogues
    integer = {k: v for k, v in ops.items() if k in _INTEGER_OPS}
    flt = {k: v for k, v in ops.items() if k in _FLOAT_COMPUTE and v > 0}
    return dict(integer_ops=sum(integer.values()), compute_ops=sum(integer.values()) + sum(flt.values()),
                bias_epilogues=epilogues,
                by_type={**integer, **{f"float {k}": v for k, v in flt.items()},
                         **({"bias epilogue Add": epilogues} if epilogues else {})})


@dataclass
class QuantizedModel:
    """Steps 1-3 of the pipeline (load+capture, calibration data, calibrate+compensate), kept
    together so other tools (qwt-check, benches) quantize exactly as qwt-export does."""
    loaded: LoadedModel
    graph: object  # qwt_deploy.graph.ir graph
    plan: object  # quantizer placement for cfg.target
    params: dict  # result.params, as export_onnx/SimulatedModel take them
    result: CalibrationResult
    inputs: InputSet  # the calibration samples actually used, one array per model input
    in_shape: tuple  # first input's shape without the batch axis
    timing: dict = field(default_factory=dict)


@dataclass
class ExportedModel:
    """Steps 4-5: the QDQ export with CWAC as explicit Mul/Add, and the folded graph that ships."""
    unfolded: onnx.ModelProto
    folded: onnx.ModelProto
    data: bytes  # folded.SerializeToString()
    n_folded: int
    seconds: float = 0.0


def quantize_model(cfg: ExportConfig, progress: Optional[Callable[[int, int, str], None]] = None,
                   log: Callable[[str], None] = print) -> QuantizedModel:
    timing = {}
    # 1. load + capture
    t = time.perf_counter()
    loaded = load_model(cfg.model, cfg.model_factory, cfg.trust_pickle)
    # a module with token inputs traces itself (model.example_inputs(): see load.capture.export_program)
    program = loaded.program or export_program(loaded.module, torch.zeros((2,) + tuple(cfg.example_shape)))
    graph = capture(program)
    graph = with_qwt_branches(graph, cfg.quant.method, cfg.quant.qwt_blocks)  # QwT (v1): a branch node per block
    plan = PLANNERS[cfg.target](graph, keep_float=tuple(cfg.keep_float))
    timing["load_capture"] = time.perf_counter() - t

    # 2. calibration data
    t = time.perf_counter()
    in_shape = graph.input_shapes[graph.inputs[0]][1:]
    x = load_model_inputs(cfg.calib_data, graph, cfg.num_calib, cfg.preprocess, cfg.seed)
    if len(x) < cfg.num_calib and cfg.calib_data not in ("synthetic", "bundled"):
        log(f"note: {len(x)} calibration samples available (asked for {cfg.num_calib})")
    timing["data"] = time.perf_counter() - t

    # 3. calibrate + compensate (sequential, closed form)
    result = calibrate(graph, plan, batches(x, cfg.batch_size), cfg.quant, progress)
    timing["calibrate"] = result.seconds
    return QuantizedModel(loaded=loaded, graph=graph, plan=plan, params=result.params, result=result,
                          inputs=x, in_shape=in_shape, timing=timing)


KEY_INPUTS = "qwt_deploy.inputs"  # token models: JSON [{"name", "dtype", "shape"}] instead of image keys


def export_metadata(cfg: ExportConfig, in_shape, graph=None) -> dict:
    """ONNX metadata: how the model was made, plus what the edge runtime needs to feed it.
    Image models get the preprocessing keys; a model with token inputs gets ``qwt_deploy.inputs``
    (names, dtypes, dynamic axes) and no image keys, which would be false for it."""
    import json

    from .edge.metadata import export_metadata as edge_metadata  # the JSON keys the edge runtime reads

    meta = {"qwt_deploy.version": __version__, "qwt_deploy.method": cfg.quant.method,
            "qwt_deploy.bits": f"W{cfg.quant.w_bits}A{cfg.quant.a_bits}", "qwt_deploy.target": cfg.target}
    if graph is not None and (len(graph.inputs) != 1 or not graph.is_float_input(graph.inputs[0])):
        meta[KEY_INPUTS] = json.dumps([dict(name=v, dtype=str(graph.input_dtypes.get(v, torch.float32)).replace("torch.", ""),
                                            shape=graph.dims(v)) for v in graph.inputs])
        return meta
    return {**meta, **edge_metadata(cfg.preprocess.to_dict(), in_shape, cfg.calib_data, cfg.labels_file)}


def export_folded(qm: QuantizedModel, cfg: ExportConfig, tensor_names: Optional[dict] = None) -> ExportedModel:
    """4. export (CWAC as explicit Mul/Add) and 5. fold; checked with onnx.checker full_check.
    ``tensor_names`` (optional) is filled with IR value -> ONNX tensor name (see export_onnx)."""
    t = time.perf_counter()
    unfolded = export_onnx(qm.graph, qm.plan, qm.params, export_metadata(cfg, qm.in_shape, qm.graph),
                           tensor_names=tensor_names)
    folded, n_folded = fold_cwac_into_weight_scales(unfolded)
    if cfg.target == "ort" and cfg.pad_conv_channels:  # exact; MLAS's fast INT8 conv needs channels % 4 == 0
        folded, _ = pad_conv_input_channels(folded)
    onnx.checker.check_model(folded, full_check=True)
    return ExportedModel(unfolded=unfolded, folded=folded, data=folded.SerializeToString(), n_folded=n_folded,
                         seconds=time.perf_counter() - t)


def run_export(cfg: ExportConfig, progress: Optional[Callable[[int, int, str], None]] = None,
               log: Callable[[str], None] = print) -> dict:
    t_start = time.perf_counter()
    check_writable(cfg.output)
    report_path = default_report_path(cfg.output)
    check_writable(report_path)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)

    # 1-3. load + capture, calibration data, calibrate + compensate
    qm = quantize_model(cfg, progress, log)
    loaded, graph, plan, result, x = qm.loaded, qm.graph, qm.plan, qm.result, qm.inputs
    timing = dict(qm.timing)

    # 4. export (CWAC as explicit Mul/Add) and 5. fold
    t = time.perf_counter()
    ex = export_folded(qm, cfg)
    unfolded, folded, n_folded, data = ex.unfolded, ex.folded, ex.n_folded, ex.data
    trt_rules = check_trt_export(folded, log) if cfg.target == "trt" else None  # before writing: errors fail
    fp32 = export_onnx(graph, metadata={"qwt_deploy.version": __version__})
    atomic_write_bytes(cfg.output, data)
    if cfg.keep_unfolded:
        atomic_write_bytes(cfg.output.replace(".onnx", "") + ".unfolded.onnx", unfolded.SerializeToString())
    timing["export_fold"] = time.perf_counter() - t
    engine = None
    if cfg.target == "trt":  # 5c. engine where TensorRT and a CUDA GPU exist; always the trtexec command line
        from .runtime.tensorrt import build_engine_next_to

        t = time.perf_counter()
        built = build_engine_next_to(cfg.output)
        log(built.message())
        engine = built.to_dict()
        timing["tensorrt_engine"] = time.perf_counter() - t

    # 6. run + check against the PyTorch simulation
    t = time.perf_counter()
    check_x = _check_inputs(cfg, x)
    sim = SimulatedModel(graph, plan, result.params)
    with torch.no_grad():
        ref = sim(check_x.torch()).numpy()
    import tempfile, os
    with tempfile.TemporaryDirectory() as td:
        opt_path = os.path.join(td, "opt.onnx")
        float_sim = cfg.target == "trt"  # ORT runs the TensorRT layout in float simulation (QDQ fusion off)
        if float_sim:
            sess = trt_float_simulation(folded, cfg.threads)
        else:
            sess = SessionFromOnnx(data, cfg.threads, optimized_model_path=opt_path, allow_spinning=False)()
        got = run(sess, check_x)
        coverage = TRT_COVERAGE if float_sim else int8_coverage(onnx.load(opt_path))
    agreement = compare(ref, got)
    plain_float = None
    if float_sim:  # for the record: the shipped graph as-is in ORT float (accumulation-order flips compound)
        plain = SessionFromOnnx(data, cfg.threads, allow_spinning=False, disable_qdq_fusion=True)()
        plain_float = compare(ref, run(plain, check_x)).to_dict()
    latency = None
    if cfg.measure_latency and not float_sim:  # float simulation timings say nothing about TensorRT
        fsess = SessionFromOnnx(fp32.SerializeToString(), cfg.threads, allow_spinning=False)()
        ms = interleaved_latency_ms({"int8": sess, "fp32": fsess}, check_x.head(1))
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
        compensation=compensation_summary(graph, result),
        node_count=dict(unfolded=len(unfolded.graph.node), folded=len(folded.graph.node)),
        int8_coverage=coverage, ort_vs_pytorch=dict(agreement.to_dict(), samples=int(len(check_x))),
        latency=latency, size_bytes=dict(int8=len(data), fp32=len(fp32.SerializeToString())),
        timing_s=timing,
        trt_rules=trt_rules, tensorrt_engine=engine, ort_plain_float_vs_pytorch=plain_float,
    )
    write_json(report, report_path)
    report["report_path"] = report_path
    return report


TRT_COVERAGE = dict(applicable=False, integer_ops=0, compute_ops=0, by_type={},
                    note="not applicable: --target trt is run by ONNX Runtime in float simulation "
                         "(QDQ fusion off); TensorRT fuses the INT8 kernels")


def trt_float_simulation(model: onnx.ModelProto, threads: int):
    """ONNX Runtime session that runs a TensorRT-layout graph as TensorRT's INT8 kernels compute
    it: QDQ fusion off, each quantized Conv/Gemm rewritten to an exact integer accumulator times
    float32(s_x)*s_w plus the float bias (graph_passes.rewrite_layers_as_integer_accumulators),
    graph optimizations off so ORT does not fold the scale back into the weights. The PyTorch
    simulation computes the same (quantize/trt_kernels.py), so the two agree bit for bit.
    FP16 nodes (QwT branches) become FP32 arithmetic on FP16-rounded values with an FP16-rounded
    output (graph_passes.emulate_fp16_in_fp32): ORT's CPU provider has no FP16 Conv/MatMul and
    would otherwise drop the FP16 roundings."""
    return SessionFromOnnx(trt_check_copy(model).SerializeToString(), threads, allow_spinning=False,
                           level="disable", disable_qdq_fusion=True)()


def trt_check_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The rewritten copy of a TensorRT-layout graph that ONNX Runtime runs for the check (see
    trt_float_simulation); qwt-check uses the same copy. Graph outputs and tensor names stay."""
    from graph_passes.emulate_fp16_in_fp32 import emulate_fp16_in_fp32
    from graph_passes.rewrite_layers_as_integer_accumulators import rewrite_layers_as_integer_accumulators

    rewritten, _ = rewrite_layers_as_integer_accumulators(model)
    return emulate_fp16_in_fp32(rewritten)[0]


def check_trt_export(model: onnx.ModelProto, log: Callable[[str], None]) -> dict:
    """Run the TensorRT rule checker on the export; an error fails the export, warnings print."""
    from graph_passes.check_trt_rules import check_trt_rules, errors, format_findings

    findings = check_trt_rules(model)
    bad = errors(findings)
    if bad:
        f = bad[0]
        raise QwtError(f"the --target trt graph breaks TensorRT rule '{f.rule}' at node {f.node}: {f.message} "
                       f"({len(bad)} error(s) in all)", f"{f.fix}; this is a qwt-export bug, please report it")
    log(format_findings(findings))
    return dict(errors=0, warnings=len(findings), findings=[asdict(f) for f in findings])


def _check_inputs(cfg: ExportConfig, calib: InputSet) -> InputSet:
    """Held-out real inputs for a built-in example (photos never calibrated on; Fashion-MNIST
    test images; pydoc sentences never calibrated on); else the last calibration samples."""
    n = max(1, cfg.check_samples)
    if cfg.calib_data == "bundled":
        from calibration.photos import crops, evaluation_photos

        return InputSet.single(calib.names[0], crops(evaluation_photos(), n, cfg.preprocess, cfg.seed + 1))
    from .examples import example_from_source

    example = example_from_source(cfg.calib_data)
    if example is not None:
        held_out = example.evaluation(n, cfg.seed + 1)[0]
        return (held_out.head(n) if isinstance(held_out, InputSet)
                else InputSet.single(calib.names[0], np.ascontiguousarray(held_out)))
    return calib.tail(n)
