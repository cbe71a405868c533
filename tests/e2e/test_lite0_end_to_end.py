"""The real thing: EfficientNet-Lite0 ImageNet weights and real photos, through the CLIs
(qwt-export for both targets, qwt-check, qwt-run and qwt-serve without torch), plus the block
rule on its 16 MBConv blocks."""

import glob
import importlib.util
import json
import os

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install '.[demo]'")

from conftest import Server, assert_no_blocked_imports  # noqa: E402
from qwt_deploy.cli.check import main as check_main  # noqa: E402
from qwt_deploy.cli.export import main  # noqa: E402
from qwt_deploy.graph_passes import check_trt_rules  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0_int8(tmp_path_factory):
    """One `qwt-export --example efficientnet-lite0` (ort) for every case that reads its file: the
    export is the expensive part (calibration, export, the ORT check), and the cases only read it."""
    out = str(tmp_path_factory.mktemp("lite0") / "lite0.int8.onnx")
    assert main(["--example", "efficientnet-lite0", "--num-calib", "64", "--quiet", "--no-latency", "-o", out]) == 0
    return out


def test_lite0_export_is_integer_folded_and_agrees(lite0_int8):
    out = lite0_int8
    rep = json.load(open(out.replace(".onnx", ".report.json")))
    cov = rep["int8_coverage"]
    assert cov["integer_ops"] == cov["compute_ops"] == 60  # 49 QLinearConv, 9 QLinearAdd, QGAP, QGemm
    assert rep["folded_layers"] == 50 and rep["node_count"]["folded"] < rep["node_count"]["unfolded"]
    assert rep["size_bytes"]["int8"] < 0.3 * rep["size_bytes"]["fp32"]
    # Held-out real photos, 50 layers deep: the simulation emulates ORT's integer kernels and
    # the folded biases, so the logits agree elementwise, not just the decisions.
    agree = rep["ort_vs_pytorch"]
    assert agree["within_1_step"] >= 0.999, agree
    assert agree["top1_agreement"] == 1.0, agree
    assert os.path.getsize(out) > 1e6


def test_lite0_trt_export_end_to_end(tmp_path, capsys):
    """EfficientNet-Lite0 with real photos through `qwt-export --target trt`."""
    out = str(tmp_path / "lite0.trt.onnx")
    # not --quiet: the rule check and engine notes are INFO lines, which --quiet hides
    assert main(["--example", "efficientnet-lite0", "--target", "trt", "--num-calib", "64", "-o", out]) == 0
    rep = json.load(open(out.replace(".onnx", ".report.json")))
    assert rep["trt_rules"]["errors"] == 0 and rep["trt_rules"]["warnings"] == 0
    assert check_trt_rules(onnx.load(out)) == []
    assert rep["int8_coverage"]["applicable"] is False and rep["latency"] is None
    agree = rep["ort_vs_pytorch"]  # held-out real photos, 50 layers deep
    assert agree["within_1_step"] >= 0.999 and agree["top1_agreement"] == 1.0, agree
    assert rep["folded_layers"] == 50
    assert os.path.exists(out.replace(".onnx", ".trtexec.txt"))
    engine = rep["tensorrt_engine"]
    assert engine["built"] == os.path.exists(out.replace(".onnx", ".engine"))
    err = capsys.readouterr().err
    assert "TensorRT rule check: 0 error(s), 0 warning(s)" in err
    assert ("TensorRT engine built" in err) if engine["built"] else ("no TensorRT engine was built" in err)


def test_lite0_has_16_mbconv_blocks():
    from qwt_deploy.examples.efficientnet_lite0 import build
    from qwt_deploy.graph.blocks import describe_blocks, detect_blocks
    from conftest import capture, export_program

    g = capture(export_program(build(), torch.zeros(2, 3, 224, 224)))
    rows = describe_blocks(g, detect_blocks(g))
    assert [r["block"] for r in rows] == [f"_blocks.{i}" for i in range(16)]
    assert [r["stride"] for r in rows].count(2) == 4  # blocks 1, 3, 5, 11 downsample
    assert sum(r["nodes"] == 4 for r in rows) == 9  # the 9 blocks with a residual Add include it
    assert all(rows[i]["y"] == rows[i + 1]["x"] for i in range(15))  # blocks tile the backbone


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_lite0_backend_matches_its_simulation(tmp_path, target):
    """Issue #3 figure: ONNX Runtime on each layout within 1 step of the PyTorch simulation on
    >= 99.9% of output elements, on real held-out photos (one target per case, so CI names
    the layout that misses)."""
    out = tmp_path / "lite0"
    rc = check_main(["--example", "efficientnet-lite0", "--targets", target, "--num-inputs", "64", "-o", str(out),
                     "--quiet", "--no-gpu"])
    with open(os.path.join(out, "check.json")) as f:
        r = json.load(f)
    for c in r["outputs"]:
        if c["gated"]:
            assert c["within_atol"] >= 0.999, (c, r["first_divergence"])
        if c["reference"] == "pytorch-fp32":
            assert c["top1_agreement"] >= 0.9, c  # real weights, real held-out photos
    assert rc == 0


def test_lite0_int8_served_without_torch_classifies_real_photos(lite0_int8, tmp_path, capsys):
    """EfficientNet-Lite0 INT8 from qwt-export: qwt-run and qwt-serve agree and name the classes."""
    pytest.importorskip("skimage", reason="needs the demo extra (real photos)")
    from qwt_deploy.cli.run import main as run

    skimage_data = os.path.join(os.path.dirname(importlib.util.find_spec("skimage").origin), "data")
    model = lite0_int8
    fb = os.path.join(os.path.dirname(importlib.util.find_spec("foolbox").origin), "data")
    files = sorted(glob.glob(os.path.join(fb, "imagenet_*.jpg")))[:8]
    srv = Server(model, "--max-wait-ms", "20")
    try:
        correct = 0
        for f in files:
            out = str(tmp_path / "o.npy")
            assert run([model, "--input", f, "--output", out]) == 0
            ref = np.load(out)
            status, body = srv.request("POST", "/v1/predict?outputs=1", open(f, "rb").read(),
                                       {"Content-Type": "image/jpeg"})
            assert status == 200
            np.testing.assert_array_equal(np.asarray(body["outputs"][0]["data"], np.float32), ref)
            correct += body["top_k"][0][0]["index"] == int(os.path.basename(f).split("_")[2].split(".")[0])
        assert correct >= 6, correct  # the FP32 model gets 18/20 of these
        status, body = srv.request("POST", "/v1/predict", open(os.path.join(skimage_data, "coffee.png"), "rb").read(),
                                   {"Content-Type": "image/png"})
        assert body["top_k"][0][0]["label"] == "espresso"
    finally:
        assert_no_blocked_imports(srv.stop())
    capsys.readouterr()
