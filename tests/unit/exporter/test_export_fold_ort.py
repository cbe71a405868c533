"""Export, fold and ONNX Runtime checks on a small CNN (random weights: mechanics only)."""

import numpy as np
import onnx
import pytest
import torch

from qwt_deploy import api
from qwt_deploy.comparison.agreement import compare
from qwt_deploy.exporter.qdq import export_onnx
from conftest import capture
from qwt_deploy.quantization.simulate import SimulatedModel
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run

from conftest import op_counts, quantized


def test_capture_folds_bn_pad_and_activations(small_program, small_cnn):
    g = capture(small_program)
    assert [n.op for n in g.nodes] == ["conv", "conv", "conv", "conv", "add", "gap", "onnx_movement", "linear"]
    assert tuple(g.nodes[0].attrs["pads"]) == (0, 0, 1, 1)  # the ZeroPad2d became asymmetric conv padding
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(SimulatedModel(g)(x).numpy(), small_cnn(x).numpy(), atol=1e-5)


def test_fp32_onnx_matches_pytorch(small_program, small_cnn):
    g = capture(small_program)
    m = export_onnx(g)
    onnx.checker.check_model(m, full_check=True)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = run(SessionFromOnnx(m.SerializeToString())(), x)
    np.testing.assert_allclose(got, small_cnn(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def test_folded_equals_unfolded_within_one_step_including_negative_alpha(small_program, mech_data):
    qm = quantized(small_program, mech_data)
    params = qm.params
    # force alpha < 0 on some channels of two layers (and a dead channel) to exercise the sign flip
    for name in ["stem", "project"]:
        fit = params.cwac[name]
        fit.alpha[::3] *= -1.0
        fit.beta[::3] += 0.1
    params.cwac["expand"].alpha[1] = 0.0
    ex = api.export(qm, pad_conv_channels=False)  # node counts below are the fold's alone
    unfolded, folded, n = ex.unfolded, ex.folded, ex.n_folded
    onnx.checker.check_model(folded, full_check=True)
    assert n == 5
    none_model = api.export(quantized(small_program, mech_data, method="none"), pad_conv_channels=False).unfolded
    assert len(folded.graph.node) == len(none_model.graph.node)
    assert op_counts(unfolded)["Mul"] == 5 and op_counts(folded).get("Mul", 0) == 0
    for name in ["stem", "project"]:  # scales stay positive, codes flipped
        scale = [i for i in folded.graph.initializer if i.name == f"{name}.weight_scale_folded"][0]
        assert np.all(onnx.numpy_helper.to_array(scale) > 0)
    x = mech_data[:32]
    for level in ("disable", "all"):
        a = run(SessionFromOnnx(unfolded.SerializeToString(), level=level)(), x)
        b = run(SessionFromOnnx(folded.SerializeToString(), level=level)(), x)
        agr = compare(a, b)
        assert agr.within_1_step >= 0.999, agr


def test_ort_uses_integer_kernels_and_matches_simulation(small_program, mech_data, tmp_path):
    qm = quantized(small_program, mech_data)
    folded = api.export(qm).folded  # the shipped file (stem input channels padded to 4)
    opt = str(tmp_path / "opt.onnx")
    sess = SessionFromOnnx(folded.SerializeToString(), optimized_model_path=opt)()
    ops = op_counts(onnx.load(opt))
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 1 and ops["QLinearAdd"] == 1
    assert ops.get("Conv", 0) == ops.get("FusedConv", 0) == ops.get("Add", 0) == 0
    x = mech_data[:32]
    agr = compare(qm(x), run(sess, x))
    assert agr.within_1_step >= 0.999, agr


def test_weights_are_int8_initializers_and_biases_int32(small_program, mech_data):
    m = api.export(quantized(small_program, mech_data)).folded
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    weights = [v for k, v in inits.items() if "weight_quantized" in k]
    assert len(weights) == 5 and all(w.dtype == np.int8 and np.abs(w).max() <= 127 for w in weights)
    assert all(v.dtype == np.int32 for k, v in inits.items() if "bias_quantized" in k)
    assert not any(v.dtype == np.float32 and v.size > 64 for v in inits.values())  # no float weight tensors
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (6, 6)])
def test_low_bit_emulation_stays_in_range(small_program, mech_data, w_bits, a_bits):
    qm = quantized(small_program, mech_data, w_bits=w_bits, a_bits=a_bits)
    assert all(int(w.q.abs().max()) <= 2 ** (w_bits - 1) - 1 for w in qm.params.weights.values())
    m = api.export(qm).folded
    x = mech_data[:16]
    ref = qm(x)
    got = run(SessionFromOnnx(m.SerializeToString())(), x)
    assert compare(ref, got).within_1_step >= 0.999


def test_same_inputs_and_seed_give_byte_identical_onnx(small_program, mech_data):
    a = api.export(quantized(small_program, mech_data)).data
    b = api.export(quantized(small_program, mech_data)).data
    assert a == b
