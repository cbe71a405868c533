"""Fashion-MNIST (Zalando, MIT): 60,000 training and 10,000 test images, 28x28 grey, 10 classes.

Read from the Debian package ``dataset-fashion-mnist`` (the only labelled image set that
installs offline here), which puts the four original IDX files under
``/usr/share/datasets/fashion-mnist/``. ``QWT_FASHION_MNIST_DIR`` overrides that folder.

Training images are used for training and calibration, test images only for evaluation, so
that no accuracy figure is measured on data the model or the quantizer has seen.

The IDX format is checked (magic number, rank, sizes, length) before use: a truncated or
corrupt file is a one-line :class:`QwtError`, never a reshape traceback or silent garbage.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import os
import zlib
from functools import lru_cache

import numpy as np

from qwt_deploy.errors import QwtError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_FIX = "apt-get install dataset-fashion-mnist (as root), or set QWT_FASHION_MNIST_DIR to a folder with the IDX .gz files"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and std of the 60k training pixels, on 0..255. Training, calibration, evaluation and the
# runtime metadata all normalise with these, so the exported model sees what it was trained on.
MEAN = 72.94
STD = 90.02
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}


def data_dir() -> str:
    return os.environ.get("QWT_FASHION_MNIST_DIR", DEFAULT_DIR)


def available() -> bool:
    """True when the full dataset (all four files) is present."""
    d = data_dir()
    return all(os.path.isfile(os.path.join(d, f)) for img, lab, _ in SPLITS.values() for f in (img, lab))


def missing_reason() -> str:
    return f"Fashion-MNIST is not installed in {data_dir()} (fix: {INSTALL_FIX})"


def read_idx(path: str, rank: int) -> np.ndarray:
    """One gzip-compressed IDX file of unsigned bytes (magic 0x0000080R) as a uint8 array."""
    if not os.path.isfile(path):
        raise QwtError(f"Fashion-MNIST file {path} is missing", INSTALL_FIX)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise QwtError(f"Fashion-MNIST file {path} is corrupt ({type(e).__name__}: {e})",
                       "reinstall it: apt-get install --reinstall dataset-fashion-mnist") from None
    header = 4 + 4 * rank
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != rank:
        raise QwtError(f"Fashion-MNIST file {path} is not an IDX file of rank {rank} (bad header)",
                       "reinstall it: apt-get install --reinstall dataset-fashion-mnist")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    if len(raw) != header + int(np.prod(dims)):
        raise QwtError(f"Fashion-MNIST file {path} holds {len(raw) - header} bytes of data, its header says "
                       f"{int(np.prod(dims))}", "reinstall it: apt-get install --reinstall dataset-fashion-mnist")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


@lru_cache(maxsize=2)
def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N x 28 x 28, labels int64 N)`` for ``split`` in {"train", "test"}."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    img_name, lab_name, n = SPLITS[split]
    d = data_dir()
    if not os.path.isdir(d):
        raise QwtError(f"Fashion-MNIST is not installed ({d} does not exist)", INSTALL_FIX)
    x = read_idx(os.path.join(d, img_name), 3)
    y = read_idx(os.path.join(d, lab_name), 1).astype(np.int64)
    if x.shape != (n, 28, 28) or y.shape != (n,) or y.max(initial=0) > 9:
        raise QwtError(f"Fashion-MNIST {split} split in {d} has images {x.shape} and labels {y.shape}, "
                       f"expected ({n}, 28, 28) and ({n},) with labels 0..9",
                       "reinstall it: apt-get install --reinstall dataset-fashion-mnist")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def normalize(images: np.ndarray) -> np.ndarray:
    """N x 28 x 28 uint8 -> N x 1 x 28 x 28 float32, ``(pixel - MEAN) / STD``."""
    x = (images.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None])


def subset(split: str, n: int | None, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normalised samples and their labels: a seeded random draw (no repeats) when
    ``seed`` is given, else the first ``n`` in file order. ``n=None`` takes the whole split."""
    x, y = load_split(split)
    if n is None or n >= len(x):
        idx = np.arange(len(x))
    elif seed is None:
        idx = np.arange(n)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return normalize(x[idx]), y[idx]


def calibration_images(n: int = 512, seed: int = 0) -> np.ndarray:
    """``n`` normalised *training* images (a seeded random draw: calibration never sees a test image)."""
    return subset("train", n, seed)[0]


def test_images(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` normalised test images (all 10,000 by default) and their labels."""
    return subset("test", n, None)


def foolbox_samples() -> tuple[np.ndarray, np.ndarray]:
    """The 20 Fashion-MNIST test images inside the foolbox wheel (label in the file name), as a
    tiny fallback for checks when the Debian package is absent. Normalised like the rest."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")  # locate without importing (foolbox pulls eagerpy)
    if spec is None or spec.origin is None:
        raise QwtError("the Fashion-MNIST fallback images need the 'foolbox' package", "pip install 'qwt-deploy[demo]'")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "fashionMNIST_*.png")))
    if not files:
        raise QwtError("no Fashion-MNIST images were found in the foolbox package", "pip install 'qwt-deploy[demo]'")
    x = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    y = np.array([int(os.path.basename(f).split("_")[2].split(".")[0]) for f in files], np.int64)
    return normalize(x), y
