"""qwt-export with an FP32 .onnx file as the model, as a user runs it (mechanics, random weights)."""

import json
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.cli.export import main


def _model(path, opset=17):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["scores"], name="softmax", axis=1)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(path))


def test_qwt_export_takes_an_onnx_file(tmp_path, capsys):
    _model(tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    before = (tmp_path / "m.onnx").read_bytes()
    rc = main([str(tmp_path / "m.onnx"), "--calib-data", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "q.onnx"),
               "--quiet", "--no-latency"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"float nodes \(ONNX\) +\| 1 kept float, run by ONNX Runtime .*\(Softmax 1\)", out), out
    rep = json.loads((tmp_path / "q.report.json").read_text())
    assert rep["float_nodes"] == [{"node": "softmax", "op_type": "Softmax"}]
    assert rep["int8_coverage"]["by_type"].get("QLinearConv") == 1 and rep["ort_vs_pytorch"]["within_1_step"] >= 0.999
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [i.name for i in q.graph.input] == ["image"] and [o.name for o in q.graph.output] == ["scores"]
    assert (tmp_path / "m.onnx").read_bytes() == before


def test_an_already_quantized_onnx_is_one_line_and_exit_2(tmp_path, capsys):
    _model(tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 8, 8), np.float32))
    assert main([str(tmp_path / "m.onnx"), "--calib-data", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "q.onnx"),
                 "--quiet", "--no-latency"]) == 0
    capsys.readouterr()
    rc = main([str(tmp_path / "q.onnx"), "--calib-data", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "qq.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "already quantized" in err[0] and "Fix:" in err[0]
    assert not (tmp_path / "qq.onnx").exists()


def test_dynamic_onnx_axes_take_calibration_data_of_any_size(tmp_path, capsys):
    """An ONNX input with named height and width (a detector) calibrates on a .npy of any fixed
    size; a wrong channel count is still one line and exit 2."""
    import onnx as _onnx

    _model(tmp_path / "m.onnx")
    m = _onnx.load(str(tmp_path / "m.onnx"))
    for d, name in zip(m.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        d.ClearField("dim_value")
        d.dim_param = name
    for d in m.graph.output[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_value")
        d.dim_param = "hw"
    _onnx.save(m, str(tmp_path / "dyn.onnx"))
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).normal(0, 1, (16, 3, 12, 20)).astype(np.float32))
    assert main([str(tmp_path / "dyn.onnx"), "--calib-data", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "q.onnx"),
                 "--quiet", "--no-latency"]) == 0
    q = _onnx.load(str(tmp_path / "q.onnx"))
    assert [d.dim_param for d in q.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "height", "width"]
    capsys.readouterr()
    np.save(tmp_path / "bad.npy", np.zeros((4, 1, 12, 20), np.float32))
    rc = main([str(tmp_path / "dyn.onnx"), "--calib-data", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "q2.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "N x 3 x height x width" in err[0], err
