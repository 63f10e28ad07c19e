"""The dataset sources: scikit-learn digits, Fashion-MNIST (IDX), CIFAR-10 (python batches), image folders.

Each loader reads arrays at native size; `load_dataset` splits, resizes and normalizes them the same way.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rescompress.data.base import DatasetBundle, RawDataset, assemble
from rescompress.errors import DataError
from rescompress.registry import Registry

Loader = Callable[[str | None, int | None, int | None], RawDataset]  # (root, image_size, channels)
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
) -> DatasetBundle:
    """Load a registered dataset as uint8 train/val/test splits at the model input size."""
    loader = DATASETS.get(name)
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


# ---------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEFAULT_IMAGE_SIZE = 224


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(folder: Path, classes: list[str], size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """All images under folder/<class>/, converted to RGB or L and resized to size x size."""
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if channels == 3 else "L"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for sub in _class_dirs(folder):
        if sub.name not in classes:
            raise DataError(f"class folder {sub} is not among the training classes {classes}")
        files = _image_files(sub)
        if not files:
            raise DataError(f"class folder {sub} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as img:
                    pixels = np.asarray(img.convert(mode).resize((size, size), Image.Resampling.BILINEAR))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read image {path}: {e}") from None
            images.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
            labels.append(classes.index(sub.name))
    if not images:
        raise DataError(f"no class folders with images in {folder} (expected {folder}/<class>/*.png|jpg|jpeg|bmp)")
    return np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64)


@DATASETS.register("image_folder")
def load_image_folder(root: str | None, image_size: int | None, channels: int | None) -> RawDataset:
    """root/<class>/*.png|jpg|jpeg|bmp, or root/{train,test[,val]}/<class>/... for official splits."""
    if root is None:
        raise DataError("dataset 'image_folder' needs `data.root: <dir with one folder per class>`")
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    size = image_size or DEFAULT_IMAGE_SIZE
    channels = channels or 3
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    split_layout = (folder / "train").is_dir() and (folder / "test").is_dir()
    train_dir = folder / "train" if split_layout else folder
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise DataError(f"no class folders in {train_dir} (expected {train_dir}/<class>/*.png|jpg|jpeg|bmp)")
    splits = {"train": _read_images(train_dir, classes, size, channels)}
    if split_layout:
        for part in ("test", "val"):
            if (folder / part).is_dir():
                splits[part] = _read_images(folder / part, classes, size, channels)
    return RawDataset(
        train=splits["train"],
        test=splits.get("test"),
        val=splits.get("val"),
        class_names=classes,
        augmentations=("crop", "flip"),
        source=str(folder),
    )
