"""Image preprocessing: one implementation for calibration (folders, bundled photos) and the
edge runtime (qwt-run, qwt-serve). numpy + Pillow only, so the torch-free edge image uses it too.

Explicit and typed: resize the short side, center-crop, then ``(pixel - mean) / std`` per
channel on 0..255 RGB values (or grey, with one mean/std value: the image is converted to
Pillow's "L", as the edge runtime does for 1-channel models). Nothing is guessed from the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


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


@dataclass(frozen=True)
class Preprocess:
    resize: int = 256  # short side, pixels
    crop: int = 224
    mean: tuple[float, ...] = (127.0, 127.0, 127.0)  # on 0..255, per channel: 3 (RGB) or 1 (grey)
    std: tuple[float, ...] = (128.0, 128.0, 128.0)

    @property
    def color(self) -> str:
        """Pillow mode the images are converted to: "L" (grey, 1 channel) with one mean/std value."""
        return "L" if len(self.mean) == 1 else "RGB"

    def to_dict(self) -> dict:
        return dict(resize=self.resize, crop=self.crop, mean=list(self.mean), std=list(self.std),
                    layout=f"NCHW {self.color}")

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


LITE0 = Preprocess()  # EfficientNet-Lite0: 224/0.875 resize, 224 crop, (x - 127) / 128
