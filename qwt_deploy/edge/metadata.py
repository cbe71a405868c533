"""The contract between ``qwt-export`` (workstation) and the edge runtime: ONNX metadata.

``qwt-export`` writes, as ``metadata_props`` of the INT8 model:

- ``qwt_deploy.preprocess``: JSON ``{"resize", "crop", "mean", "std", "layout", "color",
  "value_range", "interpolation", "from_images"}``: exactly the image preprocessing the model was
  calibrated with, so the server needs no extra configuration;
- ``qwt_deploy.input_shape``: JSON ``[C, H, W]`` (no batch axis);
- ``qwt_deploy.labels``: JSON list of class names (only when labels were given).

Both sides use this one module, so the format cannot drift. It imports only the standard
library: qwt-export imports it too, and the edge box never has torch.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import QwtError

KEY_PREPROCESS = "qwt_deploy.preprocess"
KEY_INPUT_SHAPE = "qwt_deploy.input_shape"
KEY_LABELS = "qwt_deploy.labels"

BUNDLED_IMAGENET_LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet1k_labels.txt")
_ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the short side (bicubic), center-crop, ``(pixel - mean) / std`` on 0..255 RGB, NCHW.

    The same steps as ``calibration.preprocess.Preprocess.center``; a test checks the two agree.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    from_images: bool = True  # False: calibrated on preprocessed arrays, so these values are defaults

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePreprocess":
        try:
            layout, color = d.get("layout", "NCHW RGB"), d.get("color", "RGB")
            if "NCHW" not in layout or "RGB" not in f"{color} {layout}":
                raise ValueError(f"layout {layout!r} is not NCHW RGB")
            pre = cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(float(v) for v in d["mean"]),
                      std=tuple(float(v) for v in d["std"]), from_images=bool(d.get("from_images", True)))
        except (KeyError, TypeError, ValueError) as e:
            raise QwtError(f"the model's {KEY_PREPROCESS} metadata is unusable ({e})",
                           "re-export the model with a current qwt-export") from None
        if len(pre.mean) != 3 or len(pre.std) != 3 or min(pre.std) <= 0 or pre.crop < 1 or pre.resize < pre.crop:
            raise QwtError(f"the model's {KEY_PREPROCESS} metadata is inconsistent ({d})",
                           "re-export the model with a current qwt-export")
        return pre


@dataclass(frozen=True)
class ModelMetadata:
    input_shape: Optional[tuple[int, ...]]  # without the batch axis, when known
    preprocess: Optional[ImagePreprocess]  # None: the model takes only tensors
    labels: tuple[str, ...] = ()


def read_labels_file(path: str) -> list[str]:
    """One class name per line (blank lines at the end ignored); line i is class index i."""
    try:
        with open(path, encoding="utf-8") as f:
            labels = [line.strip() for line in f.read().rstrip("\n").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise QwtError(f"labels file {path} cannot be read ({type(e).__name__})",
                       "pass a UTF-8 text file with one class name per line") from None
    if not labels or labels == [""]:
        raise QwtError(f"labels file {path} is empty", "pass a text file with one class name per line")
    return labels


def export_metadata(preprocess: dict, input_shape: Sequence[int], calib_data: Optional[str],
                    labels_file: Optional[str] = None) -> dict[str, str]:
    """The edge keys of the ONNX metadata, as qwt-export writes them (deterministic JSON)."""
    from_images = bool(calib_data) and calib_data != "synthetic" and not str(calib_data).lower().endswith(_ARRAY_SUFFIXES)
    pre = dict(preprocess, color="RGB", value_range=[0, 255], interpolation="bicubic", from_images=from_images)
    meta = {KEY_PREPROCESS: json.dumps(pre, sort_keys=True),
            KEY_INPUT_SHAPE: json.dumps([int(v) for v in input_shape])}
    if labels_file:
        meta[KEY_LABELS] = json.dumps(read_labels_file(labels_file), ensure_ascii=False)
    return meta


def _loads(value: str):
    """JSON; models from before the JSON format stored ``str(dict)``, read as a Python literal
    (``ast.literal_eval`` evaluates no code)."""
    try:
        return json.loads(value)
    except ValueError:
        return ast.literal_eval(value)


def parse_metadata(props: dict[str, str]) -> ModelMetadata:
    try:
        shape = tuple(int(v) for v in _loads(props[KEY_INPUT_SHAPE])) if KEY_INPUT_SHAPE in props else None
        pre = ImagePreprocess.from_dict(_loads(props[KEY_PREPROCESS])) if KEY_PREPROCESS in props else None
        labels = tuple(str(v) for v in _loads(props[KEY_LABELS])) if KEY_LABELS in props else ()
    except (ValueError, SyntaxError, TypeError) as e:
        raise QwtError(f"the model's qwt_deploy metadata is malformed ({type(e).__name__}: {e})",
                       "re-export the model with a current qwt-export") from None
    if pre is not None and shape is not None and (len(shape) != 3 or shape[0] != 3 or shape[1:] != (pre.crop, pre.crop)):
        pre = None  # not a 3-channel square image model: tensors only
    return ModelMetadata(input_shape=shape, preprocess=pre, labels=labels)
