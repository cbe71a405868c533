"""frontend.onnx_graph: an FP32 ONNX graph -> the IR, on small hand-built graphs (mechanics,
random weights). Quantizable nodes become IR ops (BatchNorm folded, Relu/Clip fused), every other
node a float node run by the FloatNodeRunner and exported verbatim; the FP32 simulation matches
ONNX Runtime, and the quantized export runs with ORT's integer kernels within 1 step."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qwt_deploy as qd
from qwt_deploy.frontend.onnx_graph import graph_from_onnx
from qwt_deploy.quantization.simulate import SimulatedModel

RNG = np.random.default_rng(0)


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.asarray(a).dtype), name)


def conv_bn_model(opset=17):
    """x -> Conv -> BatchNorm -> Clip(0, 6) -> [Softmax over C (float node)] ; Split(2) -> Add
    -> GlobalAveragePool -> Flatten -> Gemm -> Relu: two outputs (logits, the softmax map)."""
    w = RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b = RNG.normal(0, 0.1, 8).astype(np.float32)
    bn = [np.abs(RNG.normal(1, 0.2, 8)), RNG.normal(0, 0.1, 8), RNG.normal(0, 0.1, 8), np.abs(RNG.normal(1, 0.2, 8))]
    fc = RNG.normal(0, 0.3, (5, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"], name="bn", epsilon=1e-5),
        helper.make_node("Clip", ["bn", "lo", "hi"], ["r"], name="clip"),
        helper.make_node("Softmax", ["r"], ["prob"], name="softmax", axis=1),
        helper.make_node("Split", ["r", "split"], ["s0", "s1"], name="split", axis=1),
        helper.make_node("Add", ["s0", "s1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y0"], name="fc", transB=1),
        helper.make_node("Relu", ["y0"], ["logits"], name="relu"),
    ]
    inits = [_init("w", w), _init("b", b), *(_init(k, v.astype(np.float32)) for k, v in zip(["g", "be", "m", "v"], bn)),
             _init("lo", np.float32(0.0)), _init("hi", np.float32(6.0)), _init("split", np.array([4, 4], np.int64)),
             _init("fc", fc), _init("fcb", RNG.normal(0, 0.1, 5).astype(np.float32))]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
                           helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 8, 16, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_quantizable_nodes_become_ir_ops_and_the_rest_float_nodes():
    g = graph_from_onnx(conv_bn_model())
    ops = collections.Counter(n.op if n.op != "onnx" else "onnx:" + n.attrs["proto"].op_type for n in g.nodes)
    assert ops == {"conv": 1, "onnx:Softmax": 1, "onnx:Split": 1, "onnx_output": 2, "add": 1, "gap": 1,
                   "onnx_movement": 1, "linear": 1}  # Flatten: copied verbatim, passes its input's quantizer
    conv, fc = g.node("conv"), g.node("fc")
    assert conv.activation.lo == 0.0 and conv.activation.hi == 6.0 and fc.activation.is_relu  # fused
    assert g.inputs == ["x"] and g.outputs == ["logits", "prob"] and g.keep_io_names
    assert g.dims("x") == ["N", 3, 16, 16] and g.dims("logits") == ["N", 5]


def test_fp32_simulation_matches_onnxruntime():
    m = conv_bn_model()
    x = RNG.normal(0, 1, (3, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = SimulatedModel(graph_from_onnx(m))(torch.from_numpy(x))
    for r, y in zip(ref, got):
        assert np.abs(r - y.numpy()).max() <= 1e-5 * max(1.0, np.abs(r).max())


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_quantized_export_keeps_names_copies_float_nodes_and_agrees_with_simulation(target):
    m = conv_bn_model()
    x = RNG.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    qm = qd.quantize(m, x[:48], qd.QuantizeConfig(target=target, num_calib=48, batch_size=16))
    ex = qd.export(qm)
    g = ex.folded.graph
    assert [i.name for i in g.input] == ["x"] and [o.name for o in g.output] == ["logits", "prob"]
    copied = {n.op_type: n for n in g.node if n.op_type in ("Softmax", "Split")}
    assert copied["Softmax"].attribute[0].i == 1 and copied["Split"].name == "split"  # verbatim, names kept
    v = qd.verify(ex, x[48:], measure_latency=False)
    assert v.agreement.within_1_step >= 0.999, v.agreement
    if target == "ort":
        assert v.coverage["by_type"].get("QLinearConv") == 1 and v.coverage["by_type"].get("QGemm") == 1


def test_reshape_that_moves_the_batch_axis_is_a_verbatim_movement_node():
    """Reshape(x, [-1, 4]) on [N, 2, 4] folds the batch into rows: copied verbatim (any target
    shape is right), and it passes its input's quantizer through, being exact on a grid."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="r")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                          [_init("s", np.array([-1, 4], np.int64))])
    ir = graph_from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op for n in ir.nodes] == ["onnx_movement"]
    x = RNG.normal(0, 1, (3, 2, 4)).astype(np.float32)
    assert SimulatedModel(ir)(torch.from_numpy(x)).shape == (6, 4)


def test_mask_derived_values_stay_float_and_attention_matmuls_are_quantizable():
    """Scores = Q.K^T (both activations) -> a ``matmul``; scores + bias made from the integer
    attention mask -> float (the -1e4 bias would wreck a per-tensor scale); ids -> ``embedding``."""
    d = 4
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"], name="emb", axis=0),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["scores"], name="qk"),
        helper.make_node("Cast", ["mask"], ["mf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"], name="unsq"),
        helper.make_node("Mul", ["mu", "big"], ["bias"], name="bias"),
        helper.make_node("Add", ["scores", "bias"], ["y"], name="masked"),
    ]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
                                       helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "T"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", "T"])],
                          [_init("table", RNG.normal(0, 1, (10, d)).astype(np.float32)),
                           _init("ax", np.array([1], np.int64)), _init("big", np.float32(-1e4))])
    ir = graph_from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    ops = {n.name: n.op for n in ir.nodes}
    assert ops == {"emb": "embedding", "t": "onnx_movement", "qk": "matmul", "cast": "onnx", "unsq": "onnx",
                   "bias": "onnx", "masked": "onnx"}
    plan = qd.get_target("ort").plan(ir)
    assert plan.is_quantized("h") and not plan.is_quantized("bias") and not plan.is_quantized("mask")


def test_same_onnx_and_data_give_byte_identical_exports(tmp_path):
    m = conv_bn_model()
    x = np.random.default_rng(1).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    before = path.read_bytes()
    a = qd.export(qd.quantize(str(path), x, qd.QuantizeConfig(num_calib=32, batch_size=16))).data
    b = qd.export(qd.quantize(m, x, qd.QuantizeConfig(num_calib=32, batch_size=16))).data
    assert a == b and path.read_bytes() == before  # file or in-memory model: same bytes; input untouched


def test_check_compares_layer_by_layer_through_a_node_with_several_outputs():
    """qwt-check on a graph with a Split (a float node with two outputs): each output is
    compared as its own value; the tuple the node yields is not a layer (it crashed before)."""
    m = conv_bn_model()
    x = RNG.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    r = qd.check(m, x[:48], x[48:], qd.QuantizeConfig(target="ort", num_calib=48, batch_size=16))
    d = r.to_dict()
    pair = "ort-cpu[ort] vs pytorch-fake-quant[ort]"
    assert d["failures"] == [] and d["first_divergence"][pair] is None, d["failures"]
    assert {"s0", "s1"} <= {l["value"] for l in d["layers"]}  # the Split's outputs, each compared


def test_a_node_nothing_can_run_is_one_line_naming_the_node_and_op(tmp_path, capsys):
    from qwt_deploy.cli.export import main

    w = _init("w", RNG.normal(0, 1, (4, 3, 3, 3)).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("MyOp", ["c"], ["y"], name="weird", domain="my.domain")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    onnx.save(m, str(tmp_path / "custom.onnx"))
    np.save(tmp_path / "cal.npy", RNG.normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "custom.int8.onnx"
    code = main([str(tmp_path / "custom.onnx"), "--calib-data", str(tmp_path / "cal.npy"), "--quiet", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "node 'weird' (my.domain:MyOp)" in err[0] and "Fix:" in err[0], err
    assert not out.exists()
