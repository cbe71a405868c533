"""Image preprocessing: one implementation for calibration (folders, bundled photos) and the
edge runtime (qwt-run, qwt-serve). numpy + Pillow only, so the torch-free edge image uses it too.

Explicit and typed: resize the short side, center-crop, then ``(pixel - mean) / std`` per
channel on 0..255 RGB values (or grey, with one mean/std value: the image is converted to
Pillow's "L", as the edge runtime does for 1-channel models).

A :class:`Preprocess` holds what the user gave (``None``: not given). :meth:`Preprocess.for_input`
completes it for a model's input size, and checks what was given against it: the crop is the
model's input height (= width), the resize that crop / 0.875 (ImageNet's 256 for 224), mean 127
and std 128. Those completions are used only where images are actually read (an image folder,
the bundled photos); for array calibration data only given values are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from qwt_deploy.errors import QwtError

CROP_FRACTION = 0.875  # resize = crop / 0.875: the usual ImageNet evaluation ratio (256 for 224)
DEFAULT_MEAN, DEFAULT_STD = 127.0, 128.0


def normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    """HxWxC (or HxW grey) uint8 -> CxHxW float32, ``(pixel - mean) / std`` per channel."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    x = (pixels.astype(np.float32) - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def center_crop(img: Image.Image, resize: int, crop: int, color: str) -> np.ndarray:
    """Convert to ``color`` ("RGB" | "L"), resize the short side to ``resize`` (bicubic), take
    the central ``crop`` x ``crop``: HxWxC (or HxW) uint8 pixels."""
    img = img.convert(color)
    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


def image_size(sample_shape: Sequence) -> Optional[int]:
    """H (= W) of a square 1- or 3-channel image input ``(C, H, W)``, else None."""
    shape = tuple(sample_shape)
    if len(shape) == 3 and shape[0] in (1, 3) and isinstance(shape[1], int) and shape[1] == shape[2]:
        return int(shape[1])
    return None


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing; a field left ``None`` was not given (see :meth:`for_input`)."""

    resize: Optional[int] = None  # short side, pixels
    crop: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None  # on 0..255, per channel: 3 (RGB) or 1 (grey)
    std: Optional[tuple[float, ...]] = None

    @property
    def given(self) -> bool:
        """Whether any value was given (a flag, an example's settings)."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    @property
    def complete(self) -> bool:
        return all(getattr(self, f.name) is not None for f in fields(self))

    def for_input(self, sample_shape: Sequence) -> "Preprocess":
        """This preprocessing completed for a model input ``(C, H, W)`` and checked against it:
        the crop must be the model's (square) input size and the resize at least the crop."""
        dims = tuple(sample_shape)
        size = image_size(dims)
        shape = "x".join(str(d) for d in dims)
        dynamic = len(dims) == 3 and dims[0] in (1, 3) and not all(isinstance(d, int) for d in dims[1:])
        if size is None and not dynamic:
            raise QwtError(f"image preprocessing needs a square 1- or 3-channel image input, the model takes N x {shape}",
                           "pass preprocessed arrays (.npy/.npz) without --resize/--crop/--mean/--std")
        if size is None and self.crop is None:  # dynamic height/width: any crop fits, none is implied
            raise QwtError(f"the model's input height and width are dynamic (N x {shape}), so no crop size follows "
                           "from it", "pass --crop (and --resize) for the images")
        crop = size if self.crop is None else self.crop
        if size is not None and crop != size:
            raise QwtError(f"--crop {crop} does not match the model's input size {size}x{size} (N x {shape})",
                           f"pass --crop {size}, or leave --crop out (it defaults to the model's input size)")
        resize = round(crop / CROP_FRACTION) if self.resize is None else self.resize
        if resize < crop:
            raise QwtError(f"--resize {resize} is smaller than the crop {crop}",
                           f"pass --resize {round(crop / CROP_FRACTION)} (crop / 0.875) or at least {crop}")
        mean = (DEFAULT_MEAN,) * 3 if self.mean is None else tuple(self.mean)
        std = (DEFAULT_STD,) * 3 if self.std is None else tuple(self.std)
        return replace(self, resize=int(resize), crop=int(crop), mean=mean, std=std)

    def for_arrays(self, sample_shape: Sequence) -> "Preprocess":
        """The preprocessing a user gave for calibration arrays, checked against the model input:
        recorded for the edge runtime only when the values that made the arrays are all known
        (the crop follows from the model's input size); nothing is filled in."""
        missing = [f"--{name}" for name in ("resize", "mean", "std") if getattr(self, name) is None]
        if missing:
            raise QwtError(f"image preprocessing flags were given for preprocessed arrays, but not {', '.join(missing)}",
                           "pass --resize, --mean and --std as your arrays were made (the edge runtime feeds images "
                           "with them), or none of the preprocessing flags")
        return self.for_input(sample_shape)

    @property
    def color(self) -> str:
        """Pillow mode the images are converted to: "L" (grey, 1 channel) with one mean/std value."""
        return "L" if self.mean is not None and len(self.mean) == 1 else "RGB"

    def to_dict(self) -> dict:
        return dict(resize=self.resize, crop=self.crop, mean=None if self.mean is None else list(self.mean),
                    std=None if self.std is None else list(self.std), layout=f"NCHW {self.color}")

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 (or HxW grey) uint8 -> CxHxW float32."""
        return normalize(rgb, self.mean, self.std)

    def center(self, img: Image.Image) -> np.ndarray:
        """Short side to ``resize``, central ``crop``, normalized: what the edge runtime computes."""
        return self.normalize(center_crop(img, self.resize, self.crop, self.color))

    def random_crop(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Inception-style random-resized crop (area 8%-100%, aspect 3/4-4/3) plus a random flip."""
        img = img.convert(self.color)
        w, h = img.size
        for _ in range(10):
            area = w * h * rng.uniform(0.08, 1.0)
            ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                break
        else:
            cw = ch = min(w, h)
            x0, y0 = (w - cw) // 2, (h - ch) // 2
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((self.crop, self.crop), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return self.normalize(np.asarray(crop))


LITE0 = Preprocess(resize=256, crop=224, mean=(127.0,) * 3, std=(128.0,) * 3)  # EfficientNet-Lite0: (x - 127) / 128
