"""The public Python API (qwt_deploy.api) on the small random-weight CNN: mechanics only.

Every way of handing over the model and the calibration data gives the same file; ``verify``
compares ONNX Runtime with the simulation; bad data is a one-line QwtError; and importing the
package stays cheap (torch only when a public name is used)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import qwt_deploy as qd
from qwt_deploy import api
from qwt_deploy.calibration.sequential import CalibrationSettings
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.data.inputs import InputSet
from qwt_deploy.errors import QwtError

from conftest import make_small_cnn

SHAPE = (3, 32, 32)


def _config(target="ort", **kw):
    return QuantizeConfig(target=target, settings=CalibrationSettings(method="qwt2"), num_calib=32, batch_size=16,
                          example_shape=SHAPE, **kw)


@pytest.fixture(scope="module")
def calib(mech_data):
    return mech_data[:32]


@pytest.fixture(scope="module")
def reference(small_program, calib):
    """The file quantize + export give for the in-memory ExportedProgram."""
    return api.export(api.quantize(small_program, calib, _config())).data


def test_public_names_are_the_api(small_program, calib):
    # (qd.quantize / qd.export / qd.check: see test_public_functions_are_not_shadowed_by_subpackages)
    assert qd.verify is api.verify and qd.QuantizedModel is api.QuantizedModel
    assert qd.QuantizeConfig is QuantizeConfig and qd.QwtError is QwtError and qd.InputSet is InputSet
    qm = api.quantize(small_program, calib, _config())
    assert isinstance(qm, qd.QuantizedModel) and qm.target is qd.get_target("ort")
    assert qm.settings.calib_method == "minmax"  # "auto" resolved for the target
    assert len(qm.inputs) == 32 and qm.in_shape == SHAPE and qm.params is qm.result.params


def test_module_program_and_files_give_the_same_exports(small_program, calib, reference, tmp_path):
    """A program and its saved file give the same bytes, so do a module and its state dict +
    factory. Module and program differ only in tensor names (each trace numbers its values;
    node names are module paths in both): same nodes, and outputs within float rounding."""
    pt2 = str(tmp_path / "cnn.pt2")
    torch.export.save(small_program, pt2)
    assert api.export(api.quantize(pt2, calib, _config())).data == reference
    state = str(tmp_path / "cnn.pt")
    torch.save(make_small_cnn().state_dict(), state)
    from_module = api.export(api.quantize(make_small_cnn(), calib, _config()))
    assert api.export(api.quantize(state, calib, _config(), factory="conftest:make_small_cnn")).data == from_module.data
    import onnx
    import onnxruntime as ort

    a, b = onnx.load_from_string(from_module.data), onnx.load_from_string(reference)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    qdq = ("QuantizeLinear", "DequantizeLinear")
    assert [n.name for n in a.graph.node if n.op_type not in qdq] == [n.name for n in b.graph.node if n.op_type not in qdq]
    feed = {"x": calib[:8]}
    ya = ort.InferenceSession(from_module.data, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    yb = ort.InferenceSession(reference, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(ya, yb, rtol=0, atol=1e-5)


def test_same_seed_same_bytes_and_the_file_is_what_export_wrote(small_program, calib, reference, tmp_path):
    path = str(tmp_path / "m.int8.onnx")
    ex = api.export(api.quantize(small_program, calib, _config()), path)
    assert ex.path == path and ex.data == reference
    with open(path, "rb") as f:
        assert f.read() == reference
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("form", ["dict", "inputset", "batches", "generator", "tensor"])
def test_every_calibration_form_gives_the_same_result(form, small_program, calib, reference):
    name = api.capture_graph(api.load(small_program)).inputs[0]
    data = {
        "dict": lambda: {name: calib},
        "inputset": lambda: InputSet.single(name, calib),
        "batches": lambda: [calib[i:i + 8] for i in range(0, len(calib), 8)],
        "generator": lambda: (calib[i:i + 5] for i in range(0, len(calib), 5)),
        "tensor": lambda: torch.from_numpy(calib),
    }[form]()
    qm = api.quantize(small_program, data, _config())
    np.testing.assert_array_equal(qm.inputs.first, calib)
    assert api.export(qm).data == reference


def test_num_calib_takes_the_first_samples(small_program, mech_data, reference):
    qm = api.quantize(small_program, mech_data, _config())  # 64 given, num_calib 32
    assert len(qm.inputs) == 32 and api.export(qm).data == reference


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_verify_agrees_with_the_simulation(target, small_program, calib, mech_data):
    ex = api.export(api.quantize(small_program, calib, _config(target)))
    held_out = InputSet.single(ex.quantized.graph.inputs[0], mech_data[32:])
    v = api.verify(ex, held_out)
    assert v.samples == 32
    assert v.agreement.within_1_step >= 0.999, v.agreement
    if target == "ort":  # ORT runs the file with its integer kernels
        assert v.coverage["integer_ops"] == v.coverage["compute_ops"] > 0
        assert v.latency["int8_ms"] > 0 and v.latency["fp32_ms"] > 0 and v.plain_float is None
    else:  # ORT runs TensorRT's float simulation: no coverage or latency to speak of
        assert v.coverage["applicable"] is False and v.latency is None
        assert v.plain_float["within_1_step"] >= 0.999
    assert set(v.to_dict()) == {"agreement", "samples", "coverage", "latency", "plain_float", "outputs"}
    assert list(v.outputs) == ["output"] and v.outputs["output"] == v.agreement  # one output: it is the worst


def test_verify_defaults_to_the_last_calibration_samples(small_program, calib):
    ex = api.export(api.quantize(small_program, calib, _config()))
    v = api.verify(ex, measure_latency=False, samples=8)
    assert v.samples == 8 and v.latency is None and v.agreement.within_1_step >= 0.999


def _one_line(e: QwtError) -> str:
    msg = str(e)
    assert "\n" not in msg and ". Fix: " in msg, msg
    return msg


@pytest.mark.parametrize("bad", ["array", "dict", "batches"])
def test_bad_calibration_shape_is_a_one_line_qwt_error(bad, small_program):
    x = np.zeros((8, 3, 28, 28), np.float32)
    name = api.capture_graph(api.load(small_program)).inputs[0]
    data = {"array": x, "dict": {name: x}, "batches": [x[:4], x[4:]]}[bad]
    with pytest.raises(QwtError) as e:
        api.quantize(small_program, data, _config())
    msg = _one_line(e.value)
    assert "shape (8, 3, 28, 28)" in msg and "3 x 32 x 32" in msg


def test_other_bad_calibration_is_a_one_line_qwt_error(small_program):
    with pytest.raises(QwtError) as e:
        api.quantize(small_program, {"nope": np.zeros((4,) + SHAPE, np.float32)}, _config())
    assert "no array for input" in _one_line(e.value)
    with pytest.raises(QwtError) as e:
        api.quantize(small_program, [], _config())
    assert "empty" in _one_line(e.value)
    with pytest.raises(QwtError) as e:
        api.quantize(small_program, 3.5, _config())
    assert "float" in _one_line(e.value)
    with pytest.raises(QwtError) as e:
        api.quantize(42, np.zeros((4,) + SHAPE, np.float32), _config())
    assert "cannot quantize a int" in _one_line(e.value)


def test_importing_the_package_does_not_import_torch_until_a_public_name_is_used():
    code = """
import sys
import qwt_deploy as qd
assert qd.__version__
before = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
assert "quantize" in dir(qd) and "QuantizeConfig" in qd.__all__
still = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
qd.quantize
after = "torch" in sys.modules
from qwt_deploy import api
print(before, still, after, qd.quantize is api.quantize)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "[]", "True", "True"], r.stdout


@pytest.mark.parametrize("name", ["quantize", "export", "check"])
def test_public_functions_are_not_shadowed_by_subpackages(name):
    """No subpackage shares a public verb's name: once imported, a subpackage becomes an
    attribute of qwt_deploy and would hide the function (why quantize/ is quantization/ etc.)."""
    code = f"""
import qwt_deploy as qd
qd.verify  # the first public name imports the pipeline, and with it the subpackages (README: qd.quantize, then qd.export)
from qwt_deploy import api
print(callable(qd.{name}), qd.{name} is api.{name})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"], r.stdout


def test_an_unknown_public_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        qd.quantise  # noqa: B018


def test_check_from_python_compares_both_targets(small_program, calib, mech_data):
    """qd.check is qwt-check without files: both layouts, each backend within its gate."""
    from qwt_deploy.comparison.cross_backend import CheckConfig

    report = qd.check(small_program, calib, mech_data[-16:], QuantizeConfig(num_calib=len(calib), batch_size=16),
                      targets=("ort", "trt"), check_config=CheckConfig(num_inputs=16, gpu=False))
    assert report.passed, report.failures
    ran = {p["name"] for p in report.paths if p["ran"]}
    assert {"pytorch-fp32", "pytorch-fake-quant[ort]", "ort-cpu[ort]", "pytorch-fake-quant[trt]", "ort-cpu[trt]"} <= ran
    gated = [o for o in report.outputs if o["gated"]]
    assert len(gated) == 2 and all(o["within_atol"] >= 0.999 for o in gated)
    assert report.settings["targets"] == ["ort", "trt"] and report.to_dict()["passed"] is True
