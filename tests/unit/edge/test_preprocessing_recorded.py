"""Issue 13: the image preprocessing in a model's metadata is what read the calibration images or
what the user gave for calibration arrays, never an invented default (section 3); and what
qwt-serve answers by default, and says when it stops (section 4).

The small CNN (32x32 input, random weights) exported by qwt-export: mechanics only."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import Server
from qwt_deploy.cli.export import main as export_main
from qwt_deploy.cli.run import main as run_main
from qwt_deploy.data.preprocess import Preprocess
from qwt_deploy.errors import QwtError

FAST = ["--num-calib", "8", "--threads", "1", "--quiet", "--no-latency"]
FLAGS = ["--resize", "36", "--mean", "120,115,100", "--std", "60,58,57"]  # how the arrays were "made"


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_program):
    d = tmp_path_factory.mktemp("preprocess")
    torch.export.save(small_program, str(d / "cnn.pt2"))
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    (d / "photos").mkdir()
    for i in range(4):  # real image files of different sizes; content does not matter here
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(d / "photos" / f"p{i}.png")
    return d


def _export(work, out, *flags) -> int:
    return export_main([str(work / "cnn.pt2"), "-o", str(out), *FAST, *flags])


def _recorded(path):
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["qwt_deploy.preprocess"]) if "qwt_deploy.preprocess" in props else None


@pytest.fixture(scope="module")
def flags_model(work):
    out = work / "flags.int8.onnx"
    assert _export(work, out, "--calib-data", str(work / "calib.npy"), *FLAGS) == 0
    return out


def test_arrays_without_flags_record_nothing_and_the_edge_says_how_to_reexport(work, tmp_path, capsys):
    out = tmp_path / "plain.int8.onnx"
    assert _export(work, out, "--calib-data", str(work / "calib.npy")) == 0
    assert _recorded(out) is None  # no invented 256/224, 127/128
    capsys.readouterr()
    assert run_main([str(out), "--input", str(work / "photos" / "p0.png")]) == 2
    err = capsys.readouterr().err
    assert "records no image preprocessing" in err and "calibrated on preprocessed arrays" in err
    # the re-export command, with the crop of this model (32) and the resize that goes with it
    assert "--calib-data calib.npy --resize 37 --crop 32 --mean R,G,B --std R,G,B" in err
    assert "not a 1- or 3-channel image model" not in err  # the old, false reason


def test_arrays_with_flags_record_them_checked_and_the_edge_takes_images(work, flags_model, tmp_path, capsys):
    pre = _recorded(flags_model)
    assert (pre["resize"], pre["crop"], pre["mean"], pre["std"]) == (36, 32, [120.0, 115.0, 100.0], [60.0, 58.0, 57.0])
    assert pre["source"] == "flags" and pre["from_images"] is False  # crop 32: the model's own input size
    photo = work / "photos" / "p1.png"
    out = tmp_path / "o.npy"
    assert run_main([str(flags_model), "--input", str(photo), "--output", str(out)]) == 0
    x = Preprocess(36, 32, (120.0, 115.0, 100.0), (60.0, 58.0, 57.0)).center(Image.open(photo))[None]
    s = ort.InferenceSession(str(flags_model), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(np.load(out), s.run(None, {s.get_inputs()[0].name: x})[0])


@pytest.mark.parametrize("flags,expected", [
    (["--crop", "30", *FLAGS], "--crop 30 does not match the model's input size 32x32"),
    (["--mean", "120,115,100"], "were given for preprocessed arrays, but not --resize, --std"),
    (["--resize", "20", "--mean", "1", "--std", "2"], "--resize 20 is smaller than the crop 32"),
])
def test_preprocessing_flags_that_do_not_fit_the_model_are_one_line_errors(work, tmp_path, capsys, flags, expected):
    out = tmp_path / "bad.int8.onnx"
    assert _export(work, out, "--calib-data", str(work / "calib.npy"), *flags) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_image_folder_without_resize_crop_uses_the_model_input_size(work, tmp_path):
    out = tmp_path / "folder.int8.onnx"
    assert _export(work, out, "--calib-data", str(work / "photos")) == 0
    pre = _recorded(out)
    assert (pre["resize"], pre["crop"], pre["source"]) == (37, 32, "images")  # 32 / 0.875, not 256/224
    assert pre["mean"] == [127.0] * 3 and pre["std"] == [128.0] * 3  # the documented folder defaults


def test_for_input_completes_from_the_model_and_for_arrays_fills_nothing():
    assert Preprocess().for_input((3, 260, 260)) == Preprocess(297, 260, (127.0,) * 3, (128.0,) * 3)
    assert Preprocess(crop=64).for_input((3, "height", "width")).crop == 64  # dynamic H, W: the crop decides
    with pytest.raises(QwtError, match="dynamic"):
        Preprocess().for_input((3, "height", "width"))
    with pytest.raises(QwtError, match="square 1- or 3-channel"):
        Preprocess(resize=8, mean=(1.0,), std=(1.0,)).for_arrays((16,))
    with pytest.raises(QwtError, match="but not --std"):
        Preprocess(resize=300, mean=(1.0,) * 3).for_arrays((3, 260, 260))


def test_serve_answers_top_k_and_raw_outputs_on_request_and_logs_its_shutdown(flags_model, work):
    srv = Server(str(flags_model))
    try:
        png = (work / "photos" / "p2.png").read_bytes()
        status, body = srv.request("POST", "/v1/predict?top_k=3", png, {"Content-Type": "image/png"})
        assert status == 200, body
        assert "outputs" not in body and len(body["top_k"][0]) == 3  # top-k only, by default
        status, body = srv.request("POST", "/v1/predict?outputs=1", png, {"Content-Type": "image/png"})
        assert status == 200 and body["outputs"][0]["shape"] == [1, 10] and len(body["top_k"][0]) == 5
        x = np.zeros((1, 3, 32, 32), np.float32)
        assert "outputs" not in srv.predict_tensor(x)[1]
        assert srv.predict_tensor(x, outputs=True)[1]["outputs"][0]["shape"] == [1, 10]
        status, body = srv.request("POST", "/v1/predict?outputs=maybe", png, {"Content-Type": "image/png"})
        assert status == 400 and body["error"]["code"] == "bad_outputs"
        status, body = srv.predict_tensor(x, outputs="yes")
        assert status == 400 and body["error"]["code"] == "bad_outputs"
    finally:
        err = srv.stop()
    assert "qwt-serve: SIGTERM: shutting down" in err
    assert "qwt-serve: stopped (4 prediction(s) answered" in err, err
