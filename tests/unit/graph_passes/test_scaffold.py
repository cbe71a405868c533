"""graph_passes/scaffold.py: every rewriting pass keeps the model-level fields (metadata_props,
opset imports, IR version, producer, doc strings) and the graph outputs, and ends with
cleanup + toposort. The passes run on a tiny hand-built QDQ model that each of them rewrites."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.graph_passes import (emulate_fp16_in_fp32, fold_cwac_into_weight_scales, pad_conv_input_channels,
                                     rewrite_layers_as_integer_accumulators)
from qwt_deploy.graph_passes.helpers import const, int8_weight_dq
from qwt_deploy.graph_passes.scaffold import apply_all, run_pass

X_SCALE, Y_SCALE = 0.05, 0.1
METADATA = [("qwt.labels", "cat,dog"), ("qwt.preprocess", "{\"mean\": [0.5]}")]


def _qdq_model() -> onnx.ModelProto:
    """x -> Q/DQ (uint8, zero point 0) -> Conv(DQ(INT8 W [4, 3, 3, 3], per-channel axis 0), bias)
    -> Mul(alpha) -> Add(beta) -> Q/DQ -> y, and beside it an FP16 branch
    x -> Cast(fp16) -> Mul(fp16 k) -> Cast(float) -> z."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(X_SCALE, np.float32), "x.scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x.zero_point"),
        numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "conv.weight_quantized"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.015, 0.03], np.float32), "conv.weight_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "conv.weight_zero_point"),
        numpy_helper.from_array(np.array([0.1, -0.2, 0.3, 0.0], np.float32), "conv.bias"),
        numpy_helper.from_array(np.array([1.5, -0.5, 0.75, 2.0], np.float32).reshape(1, 4, 1, 1), "cwac.alpha"),
        numpy_helper.from_array(np.array([0.2, 0.1, -0.3, 0.05], np.float32).reshape(1, 4, 1, 1), "cwac.beta"),
        numpy_helper.from_array(np.array(Y_SCALE, np.float32), "y.scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y.zero_point"),
        numpy_helper.from_array(np.array([0.3333], np.float16), "branch.k"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero_point"], ["x_q"], name="x/Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x.scale", "x.zero_point"], ["x_dq"], name="x/DQ"),
        helper.make_node("DequantizeLinear", ["conv.weight_quantized", "conv.weight_scale", "conv.weight_zero_point"],
                         ["conv.weight"], name="conv.weight/DQ", axis=0),
        helper.make_node("Conv", ["x_dq", "conv.weight", "conv.bias"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["conv_out", "cwac.alpha"], ["cwac_mul"], name="conv.cwac/Mul"),
        helper.make_node("Add", ["cwac_mul", "cwac.beta"], ["cwac_add"], name="conv.cwac/Add"),
        helper.make_node("QuantizeLinear", ["cwac_add", "y.scale", "y.zero_point"], ["y_q"], name="y/Q"),
        helper.make_node("DequantizeLinear", ["y_q", "y.scale", "y.zero_point"], ["y"], name="y/DQ"),
        helper.make_node("Cast", ["x"], ["x16"], name="branch/cast16", to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["x16", "branch.k"], ["z16"], name="branch/Mul"),
        helper.make_node("Cast", ["z16"], ["z"], name="branch/cast32", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "tiny_qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 8, 8])],
                              initializer=inits, doc_string="graph doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qwt-deploy",
                              producer_version="0.1.0", doc_string="model doc", domain="ai.qwt.test", model_version=3)
    model.ir_version = 8
    for k, v in METADATA:
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def model():
    return _qdq_model()


@pytest.fixture(scope="module")
def x():
    return np.abs(np.random.default_rng(1).standard_normal((1, 3, 8, 8))).astype(np.float32)


PASSES = {
    "fold": fold_cwac_into_weight_scales,
    "pad": pad_conv_input_channels,
    "rewrite": rewrite_layers_as_integer_accumulators,
    "emulate": emulate_fp16_in_fp32,
}


@pytest.mark.parametrize("name", list(PASSES))
def test_pass_keeps_model_fields_and_outputs(name, model):
    before = model.SerializeToString()
    out, n = PASSES[name](model)
    assert n == 1  # every pass has exactly one match in the tiny model: the test exercises a real rewrite
    onnx.checker.check_model(out, full_check=True)
    assert [(p.key, p.value) for p in out.metadata_props] == METADATA
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17)]
    assert out.ir_version == 8
    assert (out.producer_name, out.producer_version) == ("qwt-deploy", "0.1.0")
    assert (out.doc_string, out.graph.doc_string, out.domain, out.model_version) == \
        ("model doc", "graph doc", "ai.qwt.test", 3)
    assert [(o.name, o.type.tensor_type.elem_type) for o in out.graph.output] == \
        [("y", TensorProto.FLOAT), ("z", TensorProto.FLOAT)]
    assert [i.name for i in out.graph.input] == ["x"]
    assert model.SerializeToString() == before  # the input model is not modified


def test_fold_removes_the_cwac_pair_and_keeps_the_result(model, x):
    folded, n = fold_cwac_into_weight_scales(model)
    assert n == 1 and _ops(folded).count("Add") == 0
    assert [n.name for n in folded.graph.node if n.op_type == "Mul"] == ["branch/Mul"]  # the FP16 branch's
    inits = _initializers(folded)
    alpha = np.array([1.5, -0.5, 0.75, 2.0])
    assert np.allclose(inits["conv.weight_scale_folded"], np.abs(alpha) * [0.01, 0.02, 0.015, 0.03], rtol=1e-6)
    codes = _initializers(model)["conv.weight_quantized"]
    assert np.array_equal(inits["conv.weight_quantized_folded"][1], -codes[1])  # alpha < 0: channel negated
    assert np.allclose(inits["conv.bias_folded"], alpha * [0.1, -0.2, 0.3, 0.0] + [0.2, 0.1, -0.3, 0.05], atol=1e-6)
    a, b = _run(model, x), _run(folded, x)
    assert np.max(np.abs(a["y"] - b["y"])) <= Y_SCALE + 1e-6 and np.mean(a["y"] == b["y"]) > 0.95
    assert np.array_equal(a["z"], b["z"])


def test_pad_and_rewrite_compute_the_same_outputs(model, x):
    padded, _ = pad_conv_input_channels(model)
    assert _initializers(padded)["conv.weight_quantized_padded"].shape == (4, 4, 3, 3) and "Pad" in _ops(padded)
    rewritten, _ = rewrite_layers_as_integer_accumulators(model)
    assert "conv/acc_cast" in [n.name for n in rewritten.graph.node]
    want = _run(model, x)
    for got in (_run(padded, x)["y"], _run(rewritten, x)["y"]):  # float sums: a rare one-step flip
        assert np.max(np.abs(got - want["y"])) <= Y_SCALE + 1e-6 and np.mean(got == want["y"]) > 0.95


def test_emulate_rounds_the_fp16_branch_like_fp16_arithmetic(model, x):
    emulated, n = emulate_fp16_in_fp32(model)
    assert n == 1 and "branch/Mul/fp16_round" in [n.name for n in emulated.graph.node]
    want = (x.astype(np.float16) * np.float16(0.3333)).astype(np.float32)
    assert np.array_equal(_run(emulated, x)["z"], want)


def test_scaffold_runs_cleanup_and_toposort():
    """A dangling node and an unused initializer are removed; nodes listed out of order come
    back in topological order; ``apply`` sees the graph before cleanup."""
    nodes = [
        helper.make_node("Neg", ["r"], ["y"], name="neg"),  # listed before its producer
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["x"], ["dangling_out"], name="dangling"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              initializer=[numpy_helper.from_array(np.ones(2, np.float32), "unused_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, seen = run_pass(model, lambda g: sorted(n.name for n in g.nodes))
    assert seen == ["dangling", "neg", "relu"]
    assert [n.name for n in out.graph.node] == ["relu", "neg"]
    assert [i.name for i in out.graph.initializer] == []
    # fields the input does not set stay unset: the scaffold adds nothing to the serialized model
    assert not out.HasField("doc_string") and not out.HasField("model_version") and len(out.metadata_props) == 0


def test_apply_all_selects_before_it_rewrites():
    """Nodes an action appends are not selected again (the action here would loop forever)."""
    graph = gs.import_onnx(_qdq_model())

    def select(n):
        return n if n.op == "Mul" else None

    def action(g, m):
        out = gs.Variable(f"{m.name}/again", dtype=np.float32)
        g.nodes.append(gs.Node("Mul", f"{m.name}/again", inputs=[m.outputs[0], m.inputs[1]], outputs=[out]))

    matches = apply_all(graph, select, action)
    assert [m.name for m in matches] == ["conv.cwac/Mul", "branch/Mul"]
    assert sum(n.op == "Mul" for n in graph.nodes) == 4


def test_weight_dq_lookup_and_build_time_constants():
    graph = gs.import_onnx(_qdq_model())
    conv = next(n for n in graph.nodes if n.op == "Conv")
    found = int8_weight_dq(conv)
    assert found.dq.name == "conv.weight/DQ" and found.codes.shape == (4, 3, 3, 3) and found.scale.tolist() == \
        pytest.approx([0.01, 0.02, 0.015, 0.03])
    found.dq.inputs[2] = gs.Constant("nonzero_zp", np.ones(4, np.int8))
    assert int8_weight_dq(conv) is None  # zero point must be 0
    found.dq.inputs[2] = gs.Variable("")  # an omitted optional input means zero point 0
    assert int8_weight_dq(conv) is not None
    # a Constant node -> Cast chain is a constant at build time only
    c, cast = gs.Variable("c", dtype=np.int64), gs.Variable("cast", dtype=np.float32)
    gs.Node("Constant", attrs={"value": gs.Constant("v", np.array([2], np.int64))}, outputs=[c])
    gs.Node("Cast", attrs={"to": TensorProto.FLOAT}, inputs=[c], outputs=[cast])
    v = const(cast, build_time=True)
    assert const(cast) is None and v.dtype == np.float32 and v.tolist() == [2.0]
