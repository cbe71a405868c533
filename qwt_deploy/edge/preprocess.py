"""Image bytes -> model input, exactly as the model was calibrated (metadata from qwt-export).

Decoding with the edge's limits (decompression bombs, tiny files with huge resized copies,
formats other than JPEG/PNG/BMP/WebP), then the one preprocessing
implementation, :mod:`qwt_deploy.data.preprocess` (numpy + Pillow, no torch).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..data.photos import MAX_PIXELS, SERVED_FORMATS, PhotoError, open_photo
from ..data.preprocess import center_crop, normalize
from .metadata import ImagePreprocess

__all__ = ["MAX_PIXELS", "SERVED_FORMATS", "ImageDecodeError", "decode_image", "image_to_tensor",
           "preprocess_image_bytes"]

# The data layer's error: the bytes are not an image of a served format (JPEG, PNG, BMP, WebP),
# or the image is too large (source, aspect ratio, or resized size; see data.photos).
ImageDecodeError = PhotoError


def decode_image(data: bytes, pre: ImagePreprocess) -> Image.Image:
    """Decode within the memory budget of data.photos (checked from the header, before decoding)."""
    return open_photo(data, pre.resize, pre.crop, SERVED_FORMATS)


def image_to_tensor(img: Image.Image, pre: ImagePreprocess) -> np.ndarray:
    """PIL image -> C x crop x crop float32: converted to ``pre.color`` ("RGB": C=3; "L": C=1,
    grey, Pillow's ITU-R 601-2 luma for colour photos), short side to ``resize`` (bicubic),
    center crop, ``(pixel - mean) / std`` per channel on 0..255 values. The calibration side's
    implementation (qwt_deploy.data.preprocess), so deployed inputs match calibrated ones."""
    return normalize(center_crop(img, pre.resize, pre.crop, pre.color), pre.mean, pre.std)


def preprocess_image_bytes(data: bytes, pre: ImagePreprocess) -> np.ndarray:
    return image_to_tensor(decode_image(data, pre), pre)
