"""Dataset containers and the shared steps every source goes through: split, subset, resize, stats, batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from rescompress.data.spec import InputSpec
from rescompress.errors import DataError

AUGMENTATIONS = ("crop", "flip")
_CHUNK_BYTES = 256 * 2**20  # float32 bytes per step when resizing or computing stats


def _chunk(images: int, per_image: int) -> int:
    """Images per step so that one float32 step stays within _CHUNK_BYTES (at least one image)."""
    return max(1, min(max(1, images), _CHUNK_BYTES // max(1, 4 * per_image)))


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

    def subset(self, idx: np.ndarray) -> "Split":
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return Split(self.images[idx_t], self.labels[idx_t])


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
    streaming: Optional[dict] = None  # on-disk sources: workers, index origin, skipped files, train transform
    file_index: Optional[Any] = None  # on-disk sources: the FileIndex the splits were drawn from

    def summary(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_spec": self.input_spec.to_dict(),
            "eval_transform": self.input_spec.describe(),
            "augmentations": list(self.augmentations),
            "source": self.source,
            "in_memory": self.streaming is None,
        }
        if self.streaming is not None:
            skipped = self.streaming["skipped"]
            out["streaming"] = {**{k: v for k, v in self.streaming.items() if k != "skipped"},
                                "skipped_files": len(skipped),
                                "skipped_examples": [f"{p}: {e}" for p, e in list(skipped.items())[:10]]}
        return out


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
    n, c, h, w = images.shape
    step = _chunk(n, c * (h * w + size * size))  # the float input and the float output of one step
    for start in range(0, images.shape[0], step):
        x = images[start : start + step].to(torch.float32)
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start : start + step] = y.round_().clamp_(0, 255).to(torch.uint8)
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
    for chunk in images.split(_chunk(images.shape[0], 2 * int(np.prod(images.shape[1:])))):
        x = chunk.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    return stats_from_sums(total, squares, images.shape[0] * images.shape[2] * images.shape[3])


def stats_from_sums(total: torch.Tensor, squares: torch.Tensor,
                    count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) from sums of pixel values and of their squares over `count` pixels per channel;
    std floored at 1e-3."""
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


# ---------------------------------------------------------------- assembly

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(normalize: Any, channels: int, from_data: Any) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, origin) for `normalize`: "dataset" (computed by `from_data()`), "imagenet", or a
    {mean, std} mapping."""
    if normalize == "dataset":
        return (*from_data(), "dataset")
    if normalize == "imagenet":
        if channels != 3:
            raise DataError(f"data.normalize: imagenet needs RGB input (3 channels), the data has {channels}; "
                            f"use dataset, or give mean and std")
        return IMAGENET_MEAN, IMAGENET_STD, "imagenet"
    if isinstance(normalize, dict) and set(normalize) - {"origin"} == {"mean", "std"}:
        mean, std = tuple(float(m) for m in normalize["mean"]), tuple(float(v) for v in normalize["std"])
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"data.normalize needs {channels} mean and {channels} std values (one per channel), "
                            f"got {len(mean)} and {len(std)}")
        return mean, std, str(normalize.get("origin", "recipe"))
    raise DataError(f"data.normalize must be auto, dataset, imagenet or {{mean: [...], std: [...]}}, got {normalize!r}")


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable from /proc/meminfo (or a cgroup limit, if lower)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (avail or 1 << 62):
            avail = int(text)
    return avail if avail is not None else 1 << 62


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_in_memory(name: str, images: int, channels: int, size: int) -> None:
    """Refuse an in-memory dataset that would not fit, before anything is allocated (uint8 images at the
    model input size, plus the float copies resizing and statistics make chunk by chunk)."""
    need = images * channels * size * size + 2 * _CHUNK_BYTES
    free = available_memory()
    if need > 0.8 * free:
        raise DataError(f"dataset '{name}' at {size}x{size} with {channels} channel(s) would hold {images:,} images "
                        f"in memory: about {_gib(need)}, but only {_gib(free)} is available. Lower data.image_size, "
                        f"or use an on-disk source (image_folder or manifest), which streams from disk")


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
    normalize: Any = "dataset",
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
    size = image_size or max(raw.train[0].shape[2:])
    total = sum(len(a[1]) for a in (train, val, test))
    check_in_memory(name, total, target, size)

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
    _, c, h, w = splits["train"].images.shape
    mean, std, origin = normalization(normalize, c, lambda: channel_stats(splits["train"].images))
    return DatasetBundle(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=num_classes,
        class_names=list(raw.class_names),
        input_spec=InputSpec(channels=c, height=h, width=w, mean=mean, std=std, normalization=origin),
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


def draw_seed(*parts: int) -> int:
    """One 63-bit seed from (seed, epoch, index, ...): every shuffle and augmentation draw is a function of
    such a tuple, never of how many processes or workers produce the batches."""
    import hashlib

    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation drawn from (seed, epoch), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(draw_seed(seed, epoch)))


def check_batching(batch_size: int, augment: tuple[str, ...], known: tuple[str, ...]) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size}")
    unknown = [a for a in augment if a not in known]
    if unknown:
        raise DataError(f"unknown augmentation(s) {unknown}; known: {list(known)}")


def rank_slice(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of a global batch (every rank draws the same global order)."""
    return idx if world <= 1 else idx[rank::world]


def memory_batches(
    split: Split,
    spec: InputSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: tuple[str, ...] = (),
    device: torch.device | str | None = None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of an in-memory split: the order from (seed, epoch), each batch's augmentation from
    (seed, epoch, batch start)."""
    check_batching(batch_size, augment, AUGMENTATIONS)
    n = len(split)
    order = epoch_order(n, shuffle, seed, epoch)
    pad = max(1, split.images.shape[2] // 8)
    for start in range(0, n, batch_size):
        idx = rank_slice(order[start : start + batch_size], rank, world)
        x = split.images[idx]
        if augment:
            g = torch.Generator().manual_seed(draw_seed(seed, epoch, start, rank))
            if "crop" in augment:
                x = random_crop(x, pad, g)
            if "flip" in augment:
                x = random_flip(x, g)
        y = split.labels[idx]
        if device is not None and torch.device(device).type == "cuda":  # pinned, so the copy is asynchronous
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        elif device is not None and torch.device(device).type != "cpu":
            x, y = x.to(device), y.to(device)
        yield spec.normalize(x), y


def batches(
    split: Any,
    spec: InputSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: tuple[str, ...] = (),
    device: torch.device | str | None = None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float32 normalized images, int64 labels) on `device` (default: the CPU); the last partial batch
    is kept.

    The order (when `shuffle`) is drawn from (seed, epoch) and every augmentation draw from (seed, epoch,
    sample or batch position): the same arguments give the same batches, whatever the number of loader
    workers. With `world` > 1 each rank gets its share (`rank::world`) of every global batch, and an
    on-disk split decodes only that share. In-memory splits know "crop" (zero-padded random crop) and
    "flip"; on-disk splits also "random_resized_crop" and "color_jitter"."""
    kwargs = dict(shuffle=shuffle, seed=seed, epoch=epoch, augment=tuple(augment), device=device, rank=rank,
                  world=world)
    if isinstance(split, Split):
        return memory_batches(split, spec, batch_size, **kwargs)
    return split.batches(spec, batch_size, **kwargs)
