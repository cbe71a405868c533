"""Every bad input gets a one-line error naming the fix, exit code 2, and no output file."""

import os

import numpy as np
import pytest
import torch

from qwt_deploy.cli.export import main

from conftest import SmallCNN, make_small_cnn

FACTORY = "conftest:make_small_cnn"


@pytest.fixture()
def files(tmp_path, small_program, mech_data):
    f = {}
    f["program"] = str(tmp_path / "model.pt2")
    torch.export.save(small_program, f["program"])
    f["calib"] = str(tmp_path / "calib.npy")
    np.save(f["calib"], mech_data[:32])
    f["out"] = str(tmp_path / "out.int8.onnx")
    return f


def _run(capsys, args, out):
    code = main(args + ["--quiet", "--no-latency", "-o", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("qwt-export: error: ") and "Fix:" in err[0], err
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".tmp-")]
    return err[0]


def test_corrupt_model_file(capsys, files, tmp_path):
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(os.urandom(300))
    assert "not a recognised model file" in _run(capsys, [str(bad), "--calib-data", files["calib"]], files["out"])


def test_truncated_export_program(capsys, files, tmp_path):
    data = open(files["program"], "rb").read()
    bad = tmp_path / "trunc.pt2"
    bad.write_bytes(data[: len(data) // 2])
    msg = _run(capsys, [str(bad), "--calib-data", files["calib"]], files["out"])
    assert "model file" in msg or "cannot be loaded" in msg


def test_torchscript_is_refused_with_advice(capsys, files, tmp_path):
    p = str(tmp_path / "ts.pt")
    torch.jit.trace(make_small_cnn(), torch.zeros(1, 3, 32, 32)).save(p)
    assert "TorchScript" in _run(capsys, [p, "--calib-data", files["calib"]], files["out"])


def test_onnx_file_is_refused(capsys, files, tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x08\x07\x12\x04test")
    assert "ONNX" in _run(capsys, [str(p), "--calib-data", files["calib"]], files["out"])


def test_pickled_module_needs_explicit_trust(capsys, files, tmp_path):
    p = str(tmp_path / "pickled.pt")
    torch.save(make_small_cnn(), p)
    assert "--trust-pickle" in _run(capsys, [p, "--calib-data", files["calib"]], files["out"])
    assert main([p, "--trust-pickle", "--calib-data", files["calib"], "--input-shape", "3,32,32",
                 "--quiet", "--no-latency", "-o", files["out"]]) == 0
    assert os.path.exists(files["out"])


def test_state_dict_without_factory(capsys, files, tmp_path):
    p = str(tmp_path / "sd.pt")
    torch.save(make_small_cnn().state_dict(), p)
    assert "--model-factory" in _run(capsys, [p, "--calib-data", files["calib"]], files["out"])
    assert main([p, "--model-factory", FACTORY, "--calib-data", files["calib"], "--input-shape", "3,32,32",
                 "--quiet", "--no-latency", "-o", files["out"]]) == 0


def test_calibration_wrong_shape(capsys, files, tmp_path):
    p = str(tmp_path / "wrong.npy")
    np.save(p, np.zeros((8, 3, 28, 28), np.float32))
    assert "shape (8, 3, 28, 28)" in _run(capsys, [files["program"], "--calib-data", p], files["out"])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_calibration_nan_inf(capsys, files, tmp_path, mech_data, value):
    x = mech_data[:8].copy()
    x[3, 0, 1, 1] = value
    p = str(tmp_path / "nan.npy")
    np.save(p, x)
    assert "NaN/Inf" in _run(capsys, [files["program"], "--calib-data", p], files["out"])


def test_calibration_empty_folder(capsys, files, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    assert "holds no images" in _run(capsys, [files["program"], "--calib-data", str(d)], files["out"])


def test_calibration_pickled_npy_is_not_loaded(capsys, files, tmp_path):
    p = str(tmp_path / "obj.npy")
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "pickled" in _run(capsys, [files["program"], "--calib-data", p], files["out"])


class Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=1).values


def test_operator_without_an_onnx_translation(capsys, files, tmp_path):
    """torch.onnx has no ONNX function for aten.kthvalue: one line naming it (any op it can
    translate is a float node, so this is the only "unsupported operator" left)."""
    p = str(tmp_path / "unsupported.pt2")
    torch.export.save(torch.export.export(Unsupported(), (torch.zeros(2, 3, 32, 32),)), p)
    msg = _run(capsys, [p, "--calib-data", files["calib"]], files["out"])
    assert "no ONNX translation for the operator aten.kthvalue" in msg


@pytest.mark.parametrize("where", ["missing-dir", "is-a-dir"])
def test_unwritable_output(capsys, files, tmp_path, where):
    out = str(tmp_path / "nope" / "m.onnx") if where == "missing-dir" else str(tmp_path)
    code = main([files["program"], "--calib-data", files["calib"], "--quiet", "--no-latency", "-o", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Fix:" in err[0]


def test_good_run_writes_model_and_report(capsys, files):
    assert main([files["program"], "--calib-data", files["calib"], "--quiet", "-o", files["out"]]) == 0
    import json

    rep = json.load(open(files["out"].replace(".onnx", ".report.json")))
    assert rep["folded_layers"] == 5 and rep["int8_coverage"]["integer_ops"] == rep["int8_coverage"]["compute_ops"]
    assert rep["int8_coverage"]["flops"]["share"] == 1.0 and rep["first_diverging_layer"] is None
    assert list(rep["ort_vs_pytorch"]["outputs"]) == ["output"]
    assert rep["latency"]["int8_ms"] > 0 and rep["ort_vs_pytorch"]["within_1_step"] >= 0.999
    assert "qwt-export summary" in capsys.readouterr().out
