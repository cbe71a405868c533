"""Integer-kernel coverage as a share of conv/matmul FLOPs (runtime.coverage.integer_flop_share):
a hand-made FP32 graph of three Convs and a QDQ copy of it in which the middle Conv is left
float. ONNX Runtime fuses the other two into QLinearConv; the share must be their FLOPs over all
three, found by name (the QDQ exporter's ``<source>/Conv`` naming) and, with the names
scrambled, by weight shapes. The float Conv is followed by a float Sigmoid: ONNX Runtime 1.32
quantizes a ``DQ -> Conv(FP32 weight) -> Q`` unit itself (it writes ``<name>_weight_q``), so a
Conv is float only where no Q follows it. Random weights: mechanics only."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.runtime.coverage import integer_flop_share

SHAPE = (1, 3, 16, 16)
# (name, C_in, C_out, kernel, pads): all 16x16 outputs
CONVS = [("convA", 3, 8, 3, 1), ("convB", 8, 8, 3, 1), ("convC", 8, 4, 1, 0)]
# 2 * out elements * C_in * k * k
FLOPS = {"convA": 2 * 8 * 256 * 3 * 9, "convB": 2 * 8 * 256 * 8 * 9, "convC": 2 * 4 * 256 * 8}


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((co, ci, k, k)).astype(np.float32) * 0.2 for name, ci, co, k, _ in CONVS}


def _model(nodes, inits, opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def fp32_model(sigmoid_after="convB"):
    w = _weights()
    nodes, inits, x = [], [], "x"
    for i, (name, _, _, k, p) in enumerate(CONVS):
        out = "y" if i == len(CONVS) - 1 else f"{name}_out"
        inits.append(numpy_helper.from_array(w[name], f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [out], name=name, kernel_shape=[k, k], pads=[p] * 4))
        if name == sigmoid_after:
            nodes.append(helper.make_node("Sigmoid", [out], [out + "_act"], name=f"{name}/act"))
            out += "_act"
        x = out
    return _model(nodes, inits)


def qdq_model(float_conv="convB", names=None):
    """The QDQ copy: Q/DQ on every activation, INT8 weights behind DequantizeLinear, except
    ``float_conv``, which keeps its FP32 weight and reads the DQ output as float."""
    w = _weights()
    names = names or {}
    nodes, inits = [], []

    def c(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qdq(t, tag):
        s, z = c(f"{tag}.s", np.float32(0.05)), c(f"{tag}.z", np.uint8(128))
        nodes.append(helper.make_node("QuantizeLinear", [t, s, z], [f"{tag}.q"], name=f"{tag}/Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.q", s, z], [f"{tag}.dq"], name=f"{tag}/DQ"))
        return f"{tag}.dq"

    x = qdq("x", "x")
    for i, (name, _, co, k, p) in enumerate(CONVS):
        node_name = names.get(name, name if name == float_conv else f"{name}/Conv")  # as qwt's exporter names them
        if name == float_conv:
            wt = c(f"{name}.w", w[name])
        else:
            scale = (np.abs(w[name]).reshape(co, -1).max(1) / 127).astype(np.float32)
            q = np.clip(np.round(w[name] / scale[:, None, None, None]), -127, 127).astype(np.int8)
            nodes.append(helper.make_node("DequantizeLinear", [c(f"{name}.wq", q), c(f"{name}.ws", scale),
                                                              c(f"{name}.wz", np.zeros(co, np.int8))],
                                          [f"{name}.wdq"], name=f"{name}.w/DQ", axis=0))
            wt = f"{name}.wdq"
        nodes.append(helper.make_node("Conv", [x, wt], [f"{name}.out"], name=node_name, kernel_shape=[k, k], pads=[p] * 4))
        out = f"{name}.out"
        if name == float_conv:  # a float op before the next Q: ORT 1.32 would otherwise quantize
            # a DQ -> Conv(float weight) -> Q unit itself (it writes <name>_weight_q)
            nodes.append(helper.make_node("Sigmoid", [out], [f"{name}.act"], name=f"{name}/act"))
            out = f"{name}.act"
        x = qdq(out, f"{name}.out")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return _model(nodes, inits, opset=19)


def test_one_float_conv_leaves_its_flops_out_of_the_share():
    r = integer_flop_share(fp32_model(), qdq_model("convB"), {"x": SHAPE})
    total = sum(FLOPS.values())
    assert r["flops_total"] == total
    assert r["flops_integer"] == FLOPS["convA"] + FLOPS["convC"]
    assert r["share"] == pytest.approx((FLOPS["convA"] + FLOPS["convC"]) / total)  # 0.283: convB is most of it
    assert (r["ops_total"], r["ops_integer"], r["float_ops"]) == (3, 2, ["convB"])
    assert r["matched_by"] == {"name": 2, "weights": 0} and r["unmatched_integer_kernels"] == []
    assert [n["kernel"] for n in r["nodes"]] == ["QLinearConv", None, "QLinearConv"]


def test_all_integer_gives_share_one_and_batch_scales_flops():
    r = integer_flop_share(fp32_model(None), qdq_model(float_conv=None), {"x": (4,) + SHAPE[1:]})
    assert r["share"] == 1.0 and r["float_ops"] == [] and r["flops_total"] == 4 * sum(FLOPS.values())


def test_names_lost_falls_back_to_weight_shapes_in_graph_order():
    scrambled = {"convA": "n0", "convB": "n1", "convC": "n2"}
    r = integer_flop_share(fp32_model("convA"), qdq_model("convA", names=scrambled), {"x": SHAPE})
    assert r["matched_by"] == {"name": 0, "weights": 2}
    assert r["float_ops"] == ["convA"]
    assert r["flops_integer"] == FLOPS["convB"] + FLOPS["convC"]


def test_flops_of_grouped_conv_conv_transpose_gemm_and_batched_matmul():
    """FLOP formulas on an FP32 graph run as its own "INT8" file: share 0, every op float."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("wg", (8, 2, 3, 3)), ("wt", (8, 4, 2, 2)), ("wm", (64, 5)), ("wgemm", (7, 40))]]
    nodes = [helper.make_node("Conv", ["x", "wg"], ["a"], name="grouped", group=4, kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("ConvTranspose", ["a", "wt"], ["b"], name="up", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["b", "shape3"], ["c"], name="r"),
             helper.make_node("MatMul", ["c", "wm"], ["d"], name="mm"),        # [1, 256, 64] x [64, 5]
             helper.make_node("Reshape", ["d", "shape2"], ["e"], name="r2"),
             helper.make_node("Gemm", ["e", "wgemm"], ["y"], name="fc", transB=1)]  # [32, 40] x [40, 7]
    inits += [numpy_helper.from_array(np.array([1, 256, 64], np.int64), "shape3"),
              numpy_helper.from_array(np.array([32, 40], np.int64), "shape2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = integer_flop_share(m, m, {"x": (1, 8, 16, 16)})
    expect = {"grouped": 2 * 8 * 256 * 2 * 9, "up": 2 * 8 * 256 * 4 * 4, "mm": 2 * 256 * 5 * 64, "fc": 2 * 32 * 7 * 40}
    assert {n["name"]: n["flops"] for n in r["nodes"]} == expect
    assert r["share"] == 0.0 and r["ops_integer"] == 0 and r["flops_unknown"] == []
