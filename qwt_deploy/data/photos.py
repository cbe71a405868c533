"""Real photos that ship inside installed packages (no dataset host is reachable here).

Two disjoint pools, so calibration never sees an evaluation image:

- CALIBRATION: scikit-image's and scikit-learn's sample photos (cats, coffee, a rocket,
  an astronaut, a motorcycle, a palace, a flower, ...).
- EVALUATION: the 20 labelled ImageNet validation JPEGs inside the foolbox wheel (label in
  the file name), plus matplotlib's Grace Hopper portrait.

Many random-resized crops and flips of each photo give hundreds of distinct real inputs.

Also: :func:`open_photo`, the one way a *user's* image is opened (calibration folders, qwt-run,
qwt-serve), with its size checked before anything is allocated (decompression bombs, and tiny
files whose resized copy would be huge).
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from qwt_deploy.errors import QwtError

from .preprocess import Preprocess

_SKIMAGE = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
            "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
            "coins.png", "page.png", "brick.png", "grass.png", "gravel.png", "moon.png", "color.png",
            "logo.png", "horse.png", "cell.png"]
_SKLEARN = ["china.jpg", "flower.jpg"]


@dataclass(frozen=True)
class Photo:
    path: str
    label: int = -1  # ImageNet-1k index when known


def _package_dir(module: str, extra_hint: str) -> str:
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise QwtError(f"the bundled photos need the '{module}' package, which is not installed",
                       f"pip install '{extra_hint}'")
    return os.path.dirname(spec.origin)


def calibration_photos() -> list[Photo]:
    sk = os.path.join(_package_dir("skimage", "qwt-deploy[demo]"), "data")
    skl = os.path.join(_package_dir("sklearn", "qwt-deploy[demo]"), "datasets", "images")
    paths = [os.path.join(sk, f) for f in _SKIMAGE] + [os.path.join(skl, f) for f in _SKLEARN]
    return [Photo(p) for p in paths if os.path.exists(p)]


def evaluation_photos() -> list[Photo]:
    fb = os.path.join(_package_dir("foolbox", "qwt-deploy[demo]"), "data")
    photos = [Photo(p, int(os.path.basename(p).split("_")[2].split(".")[0]))
              for p in sorted(glob.glob(os.path.join(fb, "imagenet_*.jpg")))]
    mpl = os.path.join(_package_dir("matplotlib", "matplotlib"), "mpl-data", "sample_data", "grace_hopper.jpg")
    if os.path.exists(mpl):
        photos.append(Photo(mpl))
    return photos


def labelled_evaluation_photos() -> list[Photo]:
    return [p for p in evaluation_photos() if p.label >= 0]


def crops(photos: list[Photo], n: int, pre: Preprocess, seed: int) -> np.ndarray:
    """``n`` crops spread evenly over ``photos``: each photo's center crop first, then random crops."""
    if not photos:
        raise QwtError("no bundled photos were found", "pip install 'qwt-deploy[demo]'")
    rng = np.random.default_rng(seed)
    images = [Image.open(p.path) for p in photos]
    for im in images:
        im.load()
    out = np.empty((n, 3, pre.crop, pre.crop), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        out[i] = pre.center(img) if i < len(images) else pre.random_crop(img, rng)
    return out


# ---- a user's image, within a memory budget ---------------------------------------------------
# Per image, before a pixel is decoded: the source is at most MAX_PIXELS (a 64-megapixel photo
# passes), its long side at most MAX_ASPECT times its short side, and the copy resized for the
# model (short side to --resize) at most MAX_RESIZED_PIXELS. A 2 KB PNG of 1 x 1,000,000 pixels
# resized to a short side of 28 would otherwise be 28 x 28,000,000 pixels (2.3 GB). Peak memory
# per image is then bounded by MEMORY_BUDGET_BYTES: the decoded source (<= 4 B/pixel), its RGB/L
# copy (<= 3 B/pixel) and the resize's two passes (<= 2 x 3 B x MAX_RESIZED_PIXELS).
MAX_PIXELS = 64_000_000
MAX_RESIZED_PIXELS = 16_000_000
MAX_ASPECT = 64
MEMORY_BUDGET_BYTES = 7 * MAX_PIXELS + 6 * MAX_RESIZED_PIXELS  # 544 MB
# Pillow's names of the formats that match sources.IMAGE_EXTS; anything else (PSD, EPS through
# Ghostscript, FITS, ...) is refused before its decoder runs. The server decodes fewer (no TIFF:
# libtiff prints its complaints about hostile files straight to stderr).
FOLDER_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
SERVED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")


class PhotoError(ValueError):
    """The bytes are not an image of an accepted format, or the image is too large to process."""


class PhotoTooLarge(PhotoError):
    """The image decodes, but its source, aspect ratio or resized copy is over the limits."""


def resized_size(w: int, h: int, resize: int, crop: int) -> tuple[int, int]:
    """The size :func:`qwt_deploy.data.preprocess.center_crop` resizes a w x h image to."""
    s = resize / min(w, h)
    return max(crop, round(w * s)), max(crop, round(h * s))


def size_problem(w: int, h: int, resize: int, crop: int) -> str:
    """Why a w x h image may not be processed for this resize/crop ("" if it may)."""
    if w < 1 or h < 1:
        return f"image is {w}x{h} pixels"
    if w * h > MAX_PIXELS:
        return f"image is {w}x{h} pixels, more than the limit of {MAX_PIXELS:,}"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"image is {w}x{h} pixels, an aspect ratio above the limit of {MAX_ASPECT}:1"
    rw, rh = resized_size(w, h, resize, crop)
    if rw * rh > MAX_RESIZED_PIXELS:
        return (f"image is {w}x{h} pixels and would be resized to {rw}x{rh}, more than the limit of "
                f"{MAX_RESIZED_PIXELS:,} pixels")
    return ""


def open_photo(src: Union[str, bytes], resize: int, crop: int, formats=FOLDER_FORMATS) -> Image.Image:
    """Open and decode a file path or image bytes, refusing (:class:`PhotoError`) an undecodable
    file, a format outside ``formats``, or a size over the limits above, before decoding."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (and raises past 2x); ours is stricter and says why
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src, formats=list(formats))
            problem = size_problem(*img.size, resize, crop)
            if problem:
                img.close()
                raise PhotoTooLarge(problem)
            img.load()
    except PhotoError:
        raise
    except UnidentifiedImageError:
        raise PhotoError(f"not an image in an accepted format ({', '.join(formats)})") from None
    except Image.DecompressionBombError:  # Pillow's own check, past 2x its limit, fires inside open()
        raise PhotoTooLarge(f"image has more pixels than the limit of {MAX_PIXELS:,}") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as e:
        raise PhotoError(f"image cannot be decoded ({type(e).__name__}: {e})") from None
    return img
