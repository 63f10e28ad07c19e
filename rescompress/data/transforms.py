"""Per-image decoding and transforms for data read from disk (Pillow), ImageNet-style.

Evaluation: resize the shorter side to `round(size / crop_fraction)`, then center-crop `size x size`
(the torchvision/timm evaluation transform, `crop_fraction` 0.875 by default). Training: a random resized
crop (area fraction drawn from `scale`, aspect ratio log-uniform in `ratio`) resized to `size x size`, a
horizontal flip, and optional colour jitter. Every draw comes from the generator the caller passes, which
the loader seeds from (seed, epoch, sample index): the same sample gets the same pixels in any worker.

JPEGs are decoded with Pillow's draft mode when the transform shrinks them: the decoder then produces a
1/2, 1/4 or 1/8 scale image directly, never smaller than what the resize needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from rescompress.errors import DataError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
TRAIN_AUGMENTATIONS = ("random_resized_crop", "flip", "color_jitter", "crop")
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


def _resample(name: str) -> Any:
    from PIL import Image

    if name not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation '{name}'; known: {', '.join(INTERPOLATIONS)}")
    return getattr(Image.Resampling, name.upper())


def eval_resize(size: int, crop_fraction: float) -> int:
    """The shorter side images are resized to before the center crop."""
    if not 0.0 < crop_fraction <= 1.0:
        raise DataError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return int(math.floor(size / crop_fraction + 0.5))


def _decode(path: str, mode: str, want: Callable[[int, int], tuple[int, int]]) -> tuple[Any, int, int]:
    """Decode one image in `mode` ("RGB" or "L"). `want(w, h)` is the smallest size the transform needs the
    full frame at; for a JPEG, Pillow then decodes at a reduced scale no smaller than that. Returns the
    image and the full frame's width and height."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        if img.format == "JPEG":
            img.draft(mode, want(w, h))
        out = img.convert(mode)
        out.load()
    return out, w, h


def _to_array(img: Any, channels: int) -> np.ndarray:
    pixels = np.array(img, dtype=np.uint8)  # a writable copy
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass(frozen=True)
class EvalTransform:
    """Resize shorter side to `resize` (or squash to `size x size` when `resize` is None), center-crop `size`."""

    size: int
    channels: int = 3
    resize: Optional[int] = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        _resample(self.interpolation)

    def describe(self) -> dict:
        if self.resize is None:
            return {"resize": f"{self.size}x{self.size} (aspect ratio not kept)", "crop": None,
                    "interpolation": self.interpolation}
        return {"resize": f"shorter side to {self.resize}", "crop": f"center {self.size}x{self.size}",
                "interpolation": self.interpolation}

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        scale = self.resize / min(w, h)
        return max(self.size, round(w * scale)), max(self.size, round(h * scale))

    def __call__(self, path: str) -> np.ndarray:
        mode = "RGB" if self.channels == 3 else "L"
        if self.resize is None:
            img, _, _ = _decode(path, mode, lambda w, h: (self.size, self.size))
            return _to_array(img.resize((self.size, self.size), _resample(self.interpolation)), self.channels)
        img, w, h = _decode(path, mode, lambda w, h: self._resized(w, h))
        nw, nh = self._resized(w, h)
        img = img.resize((nw, nh), _resample(self.interpolation))
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return _to_array(img.crop((left, top, left + self.size, top + self.size)), self.channels)


def random_resized_box(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a crop covering a random fraction (in `scale`) of the image's area with
    a log-uniform aspect ratio in `ratio`; after 10 failed draws, the largest center crop within `ratio`."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


@dataclass(frozen=True)
class TrainTransform:
    """Training augmentation for images read from disk. Without "random_resized_crop" the image goes through
    `base` (the evaluation transform) and then the other augmentations."""

    base: EvalTransform
    augment: tuple[str, ...] = ("random_resized_crop", "flip")
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        unknown = [a for a in self.augment if a not in TRAIN_AUGMENTATIONS]
        if unknown:
            raise DataError(f"unknown augmentation(s) {unknown}; known: {list(TRAIN_AUGMENTATIONS)}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise DataError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(self.scale)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise DataError(f"crop_ratio must satisfy 0 < low <= high, got {list(self.ratio)}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise DataError(f"color_jitter must be in [0, 1), got {self.color_jitter}")

    def describe(self) -> dict:
        d: dict[str, Any] = {"augment": list(self.augment)}
        if "random_resized_crop" in self.augment:
            d.update(scale=list(self.scale), ratio=[round(r, 4) for r in self.ratio])
        if "color_jitter" in self.augment:
            d["color_jitter"] = self.color_jitter
        return d

    def __call__(self, path: str, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image, ImageEnhance

        size, channels = self.base.size, self.base.channels
        if "random_resized_crop" in self.augment:
            mode = "RGB" if channels == 3 else "L"
            box_of: dict = {}

            def want(w: int, h: int) -> tuple[int, int]:
                # the box is drawn from the full frame's size; the decoder may then shrink the frame by up to
                # the factor the crop is shrunk by
                box_of["box"] = left, top, cw, ch = random_resized_box(w, h, self.scale, self.ratio, rng)
                return max(1, math.ceil(w * size / cw)), max(1, math.ceil(h * size / ch))

            img, w, h = _decode(path, mode, want)
            left, top, cw, ch = box_of.get("box") or random_resized_box(w, h, self.scale, self.ratio, rng)
            fx, fy = img.size[0] / w, img.size[1] / h
            box = (left * fx, top * fy, (left + cw) * fx, (top + ch) * fy)
            img = img.resize((size, size), _resample(self.base.interpolation), box=box)
        else:
            img = Image.fromarray(_from_chw(self.base(path)))
        if "crop" in self.augment:  # the small-image crop: zero-pad by size/8, crop back at a random offset
            pad = max(1, size // 8)
            canvas = Image.new(img.mode, (size + 2 * pad, size + 2 * pad))
            canvas.paste(img, (pad, pad))
            dx, dy = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
            img = canvas.crop((dx, dy, dx + size, dy + size))
        if "flip" in self.augment and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if "color_jitter" in self.augment and self.color_jitter > 0:
            j = self.color_jitter
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                if enhance is ImageEnhance.Color and img.mode != "RGB":
                    continue
                img = enhance(img).enhance(float(rng.uniform(1 - j, 1 + j)))
        return _to_array(img, channels)


def _from_chw(pixels: np.ndarray) -> np.ndarray:
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
