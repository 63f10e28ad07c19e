"""The dataset sources: scikit-learn digits, Fashion-MNIST (IDX), CIFAR-10 (python batches), image folders.

Each loader reads arrays at native size; `load_dataset` splits, resizes and normalizes them the same way.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

import torch

from rescompress.data.base import (DatasetBundle, RawDataset, _fraction_size, assemble, normalization,
                                   stratified_split)
from rescompress.data.files import (ON_CORRUPT, FileIndex, FileSplit, build_index, default_workers,
                                    streaming_stats)
from rescompress.data.spec import InputSpec
from rescompress.data.transforms import DEFAULT_RATIO, DEFAULT_SCALE, EvalTransform, TrainTransform, eval_resize
from rescompress.errors import DataError
from rescompress.registry import Registry

# in memory: (root, image_size, channels) -> RawDataset; on disk (ON_DISK): (root, cache) -> (FileIndex, origin)
Loader = Callable[..., Any]
DATASETS: Registry[Loader] = Registry("dataset")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_DEFAULT_ROOTS = {"fashion_mnist": FASHION_MNIST_ROOT}


def default_root(name: str) -> str | None:
    """Where a dataset is looked for when the recipe gives no root (None: it needs none, or must be given)."""
    DATASETS.get(name)  # unknown names fail with a suggestion
    return _DEFAULT_ROOTS.get(name)


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    limit_train: int | None = None,
    normalize: Any = "dataset",
    options: StreamOptions | None = None,
) -> DatasetBundle:
    """Load a registered dataset: in memory as uint8 splits at the model input size (the small built-in
    sources), or as splits that stream from disk (image folders and manifests). `normalize` is "dataset",
    "imagenet" or {mean, std}; `options` tunes the on-disk sources."""
    loader = DATASETS.get(name)
    if name in ON_DISK:
        options = options or StreamOptions()
        index, origin = loader(root, options.index_cache)
        return stream_dataset(name, index, origin, source=str(root), image_size=image_size, channels=channels,
                              val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                              limit_train=limit_train, normalize=normalize, options=options)
    raw = loader(root if root is not None else _DEFAULT_ROOTS.get(name), image_size, channels)
    return assemble(
        name,
        raw,
        image_size=image_size,
        channels=channels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        limit_train=limit_train,
        normalize=normalize,
    )


# ---------------------------------------------------------------- digits


@DATASETS.register("digits")
def load_digits(root: str | None, image_size: int | None, channels: int | None) -> RawDataset:
    """scikit-learn's 1,797 8x8 handwritten digits, values 0..16 scaled to 0..255."""
    if root is not None:
        raise DataError("dataset 'digits' ships inside scikit-learn and takes no root; remove data.root")
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return RawDataset(
        train=(images, digits.target.astype(np.int64)),
        class_names=[str(c) for c in digits.target_names],
        augmentations=("crop",),  # flipping changes what a digit means
        source="scikit-learn load_digits",
    )


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed, detected from its first bytes) into a native-endian array."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        data = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"IDX file {path} has {len(data)} bytes, its header promises {expected} (truncated or corrupt)")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    """The file for `stem` in any common spelling: dash or dot before 'idx', with or without .gz."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(root: str | None, image_size: int | None, channels: int | None) -> RawDataset:
    """Fashion-MNIST from its four IDX files; the official 10k test set is the test split."""
    folder = Path(root or FASHION_MNIST_ROOT)
    found = {key: _find_idx(folder, stem) for key, stem in _FASHION_FILES.items()}
    missing = [_FASHION_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}[.gz]). Install it with "
            "`sudo apt-get update && sudo apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_ROOT}), or set `data.root: <dir with the IDX files>`."
        )
    arrays = {key: read_idx(path) for key, path in found.items() if path is not None}
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {part} files in {folder} disagree: images {images.shape}, labels {labels.shape}"
            )
        splits.append((images.astype(np.uint8)[:, None], labels.astype(np.int64)))
    return RawDataset(
        train=splits[0],
        test=splits[1],
        class_names=list(FASHION_CLASSES),
        augmentations=("crop", "flip"),
        source=str(folder),
    )


# ---------------------------------------------------------------- CIFAR-10 (python pickle batches)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_NP_CORE = getattr(np, "_core", None) or np.core
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at pickle protocol 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "scalar"): _NP_CORE.multiarray.scalar,
    ("numpy._core.numeric", "_frombuffer"): _NP_CORE.numeric._frombuffer,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module.replace("numpy.core.", "numpy._core."), name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # arbitrary bytes can fail the unpickler in any way
        raise DataError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR batch {path} holds a {type(batch).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in batch.items()}


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_batch(path)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"CIFAR batch {path} lacks 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"CIFAR batch {path} has data {data.shape} and {len(labels)} labels, expected (N, 3072) and N")
    return data.reshape(-1, 3, 32, 32), labels


@DATASETS.register("cifar10")
def load_cifar10(root: str | None, image_size: int | None, channels: int | None) -> RawDataset:
    """CIFAR-10 python batches (data_batch_1..5, test_batch, optional batches.meta) in `root`."""
    if root is None:
        raise DataError("dataset 'cifar10' needs `data.root: <dir with data_batch_1..5 and test_batch>`")
    folder = Path(root)
    if (folder / "cifar-10-batches-py").is_dir():  # the archive's own top folder
        folder = folder / "cifar-10-batches-py"
    missing = [n for n in [*_CIFAR_TRAIN, "test_batch"] if not (folder / n).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 batches missing in {folder}: {', '.join(missing)}")
    parts = [_batch_arrays(folder / n) for n in _CIFAR_TRAIN]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    names = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        meta = _read_batch(folder / "batches.meta").get("label_names")
        if meta:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta]
    return RawDataset(
        train=train,
        test=_batch_arrays(folder / "test_batch"),
        class_names=names,
        augmentations=("crop", "flip"),
        source=str(folder),
    )


# ---------------------------------------------------------------- on disk: image folders and manifests

DEFAULT_IMAGE_SIZE = 224


@DATASETS.register("image_folder")
def index_image_folder(root: str | None, cache: Path | None = None) -> tuple[FileIndex, str]:
    """root/<class>/*.jpg|png|..., or root/{train,test[,val]}/<class>/... for official splits; streamed."""
    if root is None:
        raise DataError("dataset 'image_folder' needs `data.root: <dir with one folder per class>`")
    return build_index("image_folder", root, cache)


@DATASETS.register("manifest")
def index_manifest(root: str | None, cache: Path | None = None) -> tuple[FileIndex, str]:
    """A CSV (`path,label[,split]`) or JSON list of files; data.root names the manifest; streamed."""
    if root is None:
        raise DataError("dataset 'manifest' needs `data.root: <manifest.csv or manifest.json>` (columns "
                        "path,label[,split]; relative paths are read from the manifest's folder)")
    return build_index("manifest", root, cache)


ON_DISK = ("image_folder", "manifest")


@dataclass(frozen=True)
class StreamOptions:
    """How an on-disk dataset is read: loader workers, evaluation transform, training augmentation, the
    statistics sample, what to do with unreadable files, and where the file index is cached."""

    workers: Optional[int] = None  # default: the machine's cores, at most 8
    interpolation: str = "bilinear"
    crop_fraction: float = 0.875
    crop_scale: tuple[float, float] = DEFAULT_SCALE
    crop_ratio: tuple[float, float] = DEFAULT_RATIO
    color_jitter: float = 0.0
    stats_images: int = 512
    on_corrupt: str = "fail"
    index_cache: Optional[Path] = None


def _pools(index: FileIndex, val_fraction: float, test_fraction: float, seed: int,
           limit_train: int | None) -> dict[str, np.ndarray]:
    """Positions in the index of each split: the layout's or manifest's own splits where given, else
    stratified hold-outs drawn like the in-memory sources' (same fractions, same seeds)."""
    named = {s: np.flatnonzero(index.splits == s) for s in ("train", "val", "test")}
    if not len(named["train"]):
        named["train"] = np.flatnonzero(index.splits == "")
    train = named["train"]
    if not len(named["test"]):
        n = len(train)
        keep, held = stratified_split(index.labels[train], _fraction_size(n, test_fraction, "test_fraction"), seed)
        train, named["test"] = train[keep], train[held]
    if not len(named["val"]) and val_fraction > 0:
        n = len(train)
        keep, held = stratified_split(index.labels[train], _fraction_size(n, val_fraction, "val_fraction"), seed + 1)
        train, named["val"] = train[keep], train[held]
    if limit_train is not None and limit_train < len(train):
        _, subset = stratified_split(index.labels[train], limit_train, seed + 2)
        train = train[subset]
    named["train"] = train
    return named


def stream_dataset(name: str, index: FileIndex, index_origin: str, *, source: str, image_size: int | None,
                   channels: int | None, val_fraction: float, test_fraction: float, seed: int,
                   limit_train: int | None, normalize: Any, options: StreamOptions) -> DatasetBundle:
    """A bundle whose splits stay on disk and decode in loader workers."""
    size = image_size or DEFAULT_IMAGE_SIZE
    channels = channels or 3
    if options.on_corrupt not in ON_CORRUPT:
        raise DataError(f"data.on_corrupt must be one of {', '.join(ON_CORRUPT)}, got '{options.on_corrupt}'")
    eval_t = EvalTransform(size, channels, eval_resize(size, options.crop_fraction), options.interpolation)
    train_t = TrainTransform(eval_t, ("random_resized_crop", "flip"), tuple(options.crop_scale),
                             tuple(options.crop_ratio), options.color_jitter)
    workers = default_workers() if options.workers is None else options.workers
    pools = _pools(index, val_fraction, test_fraction, seed, limit_train)
    skipped: dict = {}

    def split(pos: np.ndarray, train: bool) -> FileSplit:
        return FileSplit(index.root, index.paths.take(pos), torch.from_numpy(index.labels[pos]), eval_t,
                         train_t if train else None, workers, options.on_corrupt, skipped=skipped)

    splits = {k: split(v, k == "train") for k, v in pools.items()}
    for k in ("train", "test"):
        if not len(splits[k]):
            raise DataError(f"dataset '{name}' has an empty {k} split")
    c = channels
    mean, std, origin = normalization(
        normalize, c, lambda: streaming_stats(splits["train"], options.stats_images, seed)[:2])
    spec = InputSpec(channels=c, height=size, width=size, mean=mean, std=std, resize=eval_t.resize,
                     interpolation=options.interpolation, normalization=origin)
    augment = ["random_resized_crop", "flip"] + (["color_jitter"] if options.color_jitter > 0 else [])
    bundle = DatasetBundle(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                           num_classes=len(index.classes), class_names=list(index.classes), input_spec=spec,
                           augmentations=tuple(augment), source=source,
                           file_index=index)
    bundle.streaming = {
        "workers": workers, "index": index_origin, "index_digest": index.digest(), "files": len(index),
        "on_corrupt": options.on_corrupt, "skipped": skipped,
        "stats_images": min(options.stats_images, len(splits["train"])) if origin == "dataset" else 0,
        "train_transform": train_t.describe() | {"scale": list(options.crop_scale),
                                                 "ratio": [round(r, 4) for r in options.crop_ratio]},
    }
    return bundle
