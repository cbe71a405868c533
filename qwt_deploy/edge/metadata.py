"""The contract between ``qwt-export`` (workstation) and the edge runtime: ONNX metadata.

``qwt-export`` writes, as ``metadata_props`` of the INT8 model:

- ``qwt_deploy.preprocess``: JSON ``{"resize", "crop", "mean", "std", "layout", "color",
  "value_range", "interpolation", "source", "from_images"}``: the image preprocessing of the
  model's inputs, so the server needs no extra configuration. ``source`` says where the values
  come from: ``"images"`` (the calibration images were read with them) or ``"flags"`` (calibrated
  on preprocessed arrays; the user gave the values that made those arrays, checked against the
  model's input size). Calibrated on arrays without such flags, the key is not written at all:
  nothing is known about images. Exports from before ``source`` have ``from_images`` only
  (``false``: the values were qwt-export's defaults, unusable). ``color`` is the Pillow mode the
  image is converted to, taken from the model's input channels: ``"RGB"`` (C=3, three mean/std
  values) or ``"L"`` (C=1, grey, one value). A missing ``color`` means RGB (models exported before
  the key existed);
- ``qwt_deploy.input_shape``: JSON ``[C, H, W]`` (no batch axis);
- ``qwt_deploy.labels``: JSON list of class names (only when labels were given).

Both sides use this one module, so the format cannot drift. It imports only the standard
library: qwt-export imports it too, and the edge box never has torch.
"""

from __future__ import annotations

import ast
import enum
import json
import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from ..errors import QwtError

KEY_PREPROCESS = "qwt_deploy.preprocess"
KEY_INPUT_SHAPE = "qwt_deploy.input_shape"
KEY_LABELS = "qwt_deploy.labels"

# Pillow mode per input channel count: the image is converted to it before normalising.
COLOR_BY_CHANNELS = {1: "L", 3: "RGB"}
CHANNELS_BY_COLOR = {v: k for k, v in COLOR_BY_CHANNELS.items()}


class PreprocessSource(str, enum.Enum):
    """Where recorded preprocessing values come from (the ``source`` key)."""

    IMAGES = "images"  # the calibration images were read with them
    FLAGS = "flags"  # calibrated on arrays; the user gave the values that made them
    DEFAULTS = "defaults"  # exports from before "source": arrays, qwt-export's defaults (never written now)


BUNDLED_IMAGENET_LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet1k_labels.txt")
_ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass(frozen=True)
class ImagePreprocess:
    """Convert to ``color``, resize the short side (bicubic), center-crop, ``(pixel - mean) / std``
    per channel on 0..255 values, NCHW.

    Computed by the one implementation in ``qwt_deploy.data.preprocess`` (shared with calibration).
    ``color`` is "RGB" (3 channels) or "L" (1 grey channel, e.g. Fashion-MNIST), one mean/std per channel.
    """

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: PreprocessSource = PreprocessSource.IMAGES
    color: str = "RGB"

    @property
    def channels(self) -> int:
        return CHANNELS_BY_COLOR[self.color]

    @property
    def from_images(self) -> bool:
        return self.source is PreprocessSource.IMAGES

    @property
    def usable(self) -> bool:
        """Whether images may be fed with these values (not an old export's invented defaults)."""
        return self.source is not PreprocessSource.DEFAULTS

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePreprocess":
        try:
            layout, color = d.get("layout", "NCHW RGB"), d.get("color", "RGB")  # no color key: older export, RGB
            if "NCHW" not in layout or color not in CHANNELS_BY_COLOR:
                raise ValueError(f"layout {layout!r} color {color!r} is not NCHW {' or '.join(CHANNELS_BY_COLOR)}")
            source = PreprocessSource(d["source"]) if "source" in d else (
                PreprocessSource.IMAGES if d.get("from_images", True) else PreprocessSource.DEFAULTS)
            pre = cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(float(v) for v in d["mean"]),
                      std=tuple(float(v) for v in d["std"]), source=source, color=color)
        except (KeyError, TypeError, ValueError) as e:
            raise QwtError(f"the model's {KEY_PREPROCESS} metadata is unusable ({e})",
                           "re-export the model with a current qwt-export") from None
        if (len(pre.mean) != pre.channels or len(pre.std) != pre.channels or min(pre.std) <= 0 or pre.crop < 1
                or pre.resize < pre.crop):
            raise QwtError(f"the model's {KEY_PREPROCESS} metadata is inconsistent ({d})",
                           "re-export the model with a current qwt-export")
        return pre

    def for_input_shape(self, shape: Sequence[int]) -> Optional["ImagePreprocess"]:
        """This preprocessing for a model whose sample shape is ``shape`` (C, H, W), or None when the
        model is not a square image model of 1 or 3 channels (it then takes tensors only).

        The channel count comes from the model's input, not from the metadata's colour: exports
        from before the ``color`` key wrote "RGB" and three equal mean/std values for grey
        (C=1) models too, and those values are exactly the single grey value.
        """
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3 or shape[1:] != (self.crop, self.crop) or shape[0] not in COLOR_BY_CHANNELS:
            return None
        if shape[0] == self.channels:
            return self
        if shape[0] == 1 and len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            return replace(self, mean=self.mean[:1], std=self.std[:1], color="L")
        return None  # the metadata's channels contradict the model: tensors only, never a wrong image


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


def _per_channel(values, channels: int, what: str) -> list[float]:
    """``values`` as ``channels`` numbers; a grey model takes one, and three equal values (the CLI
    repeats a single --mean/--std value for R, G, B) are that one value."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(set(values)) == 1:
        return values[:1] * channels
    raise QwtError(f"the model takes {channels}-channel images but the {what} has {len(values)} different values "
                   f"({', '.join(f'{v:g}' for v in values)})",
                   f"pass one value per input channel, e.g. --{what} {values[0]:g}")


def calibrated_on_images(calib_data: Optional[str]) -> bool:
    """Whether ``--calib-data`` reads images (a folder, the bundled photos, an example's images),
    as opposed to preprocessed arrays or synthetic noise."""
    return bool(calib_data) and calib_data != "synthetic" and not str(calib_data).lower().endswith(_ARRAY_SUFFIXES)


def export_metadata(preprocess: Optional[dict], input_shape: Sequence[int], calib_data: Optional[str],
                    labels_file: Optional[str] = None) -> dict[str, str]:
    """The edge keys of the ONNX metadata, as qwt-export writes them (deterministic JSON).

    ``preprocess``: complete values (resize, crop, mean, std), or None to record none (array
    calibration data without preprocessing flags). The colour and the number of mean/std values
    follow the model's input channels (C=1: grey "L", one value; otherwise RGB), so that the edge
    runtime converts an image exactly the way the model's training and calibration images were made."""
    meta = {KEY_INPUT_SHAPE: json.dumps([int(v) for v in input_shape])}
    if preprocess is not None:
        images = calibrated_on_images(calib_data)
        channels = int(input_shape[0]) if len(input_shape) == 3 and int(input_shape[0]) in COLOR_BY_CHANNELS else 3
        color = COLOR_BY_CHANNELS[channels]
        source = PreprocessSource.IMAGES if images else PreprocessSource.FLAGS
        pre = dict(preprocess, mean=_per_channel(preprocess["mean"], channels, "mean"),
                   std=_per_channel(preprocess["std"], channels, "std"), layout=f"NCHW {color}", color=color,
                   value_range=[0, 255], interpolation="bicubic", source=source.value,
                   from_images=images)  # for edge runtimes from before "source"
        meta[KEY_PREPROCESS] = json.dumps(pre, sort_keys=True)
    if labels_file:
        meta[KEY_LABELS] = json.dumps(read_labels_file(labels_file), ensure_ascii=False)
    return meta


def no_image_preprocessing(sample_shape: Sequence[int]) -> str:
    """Why a model cannot take images, and what to do: for an image-shaped input, the
    qwt-export flags that record its preprocessing (no preprocessing was recorded because it was
    calibrated on arrays without them, or by a qwt-export that recorded invented defaults)."""
    shape = tuple(int(v) for v in sample_shape)
    if len(shape) != 3 or shape[0] not in COLOR_BY_CHANNELS or shape[1] != shape[2]:
        return (f"this model takes N x {'x'.join(map(str, shape))} tensors, not images (the edge runtime reads "
                "images for square 1- or 3-channel inputs); send a tensor (JSON or .npy)")
    from ..data.preprocess import CROP_FRACTION  # the resize qwt-export itself would pick for this crop

    c, size = shape[0], shape[1]
    values = "R,G,B" if c == 3 else "V"
    return (f"this model records no image preprocessing: it was calibrated on preprocessed arrays, and qwt-export "
            f"was not told how they were made; send a tensor, or re-export it with the preprocessing of those "
            f"arrays, e.g. qwt-export MODEL --calib-data calib.npy --resize {round(size / CROP_FRACTION)} --crop {size} "
            f"--mean {values} --std {values} (on 0..255 pixel values)")


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
    if pre is not None and shape is not None:
        pre = pre.for_input_shape(shape)  # None: not a square 1- or 3-channel image model: tensors only
    return ModelMetadata(input_shape=shape, preprocess=pre, labels=labels)
