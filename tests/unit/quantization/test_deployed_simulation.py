"""The simulation computes what the deployed (folded) graph computes, code for code.

Small CNN with random weights: mechanics only. EfficientNet-Lite0 end to end is in
tests/e2e/test_lite0_end_to_end.py (slow).
"""

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qwt_deploy import api
from qwt_deploy.quantization.fold_arithmetic import int32_bias_codes
from qwt_deploy.quantization.simulate import SimulatedModel, deployed_layer
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx

from conftest import quantized


def _calibrated(program, data):
    qm = quantized(program, data, method="qwt2")
    params = qm.params
    for name in ["stem", "project"]:  # alpha < 0 and a dead channel exercise the fold's special cases
        params.cwac[name].alpha[::3] *= -1.0
    params.cwac["expand"].alpha[1] = 0.0
    return qm


def _weight_inputs(model: onnx.ModelProto, layer: str):
    """INT8 codes, scale and INT32 bias codes feeding the layer's Conv/Gemm in the folded graph."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    node = next(n for n in model.graph.node if n.name.startswith(layer + "/") and n.op_type in ("Conv", "Gemm"))
    w = dq[node.input[1]]
    b = dq[node.input[2]] if len(node.input) > 2 else None
    return (inits[w.input[0]], inits[w.input[1]],
            None if b is None else inits[b.input[0]])


def test_simulation_and_graph_pass_fold_to_the_same_numbers(small_program, mech_data):
    qm = _calibrated(small_program, mech_data)
    g, params = qm.graph, qm.params
    ex = api.export(qm, pad_conv_channels=False)  # the stem's codes as the fold wrote them (3 input channels)
    folded, n = ex.folded, ex.n_folded
    assert n == len(params.cwac) == 5
    for name in params.cwac:
        codes, scale, bias_codes = _weight_inputs(folded, name)
        f = deployed_layer(g.node(name), params)
        np.testing.assert_array_equal(codes, f.codes)
        np.testing.assert_array_equal(scale, f.scale)
        node = g.node(name)
        want, _ = int32_bias_codes(f.bias if f.bias is not None else np.zeros(f.scale.shape),
                                   params.acts[node.inputs[0]].scale, f.scale)
        np.testing.assert_array_equal(bias_codes, want)


def test_every_quantized_value_matches_onnxruntime_integer_kernels(small_program, mech_data):
    """Mark each QuantizeLinear output as a graph output and compare codes with the simulation's.

    With the fold and ORT's requantization emulated, codes could differ only where a float32
    accumulator is inexact (partial sums >= 2**24); on this model that never happens, so every
    code must be equal.
    """
    qm = _calibrated(small_program, mech_data)
    g, plan, params = qm.graph, qm.plan, qm.params
    folded = api.export(qm).folded  # the shipped file
    q_of = {n.name.rsplit("/quant/", 1)[0]: n.output[0] for n in folded.graph.node if n.op_type == "QuantizeLinear"}
    folded.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.UINT8, None)
                               for t in q_of.values())
    sess = SessionFromOnnx(folded.SerializeToString(), threads=2)()
    x = mech_data[:32]
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    values: dict = {}
    SimulatedModel(g, plan, params)(torch.from_numpy(x), intermediates=values)
    compared = 0
    for v, t in q_of.items():
        q = params.acts[v]
        sim_codes = q.codes(values[v]).numpy()
        d = np.abs(sim_codes - outs[t].astype(np.float32))
        assert d.max() <= 1, v
        # bit-exact; a QDQ-semantics simulation misses here (measured: 99.997% on conv2d_3)
        assert np.mean(d == 0) == 1.0, (v, np.mean(d == 0))
        compared += 1
    assert compared >= 6  # input, stem, expand, dw, project/add, gap
