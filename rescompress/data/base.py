"""Dataset containers and the shared steps every source goes through: split, subset, resize, stats, batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from rescompress.data.spec import InputSpec
from rescompress.errors import DataError

AUGMENTATIONS = ("crop", "flip")
_CHUNK = 2048  # images per step when resizing or computing stats, to bound float memory


@dataclass
class Split:
    """One split of a dataset, already at the model input size."""

    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"split images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"split labels must be int64 (N,) with N={self.images.shape[0]}, "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DatasetBundle:
    """Train/val/test splits plus what a model and a report need to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    input_spec: InputSpec
    augmentations: tuple[str, ...]
    source: str

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "num_classes": self.num_classes,
            "input_spec": self.input_spec.to_dict(),
            "augmentations": list(self.augmentations),
            "source": self.source,
        }


@dataclass
class RawDataset:
    """What a source loader returns: uint8 (N, C, H, W) arrays at native size, official splits where they exist."""

    train: tuple[np.ndarray, np.ndarray]
    class_names: list[str]
    augmentations: tuple[str, ...]
    source: str
    test: tuple[np.ndarray, np.ndarray] | None = None
    val: tuple[np.ndarray, np.ndarray] | None = None


# ---------------------------------------------------------------- splitting


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes in proportion to `counts` (largest remainder, ties by class order)."""
    quota = counts * (total / counts.sum())
    share = np.floor(quota).astype(np.int64)
    leftover = total - int(share.sum())
    order = np.argsort(-(quota - share), kind="stable")
    share[order[:leftover]] += 1
    return np.minimum(share, counts)


def stratified_split(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `holdout` items held out, each class in proportion; both sorted."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    keep: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for cls, n_out in zip(classes, _allocate(counts, holdout)):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        held.append(idx[:n_out])
        keep.append(idx[n_out:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _fraction_size(n: int, fraction: float, what: str) -> int:
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{what} must be in (0, 1), got {fraction}")
    size = int(round(n * fraction))
    if size == 0 or size == n:
        raise DataError(f"{what}={fraction} of {n} images leaves an empty split; choose one that keeps both sides")
    return size


def _take(arrays: tuple[np.ndarray, np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return arrays[0][idx], arrays[1][idx]


# ---------------------------------------------------------------- pixels


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a uint8 (N, C, H, W) batch to size x size (antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = size < max(images.shape[-2:])
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        x = images[start : start + _CHUNK].to(torch.float32)
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start : start + _CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by replication, RGB -> grey by ITU-R 601 luminance; uint8 in, uint8 out."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = (images.to(torch.float32) * weights).sum(dim=1, keepdim=True)
        return grey.round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels (supported: 1 <-> 3)")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]; std floored at 1e-3."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(_CHUNK):
        x = chunk.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


# ---------------------------------------------------------------- assembly


def assemble(
    name: str,
    raw: RawDataset,
    *,
    image_size: int | None,
    channels: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    limit_train: int | None,
) -> DatasetBundle:
    """Turn a source's arrays into a bundle.

    Without an official test split, `test_fraction` of all images is held out for test; without an official
    val split, `val_fraction` of the remaining training pool is held out for val. Both are stratified and
    depend only on `seed`. `limit_train` then keeps a stratified subset of the training images.
    """
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if limit_train is not None and limit_train < 1:
        raise DataError(f"limit_train must be a positive integer, got {limit_train}")
    num_classes = len(raw.class_names)
    train, test, val = raw.train, raw.test, raw.val
    if test is None:
        keep, held = stratified_split(train[1], _fraction_size(len(train[1]), test_fraction, "test_fraction"), seed)
        train, test = _take(train, keep), _take(train, held)
    if val is None and val_fraction == 0:
        val = (train[0][:0], train[1][:0])  # no validation split asked for
    elif val is None:
        keep, held = stratified_split(train[1], _fraction_size(len(train[1]), val_fraction, "val_fraction"), seed + 1)
        train, val = _take(train, keep), _take(train, held)
    if limit_train is not None and limit_train < len(train[1]):
        _, subset = stratified_split(train[1], limit_train, seed + 2)
        train = _take(train, subset)

    native = raw.train[0].shape[1]
    target = channels or native

    def prepare(arrays: tuple[np.ndarray, np.ndarray], split: str) -> Split:
        images, labels = arrays
        if len(labels) == 0 and not (split == "val" and val_fraction == 0):
            raise DataError(f"dataset '{name}' has an empty {split} split")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(
                f"dataset '{name}' {split} labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
            )
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        if target < x.shape[1]:  # fewer channels first: less to resize
            x = convert_channels(x, target)
        if image_size is not None:
            x = resize_images(x, image_size)
        x = convert_channels(x, target)
        return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))

    splits = {k: prepare(a, k) for k, a in (("train", train), ("val", val), ("test", test))}
    mean, std = channel_stats(splits["train"].images)
    _, c, h, w = splits["train"].images.shape
    return DatasetBundle(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=num_classes,
        class_names=list(raw.class_names),
        input_spec=InputSpec(channels=c, height=h, width=w, mean=mean, std=std),
        augmentations=tuple(raw.augmentations),
        source=raw.source,
    )


# ---------------------------------------------------------------- batching


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `pad` pixels and crop back to the original size at a random offset per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    rows = (dy + torch.arange(h)).unsqueeze(2)  # (N, H, 1)
    cols = (dx + torch.arange(w)).unsqueeze(1)  # (N, 1, W)
    batch = torch.arange(n).view(n, 1, 1)
    crops = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    # a fresh NCHW buffer: with one channel `.contiguous()` keeps the permuted strides, and torch's CPU
    # convolution with very few output channels misbehaves on them
    return crops.clone(memory_format=torch.contiguous_format)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 0.5."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def batches(
    split: Split,
    spec: InputSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: tuple[str, ...] = (),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float32 normalized images, int64 labels); the last partial batch is kept.

    Shuffling and augmentation ("crop": zero-padded random crop, "flip": horizontal flip) draw from
    `generator`, so a seeded generator gives the same batches every time.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size}")
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise DataError(f"unknown augmentation(s) {unknown}; known: {list(AUGMENTATIONS)}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    pad = max(1, split.images.shape[2] // 8)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x = split.images[idx]
        if "crop" in augment:
            x = random_crop(x, pad, generator)
        if "flip" in augment:
            x = random_flip(x, generator)
        yield spec.normalize(x), split.labels[idx]
