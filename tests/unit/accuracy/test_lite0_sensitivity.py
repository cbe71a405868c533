"""EfficientNet-Lite0: held-out photos give a real per-layer ranking (slow: real model). Its
speed (under 5 minutes on 2 cores) is measured in bench/bench_sensitivity.py, not asserted here: a
wall-clock bound failed CI at 305 s while another job shared the 2 cores."""

import pytest

pytestmark = pytest.mark.slow


def test_lite0_sensitivity_ranks_every_layer():
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install 'qwt-deploy[demo]'")
    import torch

    from qwt_deploy import api
    from qwt_deploy.comparison.accuracy import HoldOut
    from qwt_deploy.config import QuantizeConfig
    from qwt_deploy.data.preprocess import LITE0
    from qwt_deploy.examples import EXAMPLES

    torch.set_num_threads(2)
    qm = api.quantize(EXAMPLES["efficientnet-lite0"].build(), "bundled", QuantizeConfig(preprocess=LITE0),
                      holdout=HoldOut(samples=64))
    rep = api.sensitivity(qm, samples=32)
    assert "bundled evaluation photos" in qm.heldout_source and len(qm.inputs) == 512  # own held-out set
    assert len(rep.layers) == len(qm.plan.weighted) == 50 and rep.samples == 32 and rep.metric == "kl"
    assert 0 < rep.all_quantized < 0.05 and all(l.only_quantized >= 0 for l in rep.layers)
