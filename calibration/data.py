"""Calibration data: load, validate, and cut into batches.

Sources, all giving float32 N x C x H x W already preprocessed for the model:

- ``.npy`` / ``.npz`` arrays (an ``.npz`` must hold exactly one array, or one named ``x``);
- a folder of images, with explicit :class:`~calibration.preprocess.Preprocess` flags;
- the real photos bundled with the demo extra (``bundled``);
- ``synthetic``: Gaussian noise, only when asked for. Accuracy figures made with it mean nothing.

Every problem is a one-line :class:`QwtError` naming the fix.
"""

from __future__ import annotations

import os
import warnings
import zipfile

import numpy as np
from PIL import Image, UnidentifiedImageError

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
    for f in files[:limit]:
        try:
            with Image.open(os.path.join(folder, f)) as im:
                out.append(pre.center(im))
        except (UnidentifiedImageError, OSError) as e:
            raise QwtError(f"image {os.path.join(folder, f)} cannot be decoded ({type(e).__name__})",
                           "remove or replace the file") from None
    return np.stack(out)


def load_calibration(source: str, input_shape: tuple, num: int, pre: Preprocess, seed: int = 0) -> np.ndarray:
    """Return at most ``num`` validated samples shaped like the model input (without batch)."""
    if source == "synthetic":
        warnings.warn("synthetic calibration data: accuracy figures made with it mean nothing", stacklevel=2)
        rng = np.random.default_rng(seed)
        return rng.standard_normal((num,) + tuple(input_shape), dtype=np.float32)
    if source == "bundled":
        from .photos import calibration_photos, crops

        x = crops(calibration_photos(), num, pre, seed)
    elif source.startswith("example:"):  # a built-in example's own data (qwt_deploy/examples)
        from qwt_deploy.examples import example_from_source

        x = example_from_source(source).calibration(num, seed)
    elif os.path.isdir(source):
        x = load_image_folder(source, pre, num)
    elif os.path.isfile(source):
        x = load_array(source)[:num]
    else:
        raise QwtError(f"calibration data {source} does not exist", "pass a .npy/.npz file or an image folder")
    return validate(x, input_shape, source)


def validate(x: np.ndarray, input_shape: tuple, source: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number):
        raise QwtError(f"calibration data {source} has dtype {x.dtype}", "store float32 numbers")
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
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


def batches(x: np.ndarray, batch_size: int):
    import torch

    return [torch.from_numpy(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
