"""EfficientNet-Lite0: the per-layer sensitivity runs in under 5 minutes on 2 cores, held-out
photos give a real ranking, and the fallback keeps chosen layers float (slow: real model)."""

import time

import pytest

pytestmark = pytest.mark.slow


def test_lite0_sensitivity_is_fast_and_ranks_every_layer():
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install 'qwt-deploy[demo]'")
    import torch

    from qwt_deploy import api
    from qwt_deploy.comparison.accuracy import HoldOut
    from qwt_deploy.config import QuantizeConfig
    from qwt_deploy.data.preprocess import LITE0
    from qwt_deploy.examples import EXAMPLES

    torch.set_num_threads(2)
    t = time.perf_counter()
    qm = api.quantize(EXAMPLES["efficientnet-lite0"].build(), "bundled", QuantizeConfig(preprocess=LITE0),
                      holdout=HoldOut(samples=64))
    rep = api.sensitivity(qm, samples=32)
    total = time.perf_counter() - t
    assert "bundled evaluation photos" in qm.heldout_source and len(qm.inputs) == 512  # own held-out set
    assert len(rep.layers) == len(qm.plan.weighted) == 50 and rep.samples == 32 and rep.metric == "kl"
    assert rep.seconds < 300 and total < 300, (rep.seconds, total)  # quantize + sensitivity, 2 cores
    assert 0 < rep.all_quantized < 0.05 and all(l.only_quantized >= 0 for l in rep.layers)
