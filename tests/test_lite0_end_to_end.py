"""The real thing: EfficientNet-Lite0 ImageNet weights and real photos, through the CLI."""

import json
import os

import pytest

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install '.[demo]'")

from qwt_deploy.cli.export import main  # noqa: E402


@pytest.mark.slow
def test_lite0_export_is_integer_folded_and_agrees(tmp_path, capsys):
    out = str(tmp_path / "lite0.int8.onnx")
    assert main(["--example", "efficientnet-lite0", "--num-calib", "64", "--quiet", "-o", out]) == 0
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
