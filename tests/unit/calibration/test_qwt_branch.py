"""QwT (v1) block branches: closed form, R^2 rule, block detection, simulation == ONNX Runtime,
and the CWAC fold with branches present. Random data / random weights: mechanics only."""

import numpy as np
import onnx
import pytest
import torch

from qwt_deploy import api
from qwt_deploy.calibration.qwt_branch import BranchStats, choose_groups, with_qwt_branches
from qwt_deploy.comparison.agreement import compare
from qwt_deploy.graph.blocks import QWT_BRANCH, cut_values, detect_blocks, insert_qwt_branches
from conftest import capture
from qwt_deploy.quantization.simulate import SimulatedModel
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run

from conftest import op_counts, quantized


def _lstsq(x, r):
    a = np.concatenate([x, np.ones((len(x), 1))], 1)
    return np.linalg.lstsq(a, r, rcond=None)[0]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_closed_form_equals_lstsq_streamed(kind):
    rng = np.random.default_rng(0)
    c_in, c_out = 6, 5
    if kind == "linear":
        xs = [torch.from_numpy(rng.standard_normal((4, 7, c_in))) for _ in range(3)]  # [B, T, D]
    else:
        xs = [torch.from_numpy(rng.standard_normal((2, c_in, 6, 6))) for _ in range(3)]
    stride = 1 if kind == "linear" else 2
    w_true = rng.standard_normal((c_out, c_in))
    st = BranchStats(kind, c_in, c_out, stride=stride)
    xr, rr = [], []
    for x in xs:
        rows = x.reshape(-1, c_in) if kind == "linear" else x[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, c_in)
        r = rows.numpy() @ w_true.T + 0.3 + 0.5 * rng.standard_normal((len(rows), c_out))
        yq = torch.from_numpy(rng.standard_normal(r.shape))
        yfp = yq + torch.from_numpy(r)
        if kind == "conv":  # back to NCHW at the strided resolution
            yq, yfp = (t.reshape(2, 3, 3, c_out).permute(0, 3, 1, 2) for t in (yq, yfp))
        else:
            yq, yfp = yq.reshape(4, 7, c_out), yfp.reshape(4, 7, c_out)
        st.update(x, yq, yfp)
        xr.append(rows.numpy())
        rr.append(r)
    fit = st.solve(ridge=0.0)
    ref = _lstsq(np.concatenate(xr), np.concatenate(rr))
    w = fit.weight.reshape(c_out, c_in).numpy()
    np.testing.assert_allclose(w, ref[:-1].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fit.bias.numpy(), ref[-1], rtol=1e-5, atol=1e-5)
    # R^2 from the streamed sums equals R^2 computed on the data
    R = np.concatenate(rr)
    res = R - np.concatenate([np.concatenate(xr), np.ones((len(R), 1))], 1) @ ref
    r2 = 1 - (res ** 2).sum() / ((R - R.mean(0)) ** 2).sum()
    assert fit.kept and abs(fit.r2 - r2) < 1e-6
    # applying the fit reproduces X W^T + b
    x = xs[0].float()
    out = fit.apply(x if kind == "linear" else x, torch.zeros(1))
    assert out.shape[-1 if kind == "linear" else 1] == c_out


def test_ridge_shrinks_weights_not_bias():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((500, 4)))
    r = x @ torch.ones(4, 2, dtype=torch.float64) + 3.0
    st = BranchStats("linear", 4, 2)
    st.update(x, torch.zeros_like(r), r)
    small, big = st.solve(0.0), st.solve(10.0)
    assert float(big.weight.abs().mean()) < 0.2 * float(small.weight.abs().mean())
    assert abs(float(big.bias.mean()) - 3.0) < 0.3  # the bias stays unpenalised


def test_r2_not_positive_gives_no_branch():
    rng = np.random.default_rng(2)
    st = BranchStats("linear", 3, 2)
    x = torch.from_numpy(rng.standard_normal((400, 3)))
    st.update(x, torch.zeros(400, 2, dtype=torch.float64), torch.zeros(400, 2, dtype=torch.float64))  # R == 0
    fit = st.solve(1e-3)
    assert fit.r2 <= 0 and not fit.kept and fit.params == 0
    y = torch.randn(5, 2)
    assert torch.equal(fit.apply(torch.randn(5, 3), y), y)


def test_groups_divide_both_sides():
    assert choose_groups(16, 24, 64) == 1
    assert choose_groups(192, 192, 64) == 3
    assert choose_groups(192, 320, 64) == 2  # gcd 64: largest divisor <= 3
    assert choose_groups(256, 512, 0) == 1


def test_blocks_of_small_cnn_and_insertion(small_program):
    g = capture(small_program)
    cuts = [v for _, v in cut_values(g)]
    blocks = detect_blocks(g)  # no indexed module names: falls back to the residual rule
    assert len(blocks) == 1
    b = blocks[0]
    assert b.nodes == ["expand", "dw", "project", "Add"] and b.x in cuts and b.y == "add"
    g2 = insert_qwt_branches(g, blocks)
    assert len(g.nodes) == 8 and len(g2.nodes) == 9  # the original graph is untouched
    br = [n for n in g2.nodes if n.op == QWT_BRANCH][0]
    assert br.inputs == [b.x, "add"]
    readers = [n for n in g2.nodes if br.output in n.inputs]
    assert [n.op for n in readers] == ["gap"]
    with torch.no_grad():  # float model: the branch is the identity
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(SimulatedModel(g)(x), SimulatedModel(g2)(x))
    assert detect_blocks(g, r"^(exp|dw|pro)") == []  # keys that split one residual region: refused


def _calibrated(program, data, method, target="ort", **kw):
    return quantized(program, data, target=target, method=method, **kw)


@pytest.mark.parametrize("method,w_bits,target", [("qwt", 8, "ort"), ("qwt,qwt2", 4, "ort"), ("qwt,qwt2", 4, "trt")])
def test_ort_matches_simulation_with_branch(small_program, mech_data, method, w_bits, target):
    qm = _calibrated(small_program, mech_data, method, target, w_bits=w_bits)
    r = qm.result
    assert len(r.blocks) == 1 and r.blocks[0].kept and r.blocks[0].r2 > 0
    assert r.blocks[0].params == 16 * 16 + 16
    ex = api.export(qm)
    folded, n = ex.folded, ex.n_folded
    onnx.checker.check_model(folded, full_check=True)
    ops = op_counts(folded)
    assert ops["Conv"] == 5  # 4 quantized layers + the 1x1 branch
    assert n == (5 if method == "qwt,qwt2" else 0)
    float_w = [i for i in folded.graph.initializer if i.name.endswith("qwt_branch.weight")]
    want = onnx.TensorProto.FLOAT16 if target == "trt" else onnx.TensorProto.FLOAT  # see test_qwt_branch_fp16
    assert len(float_w) == 1 and float_w[0].data_type == want
    x = mech_data[:32]
    ref = qm(x)
    # checked as qwt-export checks it: the file itself (ort), the rewritten copy with the FP16 branch emulated (trt)
    sess = api.check_session(ex, 2)
    agr = compare(ref, run(sess, x))
    assert agr.within_1_step >= 0.999, agr


def test_branch_reduces_block_error(small_program, mech_data):
    """The fit lowers the block output's error against the FP block on the same input."""
    r = _calibrated(small_program, mech_data, "qwt", w_bits=4).result
    b = r.blocks[0]
    assert b.mse_after < b.mse_before


def test_fold_still_exact_with_branches_present(small_program, mech_data):
    ex = api.export(_calibrated(small_program, mech_data, "qwt,qwt2"), pad_conv_channels=False)
    unfolded, folded, n = ex.unfolded, ex.folded, ex.n_folded
    assert n == 5
    assert op_counts(unfolded)["Mul"] == 5 and op_counts(folded).get("Mul", 0) == 0
    # the branch (float Conv + Add) survives the fold unchanged
    assert sum(1 for nd in folded.graph.node if nd.name.startswith("expand.qwt_branch")) == 2
    x = mech_data[:32]
    for level in ("disable", "all"):
        a = run(SessionFromOnnx(unfolded.SerializeToString(), level=level)(), x)
        b = run(SessionFromOnnx(folded.SerializeToString(), level=level)(), x)
        assert compare(a, b).within_1_step >= 0.999


def test_skipped_branch_is_not_exported(small_program, mech_data):
    """R^2 <= 0: calibration keeps Y's quantizer for Y', the export emits neither branch nor
    a second Q/DQ pair, so the graph is node for node the plain one."""
    qm = _calibrated(small_program, mech_data, "qwt")
    g, params = qm.graph, qm.params
    name = next(iter(params.branches))
    br = g.node(name)
    params.branches[name].kept = False  # as calibration leaves it when R^2 <= 0
    params.acts[br.output] = params.acts[br.inputs[1]]
    m = api.export(qm, pad_conv_channels=False).unfolded
    plain = api.export(_calibrated(small_program, mech_data, "none"), pad_conv_channels=False).unfolded
    assert not any("qwt_branch" in nd.name for nd in m.graph.node)
    assert len(m.graph.node) == len(plain.graph.node)
    x = mech_data[:8]
    ref = qm(x)
    assert compare(ref, run(SessionFromOnnx(m.SerializeToString())(), x)).within_1_step >= 0.999


def test_bad_block_regex_is_a_one_line_error(small_program):
    from qwt_deploy.errors import QwtError

    with pytest.raises(QwtError, match="not a valid regex"):
        with_qwt_branches(capture(small_program), "(")
