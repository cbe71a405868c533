"""INT8 coverage of ORT's optimized graph: the float bias ``Add`` that ONNX Runtime leaves after
a ``MatMulIntegerToFloat`` (a quantized transformer Linear) is counted as that kernel's
epilogue, apart from float compute; anything that merely looks similar stays float compute."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.runtime.coverage import int8_coverage

K, N = 16, 8


def _mm_int_to_float(name, a, w="w", out=None):
    """MatMulIntegerToFloat(A uint8, B int8 [K, N], scales, zero points) -> float, as ORT fuses it."""
    return helper.make_node("MatMulIntegerToFloat", [a, w, "a_scale", "w_scale", "a_zp", "w_zp"], [out or name + "_y"],
                            name=name, domain="com.microsoft")


def _graph(nodes, outputs, extra_inits=()):
    inits = [numpy_helper.from_array(np.ones((K, N), np.int8), "w"),
             numpy_helper.from_array(np.float32(0.1), "a_scale"),
             numpy_helper.from_array(np.full(N, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.uint8(128), "a_zp"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w_zp"),
             numpy_helper.from_array(np.arange(N, dtype=np.float32), "bias"),
             numpy_helper.from_array(np.arange(N, dtype=np.float32).reshape(1, 1, N), "bias3d"),
             numpy_helper.from_array(np.arange(2 * N, dtype=np.float32), "wrong_len"), *extra_inits]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [2, 4, K]),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, N])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_bias_add_after_integer_matmul_is_an_epilogue_not_float_compute():
    nodes = [_mm_int_to_float("lin1", "xq"), helper.make_node("Add", ["lin1_y", "bias"], ["y1"]),
             _mm_int_to_float("lin2", "xq"), helper.make_node("Add", ["bias3d", "lin2_y"], ["y2"]),  # either order
             helper.make_node("Add", ["y1", "y2"], ["s"]),  # activation + activation: float compute
             helper.make_node("Add", ["x", "bias"], ["y3"])]  # constant, but no integer kernel before it
    cov = int8_coverage(_graph(nodes, ["s", "y3"]))
    assert cov["bias_epilogues"] == 2
    assert cov["by_type"] == {"MatMulIntegerToFloat": 2, "float Add": 2, "bias epilogue Add": 2}
    assert (cov["integer_ops"], cov["compute_ops"]) == (2, 4)


@pytest.mark.parametrize("case", ["second_reader", "graph_output", "wrong_length", "activation_weight", "not_const"])
def test_look_alikes_stay_float_compute(case):
    """Each breaks one condition of the epilogue rule, so the Add is float compute."""
    outputs, extra = ["y"], []
    mm = _mm_int_to_float("lin", "xq")
    bias = {"wrong_length": "wrong_len", "not_const": "x"}.get(case, "bias")
    nodes = [mm, helper.make_node("Add", ["lin_y", bias], ["y"])]
    if case == "second_reader":  # the accumulator is read elsewhere too: the kernel cannot own the Add
        nodes.append(helper.make_node("Relu", ["lin_y"], ["r"]))
        outputs.append("r")
    elif case == "graph_output":
        outputs.append("lin_y")
    elif case == "activation_weight":  # Q.K^T-style: both operands are activations
        nodes[0] = _mm_int_to_float("lin", "xq", w="xq_t", out="lin_y")
        nodes.insert(0, helper.make_node("Transpose", ["xq"], ["xq_t"], perm=[0, 2, 1]))
    cov = int8_coverage(_graph(nodes, outputs, extra))
    assert cov["bias_epilogues"] == 0 and cov["by_type"].get("float Add") == 1
    assert cov["compute_ops"] == cov["integer_ops"] + 1


def _qdq_linear_model(seed=0) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul(DQ(int8 W, per-channel axis 1)) -> Add(bias) -> Q/DQ: one quantized
    transformer Linear on (batch, tokens, dim), laid out as qwt-export writes it."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(rng.uniform(0.01, 0.02, N).astype(np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w_z"), numpy_helper.from_array(np.float32(0.05), "x_s"),
             numpy_helper.from_array(np.uint8(128), "x_z"), numpy_helper.from_array(np.float32(0.2), "y_s"),
             numpy_helper.from_array(np.uint8(128), "y_z"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["lin"]),
             helper.make_node("QuantizeLinear", ["lin", "y_s", "y_z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["y"])]
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_ort_optimized_quantized_linear_counts_its_bias_as_epilogue(tmp_path):
    """What ORT really does to a quantized Linear: an integer MatMul kernel plus a float bias Add,
    and the coverage counts the Linear as fully integer."""
    src, opt = str(tmp_path / "lin.onnx"), str(tmp_path / "lin.opt.onnx")
    onnx.save(_qdq_linear_model(), src)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.optimized_model_filepath = opt
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(opt)
    ops = [n.op_type for n in optimized.graph.node]
    assert "MatMulIntegerToFloat" in ops and "Add" in ops, ops  # ORT's fusion, as on fashion-vit
    cov = int8_coverage(optimized)
    assert cov["bias_epilogues"] == ops.count("Add") == 1
    assert cov["integer_ops"] == cov["compute_ops"] == 1 and "float Add" not in cov["by_type"]
