"""The model's input contract: shape, layout and per-channel normalization."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from rescompress.errors import DataError

LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: `channels x height x width` pixels scaled to [0, 1], then `(x - mean) / std`.

    How an image becomes those pixels: with `resize` set, its shorter side is resized to `resize` pixels and
    the center `height x width` is cropped; without, the whole image is resized to `height x width`. Either
    way with `interpolation`, from RGB (3 channels) or luminance (1). The input tensor is `dtype`."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    resize: Optional[int] = None
    interpolation: str = "bilinear"
    normalization: str = "dataset"  # where mean/std come from: dataset, imagenet or recipe
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if min(self.channels, self.height, self.width) < 1:
            raise DataError(f"input spec needs positive sizes, got {self.channels}x{self.height}x{self.width}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"input spec needs {self.channels} mean and std values, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise DataError(f"input spec std must be positive, got {self.std}")
        if self.layout not in LAYOUTS:
            raise DataError(f"input spec layout must be one of {LAYOUTS}, got '{self.layout}'")
        # Accept lists (e.g. from JSON) but store tuples so the spec stays hashable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's shape in this spec's layout."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["transform"] = self.describe()
        return d

    def describe(self) -> str:
        """The whole evaluation transform in one line, for reports and for reproducing it on a device."""
        size = f"{self.height}x{self.width}"
        resize = (f"resize shorter side to {self.resize}, center crop {size}" if self.resize is not None
                  else f"resize to {size}")
        colour = {3: "RGB", 1: "grey (luminance)"}.get(self.channels, f"{self.channels}-channel")
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        return (f"{colour}, {resize} ({self.interpolation}), scale to [0, 1], subtract mean [{mean}], divide by "
                f"std [{std}] ({self.normalization} statistics), {self.layout} {self.dtype}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            layout=str(d.get("layout", "NCHW")),
            resize=int(d["resize"]) if d.get("resize") is not None else None,
            interpolation=str(d.get("interpolation", "bilinear")),
            normalization=str(d.get("normalization", "dataset")),
            dtype=str(d.get("dtype", "float32")),
        )

    def _broadcast_shape(self, images_ndim: int) -> tuple[int, ...]:
        if images_ndim != 4:
            raise DataError(f"expected a batch of images (4 dims, {self.layout}), got {images_ndim} dims")
        return (1, self.channels, 1, 1) if self.layout == "NCHW" else (1, 1, 1, self.channels)

    def _check_channels(self, shape: tuple[int, ...]) -> None:
        got = shape[1] if self.layout == "NCHW" else shape[-1]
        if got != self.channels:
            raise DataError(f"images have {got} channels but the input spec expects {self.channels} ({self.layout})")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch in this spec's layout -> float32 normalized. Float input is taken as already in [0, 1]."""
        view = self._broadcast_shape(images.ndim)
        self._check_channels(tuple(images.shape))
        x = images.to(torch.float32)
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(view)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(view)
        return (x - mean) / std

    def normalize_numpy(self, images: np.ndarray) -> np.ndarray:
        """The numpy twin of `normalize`, for runtimes that take numpy arrays."""
        view = self._broadcast_shape(images.ndim)
        self._check_channels(images.shape)
        x = images.astype(np.float32)
        if images.dtype == np.uint8:
            x = x / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(view)
        std = np.asarray(self.std, dtype=np.float32).reshape(view)
        return ((x - mean) / std).astype(np.float32, copy=False)
