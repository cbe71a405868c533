"""qwt-check mechanics on the small CNN (random weights: mechanics only, never accuracy)."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import make_small_cnn
from qwt_deploy.cli.check import main as check_main
from qwt_deploy.cli.export import main as export_main

PAIR = "ort-cpu[ort] vs pytorch-fake-quant[ort]"
FAST = ["--num-calib", "32", "--num-inputs", "16", "--threads", "1", "--quiet", "--no-gpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import export_program

    d = tmp_path_factory.mktemp("check")
    torch.export.save(export_program(make_small_cnn(), torch.zeros(2, 3, 32, 32)), str(d / "cnn.pt2"))
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.standard_normal((32, 3, 32, 32)).astype(np.float32))
    np.save(d / "held.npy", rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    return d


def _args(files, out, *extra):
    return [str(files / "cnn.pt2"), "--calib-data", str(files / "calib.npy"), "--inputs", str(files / "held.npy"),
            "-o", str(out), *FAST, *extra]


def _report(out):
    with open(os.path.join(out, "check.json")) as f:
        return json.load(f)


def _weighted_values(files):
    from conftest import capture
    from qwt_deploy.targets import ORT

    g = capture(torch.export.load(str(files / "cnn.pt2")))
    plan = ORT.plan(g)
    return {n.output: n.name for n in g.nodes if n.name in plan.weighted}


def test_check_writes_table_json_png_and_maps_every_quantized_layer(files, tmp_path, capsys):
    out = tmp_path / "rep"
    assert check_main(_args(files, out)) == 0
    text = capsys.readouterr().out
    assert "RESULT: PASS" in text and "ort-cpu[ort]" in text and "max steps" in text
    r = _report(out)
    with open(out / "sqnr.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "check.txt").read_text().strip().endswith("RESULT: PASS")
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]  # atomic writes leave nothing behind

    # every quantized layer has a mapped ONNX tensor and an SQNR for both quantized paths
    layers = {l["value"]: l for l in r["layers"]}
    for value, node in _weighted_values(files).items():
        rec = layers[value]
        assert rec["node"] == node
        assert rec["tensors"]["ort-cpu[ort]"], value
        for path in ("pytorch-fake-quant[ort]", "ort-cpu[ort]"):
            assert np.isfinite(rec["sqnr_db"][path]) and rec["sqnr_db"][path] > 0
        assert rec["vs_fake_quant"][PAIR]["within_atol"] >= 0.999
    assert r["first_divergence"][PAIR] is None
    gated = [c for c in r["outputs"] if c["gated"]]
    assert gated and all(c["passed"] for c in gated) and gated[0]["within_atol"] >= 0.999
    # marking intermediate outputs must not change ORT's integer kernels nor the final output
    m = r["marking_check"]["ort"]
    assert m["same_integer_kernels"] and m["marked"]["integer_ops"] == m["marked"]["compute_ops"] > 0
    assert m["final_output_max_diff_steps"] == 0.0
    skipped = {p["name"]: p["skipped"] for p in r["paths"]}
    assert skipped["ort-cuda[ort]"]  # a skipped path says why


def test_impossible_tolerance_exits_1(files, tmp_path, capsys):
    out = tmp_path / "rep"
    assert check_main(_args(files, out, "--min-agreement", "1.01", "--no-layers")) == 1
    r = _report(out)
    assert not r["passed"] and r["failures"] and "RESULT: FAIL" in capsys.readouterr().out


def test_perturbed_onnx_fails_and_names_the_perturbed_layer(files, tmp_path):
    model = tmp_path / "cnn.int8.onnx"
    assert export_main([str(files / "cnn.pt2"), "--calib-data", str(files / "calib.npy"), "-o", str(model),
                        "--num-calib", "32", "--threads", "1", "--quiet", "--no-latency"]) == 0
    # the file qwt-export wrote checks clean and is byte-identical to qwt-check's re-export
    assert check_main(_args(files, tmp_path / "ok", "--onnx", f"ort={model}")) == 0
    assert _report(tmp_path / "ok")["files"]["ort"]["identical_to_reexport"] is True

    m = onnx.load(str(model))
    producers = {o: n for n in m.graph.node for o in n.output}
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and n.name.startswith("expand/"))
    codes_name = producers[conv.input[1]].input[0]
    init = next(i for i in m.graph.initializer if i.name == codes_name)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), codes_name))  # flip the expand weights
    bad = tmp_path / "perturbed.onnx"
    onnx.save(m, str(bad))

    out = tmp_path / "bad"
    assert check_main(_args(files, out, "--onnx", f"ort={bad}")) == 1
    r = _report(out)
    assert r["files"]["ort"]["identical_to_reexport"] is False
    d = r["first_divergence"][PAIR]
    assert d is not None and d["node"] == "expand" and d["within_atol"] < 0.999
    layers = [l["value"] for l in r["layers"]]
    for rec in r["layers"][: layers.index(d["value"])]:  # everything before it still agrees
        if rec["value"] == "x" and rec["tensors"]["ort-cpu[ort]"] is None:
            continue  # the graph input: its ORT tensor is the 4-channel padded stem input (pad_conv_input_channels)
        assert rec["vs_fake_quant"][PAIR]["within_atol"] >= 0.999


@pytest.mark.parametrize("case", ["missing", "shape", "nan", "onnx-missing"])
def test_bad_input_exits_2_with_one_line_and_no_report(files, tmp_path, capsys, case):
    inputs = files / "held.npy"
    extra = []
    if case == "shape":
        inputs = tmp_path / "wrong.npy"
        np.save(inputs, np.zeros((4, 3, 16, 16), np.float32))
    elif case == "nan":
        inputs = tmp_path / "nan.npy"
        x = np.zeros((4, 3, 32, 32), np.float32)
        x[2, 0, 0, 0] = np.nan
        np.save(inputs, x)
    elif case == "missing":
        inputs = tmp_path / "nope.npy"
    else:
        extra = ["--onnx", f"ort={tmp_path / 'nope.onnx'}"]
    out = tmp_path / "rep"
    args = _args(files, out, *extra)
    args[args.index("--inputs") + 1] = str(inputs)
    assert check_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwt-check: error:") and "Fix:" in err[0]
    assert not os.path.exists(out / "check.json")


def test_trt_layout_checked_in_float_simulation(files, tmp_path):
    out = tmp_path / "rep"
    rc = check_main(_args(files, out, "--targets", "ort,trt"))
    r = _report(out)
    names = {p["name"]: p for p in r["paths"]}
    assert names["ort-cpu[trt]"]["ran"] and names["tensorrt[trt]"]["skipped"]
    gated = {c["path"]: c for c in r["outputs"] if c["gated"]}
    assert gated["ort-cpu[trt]"]["within_atol"] >= 0.999, gated["ort-cpu[trt]"]
    layers = {l["value"]: l for l in r["layers"]}
    for value in _weighted_values(files):
        assert layers[value]["tensors"]["ort-cpu[trt]"], value
        assert np.isfinite(layers[value]["sqnr_db"]["ort-cpu[trt]"])
    assert rc == 0


def test_lint_wiring(files, tmp_path, capsys):
    model = tmp_path / "ort.onnx"
    assert export_main([str(files / "cnn.pt2"), "--calib-data", str(files / "calib.npy"), "-o", str(model),
                        "--num-calib", "32", "--threads", "1", "--quiet", "--no-latency"]) == 0
    # the ONNX Runtime layout breaks TensorRT's rules (uint8 activations, INT32 bias DQ): errors, exit 1
    assert check_main(["--lint", "trt", str(model)]) == 1
    out = capsys.readouterr().out
    assert "error" in out.lower()
    assert check_main(["--lint", "trt", str(tmp_path / "missing.onnx")]) == 2
    trt = tmp_path / "trt.onnx"
    assert export_main([str(files / "cnn.pt2"), "--calib-data", str(files / "calib.npy"), "-o", str(trt),
                        "--target", "trt", "--num-calib", "32", "--threads", "1", "--quiet", "--no-latency"]) == 0
    capsys.readouterr()
    assert check_main(["--lint", "trt", str(trt)]) == 0


def test_export_names_the_first_diverging_layer_of_a_perturbed_file(small_program, mech_data):
    """qwt-export's own locator (pipeline.first_diverging_layer) on a file whose expand weights
    were flipped: it names that layer; on the file as exported, nothing."""
    from dataclasses import replace as dc_replace

    from qwt_deploy import api, pipeline
    from qwt_deploy.config import ExportConfig
    from qwt_deploy.data.inputs import InputSet

    cfg = ExportConfig(model=None, output="", num_calib=32, batch_size=16)
    qm = api.quantize(small_program, mech_data[:32], cfg.quantize_config())
    names: dict = {}
    ex = api.export(qm, tensor_names=names)
    held = InputSet.single(qm.graph.inputs[0], mech_data[32:48])
    assert pipeline.first_diverging_layer(cfg, ex, names, held, samples=16) is None
    m = onnx.ModelProto()
    m.CopyFrom(ex.folded)
    producers = {o: n for n in m.graph.node for o in n.output}
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and n.name.startswith("expand/"))
    codes_name = producers[conv.input[1]].input[0]
    init = next(i for i in m.graph.initializer if i.name == codes_name)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), codes_name))
    d = pipeline.first_diverging_layer(cfg, dc_replace(ex, folded=m), names, held, samples=16)
    assert d is not None and d["node"] == "expand" and d["within_atol"] < 0.999, d
