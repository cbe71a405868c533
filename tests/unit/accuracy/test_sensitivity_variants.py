"""The sensitivity's variants compute what they claim: a layer left float by
``SimulatedModel.with_float_weights`` equals a simulation built from scratch without that layer's
weights, and "only this layer quantized" differs from FP32 only from that layer on."""

import dataclasses

import numpy as np
import pytest
import torch

from qwt_deploy import api
from qwt_deploy.comparison.sensitivity import Variants, run_first_output
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.data import fashion_mnist as fm
from qwt_deploy.examples import EXAMPLES
from qwt_deploy.quantization.simulate import SimulatedModel

pytestmark = pytest.mark.skipif(not fm.available(), reason=fm.missing_reason())


@pytest.fixture(scope="module")
def qm():
    ex = EXAMPLES["fashion-cnn"]
    return api.quantize(ex.build(), ex.calibration(96, 0), QuantizeConfig(example_shape=(1, 28, 28)))


@pytest.mark.parametrize("exact", [True, False])
def test_float_layer_variant_equals_a_simulation_built_without_it(qm, exact):
    x = [torch.from_numpy(qm.heldout.first)]
    v = Variants(qm.graph, qm.plan, qm.params, exact)
    assert v.exact is exact and (v.plan is qm.plan) is exact  # fast: plain fake-quant, no kernel emulation
    for name in (qm.plan.weighted[0], qm.plan.weighted[5], qm.plan.weighted[-1]):
        p = qm.params
        scratch = SimulatedModel(qm.graph, v.plan, dataclasses.replace(
            p, weights={k: w for k, w in p.weights.items() if k != name},
            cwac={k: c for k, c in p.cwac.items() if k != name}))
        got = run_first_output(v.without([name]), x)
        np.testing.assert_array_equal(got, run_first_output(scratch, x))
        assert not np.array_equal(got, run_first_output(v.full, x))  # the layer did change something
    assert name in qm.params.weights and name in v.full.params.weights  # the shared model is untouched


def test_only_one_layer_quantized_is_fp32_elsewhere(qm):
    x = [torch.from_numpy(qm.heldout.first)]
    v = Variants(qm.graph, qm.plan, qm.params)
    last = qm.plan.weighted[-1]  # the classifier: everything before it is FP32
    fp32, inter_fp, inter_q = {}, {}, {}
    with torch.no_grad():
        SimulatedModel(qm.graph)(x[0], inter_fp)
        v.only(last)(x[0], inter_q)
    node = qm.graph.node(last)
    producer = {n.output: n for n in qm.graph.nodes}[node.inputs[0]]
    before = [n.output for n in qm.graph.nodes][: [n.name for n in qm.graph.nodes].index(producer.name)]
    for value in before:  # upstream of the one quantized layer nothing changed
        torch.testing.assert_close(inter_q[value], inter_fp[value], rtol=0, atol=0)
    assert not torch.equal(inter_q[node.output], inter_fp[node.output])
