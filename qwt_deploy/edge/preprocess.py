"""Image bytes -> model input, exactly as the model was calibrated (metadata from qwt-export).

Decoding with the edge's limits (decompression bombs), then the one preprocessing
implementation, :mod:`qwt_deploy.data.preprocess` (numpy + Pillow, no torch).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.preprocess import center_crop, normalize
from .metadata import ImagePreprocess

# Decompression bombs: a few KB of PNG can claim 10^10 pixels. Refuse anything above this many
# pixels (a 64-megapixel photo still passes) instead of letting Pillow allocate it.
MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode, or the image is absurdly large."""


def decode_image(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(f"image is {w}x{h} pixels, more than the limit of {MAX_PIXELS}")
            img.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"image cannot be decoded ({type(e).__name__}: {e})") from None
    return img


def image_to_tensor(img: Image.Image, pre: ImagePreprocess) -> np.ndarray:
    """PIL image -> C x crop x crop float32: converted to ``pre.color`` ("RGB": C=3; "L": C=1,
    grey, Pillow's ITU-R 601-2 luma for colour photos), short side to ``resize`` (bicubic),
    center crop, ``(pixel - mean) / std`` per channel on 0..255 values. The calibration side's
    implementation (qwt_deploy.data.preprocess), so deployed inputs match calibrated ones."""
    return normalize(center_crop(img, pre.resize, pre.crop, pre.color), pre.mean, pre.std)


def preprocess_image_bytes(data: bytes, pre: ImagePreprocess) -> np.ndarray:
    return image_to_tensor(decode_image(data), pre)
