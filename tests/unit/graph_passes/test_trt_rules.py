"""The TensorRT rule checker: one small ONNX graph per rule, built to break exactly that rule.

Each graph starts from a conformant Conv unit (symmetric INT8 activation Q/DQ, per-channel
INT8 weight DQ on axis 0, float bias) and changes one thing.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.graph_passes.check_trt_rules import ERROR, WARNING, check_trt_rules, errors, format_findings


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


class G:
    """A tiny graph builder for rule tests."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name, arr):
        self.inits.append(_init(name, arr))
        return name

    def node(self, op, ins, name, **attrs):
        out = name + ":0"
        self.nodes.append(helper.make_node(op, ins, [out], name=name, **attrs))
        return out

    def qdq(self, x, name, scale=0.05, zp=np.int8(0)):
        s = self.const(name + ".s", np.array(scale, np.float32))
        z = self.const(name + ".z", np.array(zp))
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z], name + "/Q"), s, z], name + "/DQ")

    def weight(self, name, cout=4, cin=3, k=3, axis=0, scale=None, codes_dtype=np.int8):
        codes = np.ones((cout, cin, k, k), codes_dtype)
        scale = np.full(cout, 0.01, np.float32) if scale is None else np.asarray(scale, np.float32)
        zp = np.zeros(scale.shape, codes_dtype)
        return self.node("DequantizeLinear", [self.const(name + ".q", codes), self.const(name + ".s", scale),
                                              self.const(name + ".z", zp)], name + "/DQ", axis=axis)

    def conv(self, x, name, **kw):
        w = self.weight(name + ".w", **kw)
        b = self.const(name + ".b", np.zeros(4, np.float32))
        return self.node("Conv", [x, w, b], name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    def model(self, out, opset=17, in_ch=3):
        g = helper.make_graph(self.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_ch, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m


def _good_conv_model(**kw):
    g = G()
    return g.model(g.conv(g.qdq("x", "in"), "conv", **kw))


def _rules(findings, severity=None):
    return [(f.rule, f.node) for f in findings if severity is None or f.severity == severity]


def test_conformant_graph_has_no_findings():
    f = check_trt_rules(_good_conv_model())
    assert f == [], format_findings(f)


def test_nonzero_zero_point_is_an_error():
    g = G()
    m = g.model(g.conv(g.qdq("x", "in", zp=np.int8(3)), "conv"))
    f = check_trt_rules(m)
    assert set(_rules(f, ERROR)) == {("zero-point", "in/Q"), ("zero-point", "in/DQ")}
    assert "[3]" in f[0].message and "zero point 0" in f[0].fix


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan")])
def test_scale_not_positive_is_an_error(scale):
    g = G()
    m = g.model(g.conv(g.qdq("x", "in", scale=scale), "conv"))
    assert set(_rules(check_trt_rules(m), ERROR)) == {("scale-positive", "in/Q"), ("scale-positive", "in/DQ")}


def test_negative_per_channel_weight_scale_is_an_error():
    m = _good_conv_model(scale=[0.01, -0.01, 0.01, 0.01])
    assert _rules(check_trt_rules(m), ERROR) == [("scale-positive", "conv.w/DQ")]


def test_uint8_activation_is_an_error():
    g = G()
    m = g.model(g.conv(g.qdq("x", "in", zp=np.uint8(0)), "conv"))
    assert set(_rules(check_trt_rules(m), ERROR)) == {("quantized-type", "in/Q"), ("quantized-type", "in/DQ")}


def test_int32_bias_dq_is_an_error():
    g = G()
    x = g.qdq("x", "in")
    w = g.weight("w")
    b = g.node("DequantizeLinear", [g.const("b.q", np.zeros(4, np.int32)), g.const("b.s", np.full(4, 1e-4, np.float32)),
                                    g.const("b.z", np.zeros(4, np.int32))], "b/DQ", axis=0)
    m = g.model(g.node("Conv", [x, w, b], "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    f = check_trt_rules(m)
    assert _rules(f, ERROR) == [("quantized-type", "b/DQ")]
    assert "INT32" in f[0].message and "float" in f[0].fix


@pytest.mark.parametrize("op", ["QLinearConv", "ConvInteger", "DynamicQuantizeLinear", "MatMulInteger"])
def test_operator_format_and_integer_ops_are_errors(op):
    g = G()
    n = helper.make_node(op, ["x"], ["y"], name="bad")  # inputs need not be valid: the op type alone is the error
    g.nodes.append(n)
    m = g.model("y")
    assert ("unsupported-op", "bad") in _rules(check_trt_rules(m), ERROR)


def test_per_channel_activation_is_an_error():
    g = G()
    s = g.const("in.s", np.full(3, 0.05, np.float32))
    z = g.const("in.z", np.zeros(3, np.int8))
    x = g.node("DequantizeLinear", [g.node("QuantizeLinear", ["x", s, z], "in/Q", axis=1), s, z], "in/DQ", axis=1)
    m = g.model(g.conv(x, "conv"))
    assert set(_rules(check_trt_rules(m), ERROR)) == {("per-channel", "in/Q"), ("per-channel", "in/DQ")}


def test_per_channel_weight_on_the_wrong_axis_is_an_error():
    g = G()
    x = g.qdq("x", "in")
    w = g.weight("w", cout=4, cin=3, axis=1, scale=np.full(3, 0.01))  # per input channel: not valid
    m = g.model(g.node("Conv", [x, w], "conv", kernel_shape=[3, 3]))
    f = check_trt_rules(m)
    assert _rules(f, ERROR) == [("per-channel", "w/DQ")] and "axis=0" in f[0].fix


def test_per_channel_axis_out_of_range_is_an_error():
    g = G()
    m = g.model(g.conv(g.qdq("x", "in"), "conv", axis=7))
    assert _rules(check_trt_rules(m), ERROR) == [("per-channel", "conv.w/DQ")]


def test_gemm_trans_b_weight_axis_must_be_zero():
    g = G()
    x = g.node("Flatten", [g.qdq("x", "in")], "flat", axis=1)
    codes = np.ones((10, 192), np.int8)
    w = g.node("DequantizeLinear", [g.const("w.q", codes), g.const("w.s", np.full(192, 0.01, np.float32)),
                                    g.const("w.z", np.zeros(192, np.int8))], "w/DQ", axis=1)
    m = g.model(g.node("Gemm", [x, w], "fc", transB=1))
    assert _rules(check_trt_rules(m), ERROR) == [("per-channel", "w/DQ")]


def test_old_opset_is_an_error():
    g = G()
    s, z = g.const("s", np.array(0.05, np.float32)), g.const("z", np.array(0, np.int8))
    m = g.model(g.node("DequantizeLinear", [g.node("QuantizeLinear", ["x", s, z], "q"), s, z], "dq"), opset=11)
    assert ("opset", "<model>") in _rules(check_trt_rules(m), ERROR)


def test_scale_dtype_must_match_input_in_strongly_typed_mode():
    g = G()
    s, z = g.const("s", np.array(0.05, np.float16)), g.const("z", np.array(0, np.int8))
    y = g.node("DequantizeLinear", [g.node("QuantizeLinear", ["x", s, z], "q"), s, z], "dq")
    m = g.model(g.conv(g.node("Cast", [y], "cast", to=TensorProto.FLOAT), "conv"), opset=19)
    assert ("scale-dtype", "q") in _rules(check_trt_rules(m), ERROR)


# --- placement warnings ------------------------------------------------------------------

def test_q_on_output_feeding_a_graph_output_is_a_warning():
    g = G()
    m = g.model(g.qdq(g.conv(g.qdq("x", "in"), "conv"), "out"))
    f = check_trt_rules(m)
    assert errors(f) == [] and _rules(f, WARNING) == [("q-feeds-float", "out/DQ")]


def test_q_on_both_add_inputs_is_a_warning():
    g = G()
    x = g.qdq("x", "in")
    c1 = g.conv(x, "c1")
    skip = g.qdq(g.conv(x, "c0"), "skip")
    m = g.model(g.node("Add", [skip, g.qdq(c1, "c1q")], "add"))
    f = check_trt_rules(m)
    assert errors(f) == [] and _rules(f, WARNING) == [("add-both-inputs-quantized", "add")]
    # the TensorRT layout: Q/DQ on the skip input only -> no finding
    g = G()
    x = g.qdq("x", "in")
    m = g.model(g.node("Add", [g.qdq(g.conv(x, "c0"), "skip"), g.conv(x, "c1")], "add"))
    assert check_trt_rules(m) == []


def test_concat_scale_mismatch_is_a_warning():
    g = G()
    cat = g.node("Concat", [g.qdq("x", "a", scale=0.05), g.qdq("x", "b", scale=0.07)], "cat", axis=1)
    m = g.model(g.node("Conv", [g.qdq(cat, "c", scale=0.07), g.weight("w", cin=6)], "conv", kernel_shape=[3, 3]))
    assert _rules(check_trt_rules(m), WARNING) == [("concat-scale-mismatch", "cat")]
    g = G()  # one shared scale: fine
    cat = g.node("Concat", [g.qdq("x", "a", scale=0.07), g.qdq("x", "b", scale=0.07)], "cat", axis=1)
    m = g.model(g.node("Conv", [g.qdq(cat, "c", scale=0.07), g.weight("w", cin=6)], "conv", kernel_shape=[3, 3]))
    assert check_trt_rules(m) == []


def test_qdq_between_pad_and_conv_is_a_warning():
    g = G()
    pads = g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    padded = g.node("Pad", ["x", pads], "pad")
    m = g.model(g.node("Conv", [g.qdq(padded, "in"), g.weight("w")], "conv", kernel_shape=[3, 3]))
    assert _rules(check_trt_rules(m), WARNING) == [("qdq-between-pad-and-conv", "in/Q")]


def test_half_quantized_weighted_op_is_a_warning():
    g = G()
    m = g.model(g.node("Conv", ["x", g.weight("w")], "conv", kernel_shape=[3, 3]))
    assert _rules(check_trt_rules(m), WARNING) == [("weighted-op-half-quantized", "conv")]


def test_format_findings_is_a_table_with_a_count():
    g = G()
    m = g.model(g.conv(g.qdq("x", "in", zp=np.uint8(7)), "conv"))
    text = format_findings(check_trt_rules(m))
    first, header = text.splitlines()[:2]
    assert first.startswith("TensorRT rule check: 4 error(s)")
    assert header.split() == ["severity", "rule", "count", "fix"]
    assert "zero-point" in text and "quantized-type" in text
