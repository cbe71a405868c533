"""Accuracy of a built-in example with real labels, for tests and benchmarks.

    from qwt_deploy.examples.evaluate import onnx_accuracy, torch_accuracy
    onnx_accuracy("fashion-cnn.int8.onnx", "fashion-cnn")        # ORT CPU, all 10k test images
    torch_accuracy(EXAMPLES["fashion-cnn"].build(), "fashion-cnn", n=2000)

Both run the example's evaluation set (Fashion-MNIST: the test images, never calibrated on) in
fixed batches and count top-1 hits against the labels. Examples without labels
(EfficientNet-Lite0's photos) are refused: their measure is agreement with FP32, which
:mod:`qwt_deploy.comparison.agreement` computes.

    python -m qwt_deploy.examples.evaluate fashion-cnn.int8.onnx --example fashion-cnn
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import QwtError
from . import EXAMPLES


@dataclass(frozen=True)
class Accuracy:
    example: str
    accuracy: float  # fraction of correct top-1 predictions
    correct: int
    samples: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_set(example: str, n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    if example not in EXAMPLES:
        raise QwtError(f"no built-in example named {example!r}", "use one of " + ", ".join(sorted(EXAMPLES)))
    x, y = EXAMPLES[example].evaluation(n, 0)
    if y is None:
        raise QwtError(f"the {example} example has no labelled evaluation set",
                       "measure agreement with FP32 instead (qwt_deploy.comparison.agreement)")
    return x, y


def _accuracy(predict: Callable[[np.ndarray], np.ndarray], example: str, n: Optional[int], batch: int) -> Accuracy:
    x, y = evaluation_set(example, n)
    t = time.perf_counter()
    correct = 0
    for i in range(0, len(x), batch):
        logits = predict(np.ascontiguousarray(x[i:i + batch]))
        correct += int((np.asarray(logits).argmax(1) == y[i:i + batch]).sum())
    return Accuracy(example, correct / len(x), correct, int(len(x)), time.perf_counter() - t)


def onnx_accuracy(model: "str | bytes", example: str, n: Optional[int] = None, threads: int = 2,
                  batch: int = 500) -> Accuracy:
    """Top-1 accuracy of an ONNX model (path or bytes) in ONNX Runtime CPU on the example's
    labelled evaluation set (the first ``n`` images; all when None)."""
    from ..runtime.onnxruntime import SessionFromOnnx, run

    sess = SessionFromOnnx(model, threads, allow_spinning=False)()
    return _accuracy(lambda xb: run(sess, xb), example, n, batch)


def torch_accuracy(module, example: str, n: Optional[int] = None, batch: int = 500) -> Accuracy:
    """Top-1 accuracy of a PyTorch module (FP32, or a fake-quant simulation) on the same set."""
    import torch

    def predict(xb):
        with torch.no_grad():
            return module(torch.from_numpy(xb)).numpy()

    return _accuracy(predict, example, n, batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwt_deploy.examples.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX model (FP32 or INT8 QDQ)")
    p.add_argument("--example", required=True, choices=sorted(n for n in EXAMPLES if n.startswith("fashion")))
    p.add_argument("-n", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    try:
        r = onnx_accuracy(a.model, a.example, a.n, a.threads)
    except QwtError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.model}: top-1 {r.accuracy * 100:.2f}% ({r.correct}/{r.samples}) in {r.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
