"""Calibration data: load, validate, and cut into batches.

Sources, all giving float32 N x C x H x W already preprocessed for the model:

- ``.npy`` / ``.npz`` arrays (an ``.npz`` must hold exactly one array, or one named ``x``);
- a folder of images, with :class:`~qwt_deploy.data.preprocess.Preprocess` flags (crop and resize
  default to the model's input size, see ``Preprocess.for_input``);
- the real photos bundled with the demo extra (``bundled``);
- ``synthetic``: Gaussian noise, only when asked for. Accuracy figures made with it mean nothing.

Every problem is a one-line :class:`QwtError` naming the fix.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import replace

import numpy as np

from qwt_deploy.errors import QwtError

from .preprocess import Preprocess

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_array(path: str) -> np.ndarray:
    try:
        if path.endswith(".npz") or zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "x" in keys:
                    return z["x"]
                if len(keys) != 1:
                    raise QwtError(f"{path} holds {len(keys)} arrays ({', '.join(keys[:5])})",
                                   "store exactly one array, or name the calibration array 'x'")
                return z[keys[0]]
        return np.load(path, allow_pickle=False)
    except QwtError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise QwtError(f"{path} holds pickled objects, not a numeric array",
                           "save a plain float32 array with numpy.save") from None
        raise QwtError(f"{path} is not a readable .npy/.npz array ({e})", "save a float32 array with numpy.save") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise QwtError(f"{path} is not a readable .npy/.npz array ({type(e).__name__})",
                       "save a float32 array with numpy.save") from None


def load_image_folder(folder: str, pre: Preprocess, limit: int) -> np.ndarray:
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise QwtError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_EXTS)})",
                       "point --calib-data at a folder of JPEG/PNG images, or at a .npy array")
    out = []
    from .photos import PhotoError, open_photo  # the size limits the edge runtime applies too

    for f in files[:limit]:
        try:
            with open_photo(os.path.join(folder, f), pre.resize, pre.crop) as im:
                out.append(pre.center(im))
        except PhotoError as e:
            raise QwtError(f"image {os.path.join(folder, f)}: {e}", "remove or replace the file") from None
        except OSError as e:  # unreadable file (permissions, I/O error)
            raise QwtError(f"image {os.path.join(folder, f)} cannot be read ({e.strerror or type(e).__name__})",
                           "remove or replace the file") from None
    return np.stack(out)


def for_channels(pre: Preprocess, channels: int) -> Preprocess:
    """The preprocessing for a model with ``channels`` input channels. The CLI writes one
    ``--mean``/``--std`` value as three; a grey (1-channel) model reads images as grey with that
    one value. Three different values cannot mean grey: say so rather than guess."""
    if channels != 1 or len(pre.mean) == 1:
        return pre
    if len(set(pre.mean)) != 1 or len(set(pre.std)) != 1:
        raise QwtError(f"the model takes 1-channel (grey) images but --mean/--std give three values "
                       f"({', '.join(map(str, pre.mean))})", "pass one value each, e.g. --mean 72.9 --std 90.0")
    return replace(pre, mean=pre.mean[:1], std=pre.std[:1])


def load_calibration(source: str, input_shape: tuple, num: int, pre: Preprocess, seed: int = 0) -> np.ndarray:
    """Return at most ``num`` validated samples shaped like the model input (without batch).
    An axis given as a name (a dynamic axis of an ONNX input, e.g. "height") takes any size."""
    if source == "synthetic":
        if not all(isinstance(d, int) for d in input_shape):
            raise QwtError(f"synthetic calibration data needs fixed input axes, the model takes "
                           f"N x {' x '.join(str(d) for d in input_shape)}",
                           "pass real calibration data (.npy/.npz or an image folder)")
        warnings.warn("synthetic calibration data: accuracy figures made with it mean nothing", stacklevel=2)
        rng = np.random.default_rng(seed)
        return rng.standard_normal((num,) + tuple(input_shape), dtype=np.float32)
    if source == "bundled":
        from .photos import calibration_photos, crops

        x = crops(calibration_photos(), num, pre.for_input(input_shape), seed)
    elif os.path.isdir(source):
        channels = input_shape[0] if input_shape and isinstance(input_shape[0], int) else 3
        # images are read here: --resize/--crop not given come from the model's input size
        x = load_image_folder(source, for_channels(pre.for_input(input_shape), channels), num)
    elif os.path.isfile(source):
        if pre.given:  # recorded for the edge runtime: check them now, before minutes of calibration
            pre.for_arrays(input_shape)
        x = load_array(source)[:num]
    else:
        raise QwtError(f"calibration data {source} does not exist", "pass a .npy/.npz file or an image folder")
    return validate(x, input_shape, source)


def validate(x: np.ndarray, input_shape: tuple, source: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number):
        raise QwtError(f"calibration data {source} has dtype {x.dtype}", "store float32 numbers")
    if x.ndim != len(input_shape) + 1 or any(isinstance(d, int) and d != n for d, n in zip(input_shape, x.shape[1:])):
        want = "N x " + " x ".join(str(d) for d in input_shape)
        raise QwtError(f"calibration data {source} has shape {tuple(x.shape)} but the model takes {want}",
                       "preprocess the data to the model's input shape (N first)")
    if x.shape[0] == 0:
        raise QwtError(f"calibration data {source} is empty", "provide at least one sample (512 recommended)")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        idx = int(np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0][0])
        raise QwtError(f"calibration data {source} contains NaN/Inf ({int(bad.sum())} values, first in sample {idx})",
                       "clean or re-preprocess the data")
    return x


def batches(x, batch_size: int):
    """Calibration batches as ``calibrate`` takes them: tensors for an array, or for an
    :class:`~qwt_deploy.data.inputs.InputSet` one tensor/tuple per batch (token sets sorted by
    length and trimmed, see calibration/inputs.py)."""
    import torch

    from .inputs import InputSet

    if isinstance(x, InputSet):
        return [b.torch() for b in x.batches(batch_size)]
    return [torch.from_numpy(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def load_model_inputs(source: str, graph, num: int, pre: Preprocess, seed: int = 0):
    """At most ``num`` validated samples of every input of ``graph`` (an ``InputSet``).

    One float input: every source of :func:`load_calibration`. Several inputs (token ids and
    an attention mask): an ``.npz`` with one array per input, named as the inputs. (A built-in
    example's data, ``example:NAME``, is resolved by the API, which passes arrays down.)"""
    from .inputs import InputSet, load_named_arrays, validate_inputs

    if len(graph.inputs) == 1 and graph.is_float_input(graph.inputs[0]):
        name = graph.inputs[0]
        return InputSet.single(name, load_calibration(source, tuple(graph.dims(name)[1:]), num, pre, seed))
    names = ", ".join(graph.inputs)
    fix = f"pass an .npz with one array per input: numpy.savez('calib.npz', {', '.join(f'{n}=...' for n in graph.inputs)})"
    if source in ("synthetic", "bundled") or os.path.isdir(source):
        raise QwtError(f"--calib-data {source} gives images, but the model takes {len(graph.inputs)} inputs ({names})", fix)
    if not os.path.isfile(source):
        raise QwtError(f"calibration data {source} does not exist", fix)
    arrays = load_named_arrays(source, graph.inputs)
    return validate_inputs({k: v[:num] for k, v in arrays.items()}, graph, source)
