"""QwT (v1) branch precision per target: FP16 for TensorRT, FP32 (unchanged) for ONNX Runtime.

Random weights and data: mechanics only. The TensorRT layout is checked the way qwt-export
checks it without TensorRT: ONNX Runtime on a rewritten copy (``TRT.runtime_copy``, through
``api.check_session``, with qwt_deploy.graph_passes.emulate_fp16_in_fp32 for the FP16 branch)
against the PyTorch simulation.
"""

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto

from qwt_deploy import api
from qwt_deploy.calibration.qwt_branch import BranchFit, compensation_summary, fits_fp16
from qwt_deploy.graph_passes import check_trt_rules, emulate_fp16_in_fp32
from qwt_deploy.comparison.agreement import compare
from qwt_deploy.exporter.onnx_builder import OnnxBuilder
from qwt_deploy.exporter.qdq import _emit_qwt_branch
from conftest import export_program
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run
from qwt_deploy.targets import ORT, TRT

from conftest import quantized


class TokenMLP(nn.Module):
    """[B, T, D] tokens: a linear, one residual MLP block (-> a D x D MatMul branch), a head."""

    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.fc1, self.fc2, self.head = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 8)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x)


def _export(program, data, target, method="qwt", w_bits=4):
    """(the quantized model, its export): the branch fitted in the target's precision."""
    qm = quantized(program, data, target=target, method=method, w_bits=w_bits)
    ex = api.export(qm)
    onnx.checker.check_model(ex.folded, full_check=True)
    return qm, ex


@pytest.fixture(scope="module")
def cnn(small_program, mech_data):
    return {t: _export(small_program, mech_data[:32], t) for t in ("ort", "trt")}


@pytest.fixture(scope="module")
def tokens():
    data = np.random.default_rng(0).standard_normal((48, 6, 16)).astype(np.float32)
    program = export_program(TokenMLP().eval(), torch.zeros(2, 6, 16))
    return data, {t: _export(program, data[:32], t) for t in ("ort", "trt")}


def _branch_nodes(model):
    return [n for n in model.graph.node if ".qwt_branch" in n.name]


def _branch_inits(model):
    return {i.name.rsplit(".", 1)[-1]: i.data_type for i in model.graph.initializer if ".qwt_branch." in i.name}


def _cast_to(node):
    return next(a.i for a in node.attribute if a.name == "to")


def test_branch_precision_per_target(cnn):
    assert TRT.branch_precision == "fp16" and ORT.branch_precision == "fp32"
    # the API hands the target's precision to calibration
    assert cnn["trt"][0].settings.branch_precision == "fp16" and cnn["ort"][0].settings.branch_precision == "fp32"


@pytest.mark.parametrize("kind", ["cnn", "tokens"])
def test_trt_branch_is_fp16_between_casts_and_ort_branch_is_fp32(kind, cnn, tokens):
    models = cnn if kind == "cnn" else tokens[1]
    layer = "Conv" if kind == "cnn" else "MatMul"
    trt, ort = models["trt"][1].folded, models["ort"][1].folded
    # TensorRT: Cast(X -> fp16) -> Conv/MatMul(fp16 W [, fp16 b]) [-> Add(fp16 b)] -> Cast(-> fp32) -> Add(Y)
    ops = [n.op_type for n in _branch_nodes(trt)]
    want = ["Cast", layer] + ([] if layer == "Conv" else ["Add"]) + ["Cast", "Add"]
    assert ops == want, ops
    nodes = _branch_nodes(trt)
    assert _cast_to(nodes[0]) == TensorProto.FLOAT16 and _cast_to(nodes[-2]) == TensorProto.FLOAT
    assert nodes[1].input[0] == nodes[0].output[0] and nodes[-1].input[1] == nodes[-2].output[0]
    assert _branch_inits(trt) == {"weight": TensorProto.FLOAT16, "bias": TensorProto.FLOAT16}
    # the branch reads the block input as the float block does: the Cast input is not an FP16 value
    assert not nodes[0].input[0].endswith("to_fp16/Cast:0")
    # ONNX Runtime: the FP32 branch as before, no Casts
    assert [n.op_type for n in _branch_nodes(ort)] == [layer] + ([] if layer == "Conv" else ["Add"]) + ["Add"]
    assert _branch_inits(ort) == {"weight": TensorProto.FLOAT, "bias": TensorProto.FLOAT}
    assert not any(n.op_type == "Cast" for n in ort.graph.node)
    # calibration carried the precision; the report counts 2 bytes per FP16 parameter
    (q_t, _), (q_o, _) = models["trt"], models["ort"]
    st, so = compensation_summary(q_t.graph, q_t.result), compensation_summary(q_o.graph, q_o.result)
    assert st["branch_precision"] == "fp16" and st["branch_bytes"] == 2 * st["branch_params"] > 0
    assert so["branch_precision"] == "fp32" and so["branch_bytes"] == 4 * so["branch_params"] > 0
    assert all(b["precision"] == "fp16" and b["bytes"] == 2 * b["params"] for b in st["blocks"])


@pytest.mark.parametrize("kind", ["cnn", "tokens"])
def test_trt_check_copy_agrees_with_simulation_and_rules_pass(kind, cnn, tokens, mech_data):
    qm, ex = (cnn if kind == "cnn" else tokens[1])["trt"]
    folded = ex.folded
    x = mech_data[32:] if kind == "cnn" else tokens[0][32:]
    ref = qm(x)
    agr = compare(ref, run(api.check_session(ex, 1), x))
    assert agr.within_1_step >= 0.999, agr
    findings = check_trt_rules(folded)
    assert findings == [], findings  # no errors, and no warnings from the Casts or FP16 ops either


def test_ort_branch_arithmetic_is_plain_fp32(cnn):
    """--target ort keeps the FP32 branch: BranchFit.apply is exactly y + conv2d(x, W, b)."""
    fit = next(iter(cnn["ort"][0].params.branches.values()))
    assert fit.precision == "fp32" and fit.kept
    x, y = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    assert torch.equal(fit.apply(x, y), y + F.conv2d(x, fit.weight, fit.bias, fit.stride, 0, 1, fit.groups))


def _fit(kind, precision, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g) * 0.2
    return BranchFit(kind=kind, weight=w.reshape(c, c, 1, 1) if kind == "conv" else w, bias=torch.randn(c, generator=g),
                     stride=1, groups=1, r2=0.5, mse_before=1.0, mse_after=0.5, kept=True, precision=precision)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fp16_emulation_pass_runs_the_branch_as_simulated(kind):
    """The check copy computes the FP16 branch as BranchFit.apply does (FP16 operands, FP32
    sums, FP16 output): equal up to rare one-ulp FP16 rounding flips from FP32 summation order.
    An FP32 branch has no FP16 node: the pass leaves it alone."""
    shape = [2, 16, 6, 6] if kind == "conv" else [2, 5, 16]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)
    for precision in ("fp16", "fp32"):
        fit = _fit(kind, precision)
        b = OnnxBuilder()
        b.rename(_emit_qwt_branch(b, "blk.qwt_branch", fit, "x", "y"), "out")
        m = b.model("x", shape, {"out": shape}, "branch", {}, inputs=[("x", TensorProto.FLOAT, shape),
                                                                        ("y", TensorProto.FLOAT, shape)])
        emulated, n = emulate_fp16_in_fp32(m)
        onnx.checker.check_model(emulated, full_check=True)
        assert n == ((1 if kind == "conv" else 2) if precision == "fp16" else 0)
        sess = SessionFromOnnx(emulated.SerializeToString(), threads=1, level="disable", allow_spinning=False)()
        got = sess.run(None, {"x": x.numpy(), "y": y.numpy()})[0]
        want = fit.apply(x, y).numpy()
        branch = want - y.numpy()
        ulp = np.spacing(np.abs(branch).astype(np.float16)).astype(np.float32)  # one FP16 ulp of the branch
        assert np.all(np.abs(got - want) <= ulp + 1e-6 * np.abs(want)), precision
        if precision == "fp16":
            assert np.mean(got == want) >= 0.98
    # and the FP16 branch is really rounded: it differs from the FP32 arithmetic of the same fit
    assert not torch.equal(_fit(kind, "fp16").apply(x, y), _fit(kind, "fp32").apply(x, y))


def test_branch_that_could_overflow_fp16_stays_fp32():
    """FP16 ends at 65504: a block input near it (or a branch output bound beyond half of it)
    keeps the FP32 branch rather than exporting one that turns the block output into inf."""
    fit = _fit("linear", "fp16")
    assert fits_fp16(fit, 10.0)
    assert not fits_fp16(fit, 40000.0)  # the input alone is past half of FP16's range
    big = _fit("linear", "fp16")
    big.weight = big.weight * 1e4  # row sums of |W| ~ 2.5e4: |W x| can pass 32752 for |x| = 10
    assert not fits_fp16(big, 10.0)
