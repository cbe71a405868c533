"""The Fashion-MNIST examples end to end (needs the Debian package dataset-fashion-mnist):
qwt-export with real calibration images, ONNX Runtime INT8 accuracy on all 10k test images."""

import json

import pytest

from qwt_deploy.data import fashion_mnist as fm
from qwt_deploy.examples import EXAMPLES

pytestmark = pytest.mark.slow
needs_dataset = pytest.mark.skipif(not fm.available(), reason=fm.missing_reason())


@needs_dataset
@pytest.mark.parametrize("name", ["fashion-cnn", "fashion-vit"])
def test_export_example_int8_accuracy_close_to_fp32(tmp_path, name):
    """W8A8 qwt2 export through the CLI; ONNX Runtime INT8 top-1 on all 10k test images within
    1 point of the FP32 model."""
    import onnx

    from qwt_deploy.cli.export import main
    from qwt_deploy.examples.evaluate import onnx_accuracy, torch_accuracy

    out = str(tmp_path / f"{name}.int8.onnx")
    assert main(["--example", name, "-o", out, "--quiet", "--no-latency"]) == 0
    with open(out.replace(".onnx", ".report.json")) as f:
        report = json.load(f)
    assert report["calibration"]["samples"] == 512 and report["calibration"]["source"] == f"example:{name}"
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["qwt_deploy.input_shape"]) == [1, 28, 28]
    assert json.loads(meta["qwt_deploy.labels"]) == list(fm.CLASSES)
    int8 = onnx_accuracy(out, name)
    fp32 = torch_accuracy(EXAMPLES[name].build(), name)
    assert int8.samples == fp32.samples == 10000
    assert abs(int8.accuracy - fp32.accuracy) <= 0.01, (int8.accuracy, fp32.accuracy)
