"""Transformer mechanics on a tiny random-weight BERT-like encoder (never accuracy).

The encoder (conftest.TinyEncoder) has what all-MiniLM-L6-v2 has: token + position
embeddings, LayerNorm, one attention block with an additive padding mask, a GELU MLP, residual
adds, and mean-pooling over the mask with L2 normalisation; two int64 inputs with dynamic
batch and sequence axes.
"""

import collections
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from qwt_deploy import api
from qwt_deploy.comparison.agreement import compare
from qwt_deploy.errors import QwtError
from conftest import capture
from qwt_deploy.quantization.placement import plan_for_ort
from qwt_deploy.quantization.simulate import SimulatedModel
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx

from conftest import MAX_LEN, TinyEncoder, quantized
from conftest import tokens as _tokens


@pytest.fixture(scope="module")
def encoder():
    return TinyEncoder().eval()


def _program(encoder):
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=MAX_LEN)
    ids, mask = _tokens(np.random.default_rng(0), 2, 8)
    return torch.export.export(encoder, (ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))


def _capture(encoder):
    return capture(_program(encoder))


@pytest.fixture(scope="module")
def program(encoder):
    return _program(encoder)


@pytest.fixture(scope="module")
def graph(program):
    return capture(program)


def _calib_tokens():
    """64 right-padded sentences of 2..16 tokens; the API sorts them by length and trims each
    batch to its longest sentence, so the sequence length varies per batch."""
    ids, mask = _tokens(np.random.default_rng(1), 64, 16)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _calibrated(program, method="qwt2", **kw):
    return quantized(program, _calib_tokens(), method=method, batch_size=8, **kw)


@pytest.fixture(scope="module")
def calibrated(program):
    return _calibrated(program)


def _ort(model, optimized=None):
    return SessionFromOnnx(model.SerializeToString(), threads=1, optimized_model_path=optimized, allow_spinning=False)()


def _feed(ids, mask):
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def test_capture_covers_the_encoder_and_matches_pytorch(graph, encoder):
    ops = collections.Counter(n.attrs["proto"].op_type if n.op == "onnx" else n.op for n in graph.nodes)
    assert ops["linear"] == 6 and ops["matmul"] == 2 and ops["LayerNormalization"] == 3 and ops["Softmax"] == 1
    assert ops["embedding"] == 1 and ops["Gelu"] == 1 and ops["add"] == 2  # the two residual adds
    assert graph.input_dtypes == {"input_ids": torch.int64, "attention_mask": torch.int64}
    assert graph.dim_names["input_ids"][0] == "batch" and isinstance(graph.dim_names["input_ids"][1], str)  # dynamic (a saved program keeps no Dim names) and graph.dims(graph.outputs[0]) == ["batch", 32]
    ids, mask = _tokens(np.random.default_rng(2), 4, 11)  # a length the trace never saw
    with torch.no_grad():
        torch.testing.assert_close(SimulatedModel(graph)((ids, mask)), encoder(ids, mask), atol=1e-5, rtol=1e-5)


def test_placement_quantizes_linears_and_attention_matmuls_not_ids_mask_or_norms(graph, calibrated):
    plan = calibrated.plan
    assert not plan.is_quantized("input_ids") and not plan.is_quantized("attention_mask")
    matmuls = [n for n in graph.nodes if n.op == "matmul"]
    for n in matmuls + [n for n in graph.nodes if n.op == "linear"]:
        assert all(plan.is_quantized(v) for v in n.inputs)  # activation x activation: DQ on both inputs
    # outputs get a Q only where a reader needs one (MatMulIntegerToFloat needs none):
    # Q.K^T feeds the float scale/mask/softmax; P.V reaches the o projection through
    # transpose/reshape, which get the Q that o's input needs
    assert not plan.is_quantized(matmuls[0].output) and plan.is_quantized(graph.node("o").inputs[0])
    assert not plan.is_quantized(graph.node("fc1").output)  # read by GELU only: stays float
    kind = lambda n: n.attrs["proto"].op_type if n.op == "onnx" else n.op  # noqa: E731
    first = {k: next(n for n in graph.nodes if kind(n) == k) for k in ("embedding", "LayerNormalization", "Softmax")}
    assert not plan.is_quantized(first["embedding"].output)  # the token embedding Gather stays float
    assert not plan.is_quantized(first["LayerNormalization"].inputs[0])  # embeddings + positions: float
    assert not plan.is_quantized(first["Softmax"].inputs[0])  # scores + additive mask: float
    assert plan.is_quantized(first["Softmax"].output)  # P of P.V
    # keep-float is configurable: residual adds can be kept float
    plan2 = plan_for_ort(graph, keep_float=("add",))
    adds = [n.output for n in graph.nodes if n.op == "add"]
    assert not any(plan2.is_quantized(v) for v in adds) and all(plan.is_quantized(v) for v in adds)
    # with float residual adds, a LayerNorm output is rounded for the linear that reads it,
    # not for the float residual add that also reads it
    ln1 = [n for n in graph.nodes if kind(n) == "LayerNormalization"][1]
    assert plan2.readers[ln1.output] == frozenset({"fc1"}) and ln1.output not in plan.readers


def test_ort_equals_simulation_with_dynamic_batch_and_sequence(calibrated, tmp_path):
    ex = api.export(calibrated)
    folded, n = ex.folded, ex.n_folded
    onnx.checker.check_model(folded, full_check=True)
    assert n == 6
    opt = str(tmp_path / "opt.onnx")
    sess = _ort(folded, opt)
    sim = calibrated.simulation()
    rng = np.random.default_rng(3)
    for batch, seq in ((16, 7), (5, 19)):  # two batch sizes and sequence lengths, padded masks
        ids, mask = _tokens(rng, batch, seq)
        got = sess.run(None, _feed(ids, mask))[0]
        agr = compare(sim((ids, mask)).numpy(), got)
        assert got.shape == (batch, 32) and agr.within_1_step >= 0.999, agr
    # padding is invisible: a sentence alone equals the same sentence padded in a longer batch
    ids, mask = _tokens(rng, 3, 12)
    length = int(mask[0].sum())
    alone = sess.run(None, _feed(ids[:1, :length], mask[:1, :length]))[0]
    padded = sess.run(None, _feed(ids, mask))[0][:1]
    assert compare(padded, alone, step=compare(padded, padded).step).max_steps <= 1.0
    # the linears and both attention matmuls run as integer kernels
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    linears = ops["MatMulIntegerToFloat"] + ops["QGemm"] + ops["MatMulInteger"]
    assert linears + ops["QLinearMatMul"] == 8 and ops["QLinearMatMul"] >= 1, ops
    assert ops.get("MatMul", 0) == ops.get("FusedMatMul", 0) == ops.get("Gemm", 0) == 0, ops


def test_float_residual_layout_runs_in_ort_as_simulated(program, tmp_path):
    """The MiniLM layout: residual adds float, LayerNorm outputs rounded only on the edges to
    the linears (QuantPlan.readers), so ONNX has both the float and the Q/DQ'd tensor."""
    qm = _calibrated(program, keep_float=("layer_norm", "softmax", "gelu", "add"))
    assert qm.plan.readers
    opt = str(tmp_path / "opt.onnx")
    sess = _ort(api.export(qm).folded, opt)
    ids, mask = _tokens(np.random.default_rng(6), 16, 11)
    agr = compare(qm.simulation()((ids, mask)).numpy(), sess.run(None, _feed(ids, mask))[0])
    assert agr.within_1_step >= 0.999, agr
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] == 8 and ops.get("QLinearAdd", 0) == 0, ops


def test_folded_equals_unfolded_within_one_step_including_negative_alpha(program):
    qm = _calibrated(program)
    params = qm.params
    for name in ("q", "fc1", "fc2"):  # alpha < 0 on some output channels of token linears
        fit = params.cwac[name]
        fit.alpha[::3] *= -1.0
        fit.beta[::3] += 0.05
    ex = api.export(qm)
    unfolded, folded, n = ex.unfolded, ex.folded, ex.n_folded
    onnx.checker.check_model(folded, full_check=True)
    none_model = api.export(_calibrated(program, method="none")).unfolded
    assert n == 6 and len(folded.graph.node) == len(none_model.graph.node)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    for name in ("q", "fc1", "fc2"):
        assert np.all(inits[f"{name}.weight_scale_folded"] > 0)
        codes, orig = inits[f"{name}.weight_quantized_folded"], params.weights[name].q.numpy().T
        flipped = params.cwac[name].alpha < 0
        assert np.array_equal(codes[:, flipped], -orig[:, flipped]) and np.array_equal(codes[:, ~flipped], orig[:, ~flipped])
    rng = np.random.default_rng(4)
    ids, mask = _tokens(rng, 16, 10)
    for level in ("disable", "all"):
        a = SessionFromOnnx(unfolded.SerializeToString(), threads=1, level=level)().run(None, _feed(ids, mask))[0]
        b = SessionFromOnnx(folded.SerializeToString(), threads=1, level=level)().run(None, _feed(ids, mask))[0]
        agr = compare(a, b)
        assert agr.within_1_step >= 0.999, agr


def test_scaled_dot_product_attention_becomes_the_same_int8_matmuls(graph, tmp_path):
    sdpa_graph = _capture(TinyEncoder(sdpa=True).eval())
    ops = collections.Counter(n.op for n in sdpa_graph.nodes)
    quantizable = ("linear", "matmul", "embedding", "add")
    assert {k: ops[k] for k in quantizable} == {k: collections.Counter(n.op for n in graph.nodes)[k]
                                                for k in quantizable}  # the same INT8 layers as the eager form
    ids, mask = _tokens(np.random.default_rng(5), 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(SimulatedModel(sdpa_graph)((ids, mask)), SimulatedModel(graph)((ids, mask)),
                                   atol=1e-5, rtol=1e-5)
    qm = _calibrated(_program(TinyEncoder(sdpa=True).eval()))
    opt = str(tmp_path / "opt.onnx")
    sess = _ort(api.export(qm).folded, opt)
    agr = compare(qm.simulation()((ids, mask)).numpy(), sess.run(None, _feed(ids, mask))[0])
    assert agr.within_1_step >= 0.999, agr
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] == 8 and ops.get("MatMul", 0) == 0, ops


def test_an_op_outside_the_ir_is_a_float_node_and_an_untranslatable_one_names_the_op():
    class Cum(nn.Module):  # the aten capture refused aten.cumsum; ONNX has CumSum
        def forward(self, x):
            return torch.cumsum(x, 1)

    g = capture(torch.export.export(Cum(), (torch.zeros(2, 3, 4),)))
    assert [(n.op, n.attrs["proto"].op_type) for n in g.nodes] == [("onnx", "CumSum")]
    x = torch.randn(3, 3, 4)
    torch.testing.assert_close(SimulatedModel(g)(x), torch.cumsum(x, 1))

    class Kth(nn.Module):
        def forward(self, x):
            return torch.kthvalue(x, 2, dim=1).values

    with pytest.raises(QwtError, match="aten.kthvalue"):
        capture(torch.export.export(Kth(), (torch.zeros(2, 3, 4),)))


def test_qwt_export_rejects_a_token_model_with_one_line(tmp_path, capsys):
    from qwt_deploy.cli.export import main

    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=MAX_LEN)
    ids, mask = _tokens(np.random.default_rng(0), 2, 8)
    prog = torch.export.export(TinyEncoder().eval(), (ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    path, out = str(tmp_path / "enc.pt2"), str(tmp_path / "enc.onnx")
    torch.export.save(prog, path)
    np.save(tmp_path / "calib.npy", np.zeros((4, 8), np.float32))
    code = main([path, "--calib-data", str(tmp_path / "calib.npy"), "--quiet", "--no-latency", "-o", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "input_ids" in err[0] and "Fix:" in err[0], err
    assert not os.path.exists(out)


def test_bias_less_token_linear_folds_and_export_is_deterministic():
    program = _program(TinyEncoder(q_bias=False).eval())
    exports = []
    for _ in range(2):  # same inputs and seed -> byte-identical files
        qm = _calibrated(program)
        assert qm.graph.node("q").bias is None
        fit = qm.params.cwac["q"]
        fit.alpha[::2] *= -1.0
        exports.append(api.export(qm))
    models = [e.unfolded for e in exports]
    assert models[0].SerializeToString() == models[1].SerializeToString()
    assert exports[0].data == exports[1].data
    folded, n = exports[0].folded, exports[0].n_folded
    assert n == 6 and collections.Counter(x.op_type for x in folded.graph.node)["Mul"] < \
        collections.Counter(x.op_type for x in models[0].graph.node)["Mul"]
    ids, mask = _tokens(np.random.default_rng(7), 8, 9)
    a = SessionFromOnnx(models[0].SerializeToString(), threads=1, level="disable")().run(None, _feed(ids, mask))[0]
    b = SessionFromOnnx(folded.SerializeToString(), threads=1, level="disable")().run(None, _feed(ids, mask))[0]
    assert compare(a, b).within_1_step >= 0.999
