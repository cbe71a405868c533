"""The TensorRT layout (``--target trt``) on the small CNN (random weights: mechanics only)."""

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qwt_deploy import api
from qwt_deploy.graph_passes import check_trt_rules, fold_cwac_into_weight_scales
from qwt_deploy.graph_passes.check_trt_rules import errors
from qwt_deploy.comparison.agreement import compare
from qwt_deploy.exporter.qdq import export_onnx
from conftest import capture
from qwt_deploy.quantization.placement import plan_for_trt
from qwt_deploy.quantization.simulate import SimulatedModel
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run
from qwt_deploy.targets import TRT

from conftest import op_counts, quantized


def _calibrated(program, data, target="trt", method="qwt2", **kw):
    return quantized(program, data[:32], target=target, method=method, **kw)


def _check_sim(model, threads=2):
    """What qwt-export's check runs for --target trt: ONNX Runtime on TRT.runtime_copy(model)."""
    return SessionFromOnnx(TRT.runtime_copy(model).SerializeToString(), threads, allow_spinning=False,
                           **TRT.session_settings())()


@pytest.fixture(scope="module")
def trt_model(small_program, mech_data):
    qm = _calibrated(small_program, mech_data)
    ex = api.export(qm)
    return qm.graph, qm.plan, qm.params, ex.unfolded, ex.folded, ex.n_folded


@pytest.fixture(scope="module")
def ort_calibrated(small_program, mech_data):
    """The ort layout's export, for the rule checker (channel pad off: the graph as the fold writes it)."""
    qm = _calibrated(small_program, mech_data, target="ort")
    return qm, api.export(qm, pad_conv_channels=False).folded


def _float_sim(model):
    """The shipped graph as written, in ORT float (QDQ fusion off)."""
    return SessionFromOnnx(model.SerializeToString(), disable_qdq_fusion=True, allow_spinning=False)()


def _readers(model):
    out = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_plan_quantizes_layer_inputs_and_the_skip_input_only(small_program):
    plan = plan_for_trt(capture(small_program))
    assert plan.signed_activations and not plan.int32_bias
    # stem output "clamp" feeds expand (a conv) and the residual add as its skip input: both
    # read it quantized; the project conv's output (fused into the Add) is never quantized
    assert plan.sees_quantized("clamp", "expand") and plan.sees_quantized("clamp", "Add")
    assert not plan.is_quantized("conv2d_3")
    assert plan.sees_quantized("relu", "dw") and plan.sees_quantized("relu6", "project")
    assert plan.activations["view"] == "mean"  # the flatten (a Reshape) commutes: same parameters
    assert plan.weighted == ["stem", "expand", "dw", "project", "fc"]
    # the Add feeds GlobalAveragePool, which does not commute with Q/DQ: Q on its output
    assert plan.is_quantized("add")


def test_trt_graph_shape_types_and_bias(trt_model):
    g, plan, params, unfolded, folded, n = trt_model
    onnx.checker.check_model(folded, full_check=True)
    assert n == 5
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    readers, producers = _readers(folded), _producers(folded)
    for node in folded.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and np.all(zp == 0), node.name  # symmetric INT8, zero point 0
        if node.op_type in ("Conv", "Gemm"):
            x, w = producers[node.input[0]], producers[node.input[1]]
            assert x.op_type == "DequantizeLinear" and w.op_type == "DequantizeLinear", node.name  # Q/DQ on inputs
            assert inits[w.input[0]].dtype == np.int8 and inits[w.input[1]].ndim == 1
            assert w.attribute[0].name == "axis" and w.attribute[0].i == 0
            assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32  # float bias, no INT32 DQ
            # no Q on the output of a weighted op unless the next quantized layer reads it
            for r in readers.get(node.output[0], []):
                assert r.op_type in ("Relu", "Clip", "Add", "QuantizeLinear"), (node.name, r.op_type)
    assert not any(v.dtype == np.int32 for v in inits.values())
    add = [nd for nd in folded.graph.node if nd.op_type == "Add"][0]
    kinds = sorted(producers[i].op_type for i in add.input)
    assert kinds == ["Conv", "DequantizeLinear"]  # skip input quantized, conv input fused


def test_rule_checker_passes_our_trt_export_and_flags_our_ort_export(trt_model, ort_calibrated):
    assert check_trt_rules(trt_model[4]) == []
    ort_model = ort_calibrated[1]
    found = check_trt_rules(ort_model)
    rules = {f.rule for f in errors(found)}
    assert {"quantized-type", "zero-point"} <= rules  # uint8 activations (asymmetric)
    assert any("INT32" in f.message for f in errors(found))  # INT32 bias DQ
    assert not any(f.rule == "unsupported-op" for f in found)  # QDQ format, no QLinear ops
    assert "add-both-inputs-quantized" in {f.rule for f in found}


def test_ort_float_simulation_matches_pytorch_simulation(trt_model, mech_data):
    g, plan, params, unfolded, folded, _ = trt_model
    x = mech_data[:32]
    with torch.no_grad():
        ref = SimulatedModel(g, plan, params)(torch.from_numpy(x)).numpy()
    exact = compare(ref, run(_check_sim(folded), x))  # what qwt-export's check runs
    assert exact.max_steps <= 1e-3, exact  # bit-faithful up to float pooling: no rounding flips at all
    plain = compare(ref, run(_float_sim(folded), x))  # the shipped graph as written
    assert plain.within_1_step >= 0.999 and plain.top1_agreement == 1.0, plain


def test_integer_accumulator_rewrite_is_equivalent(trt_model, mech_data):
    from qwt_deploy.graph_passes.rewrite_layers_as_integer_accumulators import rewrite_layers_as_integer_accumulators

    folded = trt_model[4]
    rewritten, n = rewrite_layers_as_integer_accumulators(folded)
    onnx.checker.check_model(rewritten, full_check=True)
    assert n == 5 and op_counts(rewritten)["Cast"] == 5 and op_counts(rewritten).get("Conv") == 4
    x = mech_data[:32]
    a = run(_float_sim(folded), x)
    b = run(SessionFromOnnx(rewritten.SerializeToString(), level="disable", disable_qdq_fusion=True)(), x)
    agr = compare(a, b)
    assert agr.within_1_step >= 0.999 and agr.max_steps <= 2, agr


def test_fold_with_negative_alpha_and_dead_channel_on_trt_layout(trt_model, mech_data):
    g, plan, params = trt_model[0], trt_model[1], copy.deepcopy(trt_model[2])
    for name in ["stem", "project", "fc"]:
        fit = params.cwac[name]
        fit.alpha[::3] *= -1.0
        fit.beta[::3] += 0.1
    params.cwac["expand"].alpha[1] = 0.0  # dead channel: output is the constant beta
    unfolded = export_onnx(g, plan, params)
    folded, n = fold_cwac_into_weight_scales(unfolded)
    onnx.checker.check_model(folded, full_check=True)
    assert n == 5 and op_counts(unfolded)["Mul"] == 5 and op_counts(folded).get("Mul", 0) == 0
    none_model = export_onnx(g, plan, dataclasses.replace(params, cwac={}))  # the --method none layout
    assert len(folded.graph.node) == len(none_model.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    for name in ["stem", "project", "fc"]:
        assert np.all(inits[f"{name}.weight_scale_folded"] > 0)  # |alpha| in the scale, sign in the codes
        bias = inits[f"{name}.bias_folded"]
        assert bias.dtype == np.float32  # alpha*b + beta stays a float bias
    assert np.all(inits["expand.weight_quantized_folded"][1] == 0)
    assert check_trt_rules(folded) == []
    x = mech_data[:32]
    a, b = run(_float_sim(unfolded), x), run(_float_sim(folded), x)
    assert compare(a, b).within_1_step >= 0.999
    with torch.no_grad():  # the simulation folds params.cwac the same way, alpha<0 included
        ref = SimulatedModel(g, plan, params)(torch.from_numpy(x)).numpy()
    assert compare(ref, run(_check_sim(folded), x)).within_1_step >= 0.999
    assert compare(ref, b).within_1_step >= 0.999


def test_a_rule_error_fails_the_export_with_the_rule_named(ort_calibrated, trt_model):
    import logging

    from qwt_deploy.errors import QwtError

    ort_model = ort_calibrated[1]
    with pytest.raises(QwtError, match="breaks TensorRT rule '(zero-point|quantized-type)'"):
        TRT.validate(ort_model)
    # the findings go to the qwt_deploy logger (a handler on it directly: a CLI run in this
    # process may have switched its propagation to the root logger off)
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("qwt_deploy")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        assert TRT.validate(trt_model[4])["errors"] == 0
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert lines == ["TensorRT rule check: 0 error(s), 0 warning(s)"]


def test_ort_layout_unchanged_by_edge_quantizers(ort_calibrated):
    """The ort plan has no per-edge quantizers, so its export is what it was: every reader
    of a quantized value reads the DequantizeLinear output."""
    qm, m = ort_calibrated
    plan = qm.plan
    assert plan.readers == {} and not plan.signed_activations and plan.int32_bias
    producers = _producers(m)
    add = [nd for nd in m.graph.node if nd.op_type == "Add"][0]
    assert [producers[i].op_type for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]


def test_trt_export_is_deterministic(trt_model, small_program, mech_data):
    b = api.export(_calibrated(small_program, mech_data)).data
    assert trt_model[4].SerializeToString() == b


def test_low_bit_trt_layout_matches_simulation(small_program, mech_data):
    qm = _calibrated(small_program, mech_data, w_bits=4, a_bits=6)
    assert all(q.signed and q.zero_point == 0 and q.qmin == -32 and q.qmax == 31 for q in qm.params.acts.values())
    m = api.export(qm).folded
    assert errors(check_trt_rules(m)) == []
    x = mech_data[:16]
    ref = qm(x)
    assert compare(ref, run(_check_sim(m), x)).within_1_step >= 0.999


class _Branchy(torch.nn.Module):
    """Concat of two convs, max-pool, an SE-style Mul by a sigmoid gate, avg-pool, Linear."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.c, self.se, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        F = torch.nn.functional
        y = F.max_pool2d(torch.cat([torch.relu(self.a(x)), self.b(x)], 1), 2)
        z = self.c(y)
        z = F.avg_pool2d(z * torch.sigmoid(self.se(F.adaptive_avg_pool2d(z, 1))), 2)
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


def test_concat_pooling_and_gates_on_trt_layout(mech_data):
    from conftest import export_program

    torch.manual_seed(0)
    program = export_program(_Branchy().eval(), torch.zeros(2, 3, 16, 16))
    plan = plan_for_trt(capture(program))
    assert not plan.is_quantized("cat") and not plan.is_quantized("relu")  # one Q after the Concat+MaxPool
    assert plan.sees_quantized("max_pool2d", "c")
    assert plan.is_quantized("mul") and plan.is_quantized("sigmoid")  # Mul: DQ inputs, Q output
    x = mech_data[:32, :, :16, :16].copy()
    qm = quantized(program, x, target="trt")
    assert qm.plan == plan  # the API places quantizers as the trt planner does
    m = api.export(qm).folded
    onnx.checker.check_model(m, full_check=True)
    assert check_trt_rules(m) == []
    assert compare(qm(x), run(_check_sim(m), x)).within_1_step >= 0.999
