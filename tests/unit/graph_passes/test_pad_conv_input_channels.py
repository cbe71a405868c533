"""graph_passes/pad_conv_input_channels.py: the 3-channel stem of an ORT export is padded to 4 input
channels, ONNX Runtime's results stay bit-identical and its QLinearConv fusion is kept (random
weights: mechanics only; the speed-up is measured in bench/bench_lite0_batch1.py)."""

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from qwt_deploy import api
from qwt_deploy.graph_passes import pad_conv_input_channels
from conftest import export_program
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run

from conftest import make_small_cnn, op_counts, quantized


def _folded(program, data, target="ort"):
    """The folded export before the channel pad (the pass under test is applied by hand)."""
    return api.export(quantized(program, data[:32], target=target), pad_conv_channels=False).folded


@pytest.fixture(scope="module")
def ort_model(small_program, mech_data):
    return _folded(small_program, mech_data)


def _weights(m):
    return {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith(
        ("weight_quantized", "weight_quantized_folded", "weight_quantized_folded_padded"))}


def _stem_weight_dims(m):
    return [tuple(i.dims) for i in m.graph.initializer if i.name.startswith("stem.weight_quantized")]


def test_stem_is_padded_and_ort_outputs_are_identical(ort_model, mech_data, tmp_path):
    padded, n = pad_conv_input_channels(ort_model)
    onnx.checker.check_model(padded, full_check=True)
    assert n == 1 and op_counts(padded)["Pad"] == 1
    assert _stem_weight_dims(ort_model) == [(16, 3, 3, 3)] and _stem_weight_dims(padded) == [(16, 4, 3, 3)]
    w = _weights(padded)["stem.weight_quantized_folded_padded"]
    assert np.array_equal(w[:, :3], _weights(ort_model)["stem.weight_quantized_folded"]) and not w[:, 3].any()
    pad = next(n for n in padded.graph.node if n.op_type == "Pad")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in padded.graph.initializer}
    assert inits[pad.input[1]].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # end of axis 1 only
    assert inits[pad.input[2]].dtype == np.uint8  # the input's zero point: dequantizes to exactly 0
    # the other layers (16, 32 input channels; a depthwise conv; the Gemm) are untouched
    others = {k: v for k, v in _weights(ort_model).items() if not k.startswith("stem.")}
    assert all(np.array_equal(_weights(padded)[k], v) for k, v in others.items())

    x = mech_data[:32]
    counts = {}
    outs = {}
    for name, m in (("plain", ort_model), ("padded", padded)):
        opt = str(tmp_path / f"{name}.opt.onnx")
        outs[name] = run(SessionFromOnnx(m.SerializeToString(), optimized_model_path=opt, allow_spinning=False)(), x)
        counts[name] = op_counts(onnx.load(opt))
    assert np.array_equal(outs["plain"], outs["padded"])
    assert counts["plain"]["QLinearConv"] == counts["padded"]["QLinearConv"] == 4
    assert counts["padded"].get("Conv", 0) == counts["padded"].get("FusedConv", 0) == 0


def test_shared_input_dequantize_is_cloned(ort_model, mech_data):
    """Another reader of the stem input's DequantizeLinear (here: a graph output) keeps 3 channels."""
    m = onnx.ModelProto()
    m.CopyFrom(ort_model)
    stem = next(n for n in m.graph.node if n.op_type == "Conv" and n.name.startswith("stem"))
    shape = ["batch", 3, 32, 32]
    m.graph.output.append(onnx.helper.make_tensor_value_info(stem.input[0], onnx.TensorProto.FLOAT, shape))
    padded, n = pad_conv_input_channels(m)
    onnx.checker.check_model(padded, full_check=True)
    assert n == 1 and op_counts(padded)["DequantizeLinear"] == op_counts(m)["DequantizeLinear"] + 1
    x = mech_data[:8]
    a = SessionFromOnnx(m.SerializeToString(), allow_spinning=False)().run(None, {"x": x})
    b = SessionFromOnnx(padded.SerializeToString(), allow_spinning=False)().run(None, {"x": x})
    assert b[1].shape[1] == 3 and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_no_change_when_channels_are_a_multiple_of_4(ort_model, mech_data):
    padded, _ = pad_conv_input_channels(ort_model)
    again, n = pad_conv_input_channels(padded)
    assert n == 0 and again.SerializeToString() == padded.SerializeToString()

    net = make_small_cnn()
    torch.manual_seed(1)
    net.stem = nn.Conv2d(4, 16, 3, stride=2, bias=False).eval()
    x4 = np.random.default_rng(2).standard_normal((32, 4, 32, 32)).astype(np.float32)
    model4 = _folded(export_program(net, torch.zeros(2, 4, 32, 32)), x4)
    out, n = pad_conv_input_channels(model4)
    assert n == 0 and op_counts(out).get("Pad", 0) == 0 and _stem_weight_dims(out) == [(16, 4, 3, 3)]


def test_trt_layout_is_not_matched(small_program, mech_data):
    """TensorRT layout: symmetric INT8 activations (no uint8 DequantizeLinear) -- nothing to pad."""
    trt = _folded(small_program, mech_data, "trt")
    out, n = pad_conv_input_channels(trt)
    assert n == 0 and op_counts(out).get("Pad", 0) == 0 and _stem_weight_dims(out) == [(16, 3, 3, 3)]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, mech_data):
    path = str(tmp_path_factory.mktemp("pad") / "calib.npy")
    np.save(path, mech_data[:32])
    return path


def _pipeline_export(calib_file, tmp_path, name="m.onnx", **kw):
    """qwt-export's pipeline (pipeline.run_export) on the small CNN from its factory; the file's bytes."""
    from qwt_deploy.config import ExportConfig
    from qwt_deploy.pipeline import run_export

    cfg = ExportConfig(model=None, output=str(tmp_path / name), model_factory="conftest:make_small_cnn",
                       calib_data=calib_file, num_calib=32, measure_latency=False, example_shape=(3, 32, 32),
                       check_samples=8, **kw)
    run_export(cfg)
    with open(cfg.output, "rb") as f:
        return f.read()


def test_pipeline_pads_ort_only_and_stays_deterministic(calib_file, tmp_path):
    data = _pipeline_export(calib_file, tmp_path, "a.onnx")
    assert data == _pipeline_export(calib_file, tmp_path, "b.onnx")  # byte-identical on re-run
    a = onnx.load_from_string(data)
    assert op_counts(a)["Pad"] == 1 and _stem_weight_dims(a) == [(16, 4, 3, 3)]
    off = onnx.load_from_string(_pipeline_export(calib_file, tmp_path, "off.onnx", pad_conv_channels=False))
    assert op_counts(off).get("Pad", 0) == 0 and _stem_weight_dims(off) == [(16, 3, 3, 3)]
    assert collections.Counter(op_counts(a)) - collections.Counter(op_counts(off)) == {"Pad": 1}
    trt = onnx.load_from_string(_pipeline_export(calib_file, tmp_path, "trt.onnx", target="trt"))
    assert op_counts(trt).get("Pad", 0) == 0 and _stem_weight_dims(trt) == [(16, 3, 3, 3)]


def test_cli_flag_turns_the_pass_off():
    from qwt_deploy.cli.export import build_parser, config_from_args

    args = ["m.pt2", "--calib-data", "synthetic", "-o", "m.onnx"]
    assert config_from_args(build_parser().parse_args(args)).pad_conv_channels is True
    assert config_from_args(build_parser().parse_args(args + ["--no-pad-conv-channels"])).pad_conv_channels is False
