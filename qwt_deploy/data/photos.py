"""Real photos that ship inside installed packages (no dataset host is reachable here).

Two disjoint pools, so calibration never sees an evaluation image:

- CALIBRATION: scikit-image's and scikit-learn's sample photos (cats, coffee, a rocket,
  an astronaut, a motorcycle, a palace, a flower, ...).
- EVALUATION: the 20 labelled ImageNet validation JPEGs inside the foolbox wheel (label in
  the file name), plus matplotlib's Grace Hopper portrait.

Many random-resized crops and flips of each photo give hundreds of distinct real inputs.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

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
