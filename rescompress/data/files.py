"""Datasets that stay on disk: an index of (file, label, split), and splits decoded lazily in DataLoader workers.

The index is built once (a directory scan, or a manifest read) and saved as JSON; a resumed run or a sweep
trial reads it instead of scanning again. Paths are stored as one byte blob plus offsets, so a million
files cost tens of megabytes and forked workers do not copy them page by page.

A `FileSplit` yields batches like an in-memory split: `batches(spec, batch_size, shuffle=, seed=, epoch=,
augment=, device=, rank=, world=)`. Workers decode uint8 images; the main process copies them to the
device (pinned when that is a GPU) and normalizes there. Memory is O(batch x workers), not O(dataset).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from rescompress.data.base import check_batching, draw_seed, epoch_order, rank_slice, stats_from_sums
from rescompress.data.spec import InputSpec
from rescompress.data.transforms import TRAIN_AUGMENTATIONS, EvalTransform, TrainTransform
from rescompress.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INDEX_FORMAT = "rescompress-file-index"
SPLITS = ("train", "val", "test")
ON_CORRUPT = ("fail", "skip")


# ---------------------------------------------------------------- the index


class Paths:
    """An immutable list of strings stored as one utf-8 blob and int64 offsets."""

    def __init__(self, items: list[str] | None = None, *, blob: Optional[np.ndarray] = None,
                 offsets: Optional[np.ndarray] = None) -> None:
        if blob is None:
            encoded = [s.encode("utf-8") for s in items or []]
            self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
            self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        else:
            self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")

    def take(self, idx: np.ndarray) -> "Paths":
        return Paths([self[int(i)] for i in idx])

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass
class FileIndex:
    """Every file of a dataset on disk: paths relative to `root`, integer labels into `classes`, and the
    split each file belongs to where the layout or manifest says ("" where it does not)."""

    root: str
    kind: str  # "image_folder" or "manifest"
    classes: list[str]
    paths: Paths
    labels: np.ndarray  # int64
    splits: np.ndarray  # "<U5": "train", "val", "test" or ""

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self, split: str) -> dict[str, int]:
        labels = self.labels[self.splits == split]
        return {name: int((labels == i).sum()) for i, name in enumerate(self.classes)}

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.root, self.kind, "\n".join(self.classes)):
            h.update(part.encode())
        for arr in (self.paths.blob, self.paths.offsets, self.labels, self.splits.astype("S5")):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: Path) -> Path:
        from rescompress.fileio import atomic_write_text

        doc = {"format": INDEX_FORMAT, "version": 1, "root": self.root, "kind": self.kind, "classes": self.classes,
               "digest": self.digest(), "paths": list(self.paths), "labels": self.labels.tolist(),
               "splits": self.splits.tolist()}
        return atomic_write_text(path, json.dumps(doc))

    @classmethod
    def load(cls, path: Path) -> "FileIndex":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != INDEX_FORMAT:
                raise ValueError("not a file index")
            index = cls(root=doc["root"], kind=doc["kind"], classes=list(doc["classes"]), paths=Paths(doc["paths"]),
                        labels=np.asarray(doc["labels"], dtype=np.int64), splits=np.asarray(doc["splits"], dtype="<U5"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read the file index {path} ({type(exc).__name__}: {exc}); delete it to "
                            f"scan the dataset again") from None
        if index.digest() != doc.get("digest"):
            raise DataError(f"the file index {path} does not match its digest (edited or torn); delete it to scan "
                            f"the dataset again")
        return index


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    """Image files below `folder` (any depth), relative to it, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        found += [f if rel == "." else f"{rel}/{f}" for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _check_classes(classes: list[str], counts: dict[str, int], where: str) -> None:
    listing = ", ".join(f"{c}: {n}" for c, n in counts.items()) or "none"
    if len(classes) < 2:
        raise DataError(f"{where} has {len(classes)} class(es) ({listing}); a classifier needs at least two")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"{where}: class(es) {', '.join(empty)} have no images (class counts: {listing}); "
                        f"remove the empty folders or add images ({', '.join(IMAGE_SUFFIXES)})")


def scan_image_folder(root: str) -> FileIndex:
    """root/<class>/**/*.jpg|png|..., or root/{train,test[,val]}/<class>/... for official splits."""
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    split_layout = (folder / "train").is_dir() and (folder / "test").is_dir()
    train_dir = folder / "train" if split_layout else folder
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise DataError(f"no class folders in {train_dir} (expected {train_dir}/<class>/*.jpg|png|...)")
    paths: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    parts = [(p, folder / p) for p in SPLITS if (folder / p).is_dir()] if split_layout else [("", folder)]
    for split, base in parts:
        counts = {}
        for sub in _class_dirs(base):
            if sub.name not in classes:
                raise DataError(f"class folder {sub} is not among the training classes {classes}")
            files = _images_under(sub)
            counts[sub.name] = len(files)
            prefix = os.path.relpath(sub, folder)
            paths += [f"{prefix}/{f}" for f in files]
            labels += [classes.index(sub.name)] * len(files)
            splits += [split] * len(files)
        if split in ("", "train"):
            _check_classes(classes, {c: counts.get(c, 0) for c in classes}, f"image folder {base}")
    return FileIndex(root=str(folder.resolve()), kind="image_folder", classes=classes, paths=Paths(paths),
                     labels=np.asarray(labels, dtype=np.int64), splits=np.asarray(splits, dtype="<U5"))


def _manifest_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"manifest {path} is not valid JSON: {exc}") from None
        if isinstance(rows, dict) and isinstance(rows.get("images"), list):
            rows = rows["images"]
        if not isinstance(rows, list):
            raise DataError(f"manifest {path} must hold a list of {{path, label[, split]}} objects")
        out = []
        for i, row in enumerate(rows):
            if isinstance(row, (list, tuple)) and len(row) in (2, 3):
                row = dict(zip(("path", "label", "split"), row))
            if not isinstance(row, dict):
                raise DataError(f"manifest {path} entry {i}: expected {{path, label[, split]}}, got {row!r}")
            out.append(row)
        return out
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
        raise DataError(f"manifest {path} needs a header row with columns path,label[,split] "
                        f"(got {reader.fieldnames})")
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def read_manifest(manifest: str) -> FileIndex:
    """A CSV (header `path,label[,split]`) or JSON list of {path, label[, split]}; relative paths are taken
    from the manifest's folder. Labels are class names (or numbers, ordered numerically)."""
    path = Path(manifest)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist (data.root names the manifest file for 'manifest')")
    rows = _manifest_rows(path)
    if not rows:
        raise DataError(f"manifest {path} lists no images")
    base = path.parent.resolve()
    names = [str(r.get("label", "")).strip() for r in rows]
    for i, (row, name) in enumerate(zip(rows, names)):
        if not str(row.get("path", "")).strip() or not name:
            raise DataError(f"manifest {path} row {i + 1}: needs both a path and a label, got {row}")
        split = str(row.get("split", "") or "").strip()
        if split not in ("", *SPLITS):
            raise DataError(f"manifest {path} row {i + 1}: split must be one of {', '.join(SPLITS)} or empty, "
                            f"got '{split}'")
    numeric = all(n.lstrip("-").isdigit() for n in names)
    classes = sorted(set(names), key=(lambda n: int(n)) if numeric else None)
    lookup = {c: i for i, c in enumerate(classes)}
    splits = np.asarray([str(r.get("split", "") or "").strip() for r in rows], dtype="<U5")
    if set(splits.tolist()) - {""} and "" in set(splits.tolist()):
        raise DataError(f"manifest {path}: some rows name a split and others do not; give every row one, or none")
    rel = []
    for r in rows:
        p = Path(str(r["path"]).strip())
        rel.append(str(p if p.is_absolute() else (base / p)))
    labels = np.asarray([lookup[n] for n in names], dtype=np.int64)
    index = FileIndex(root="/", kind="manifest", classes=classes, paths=Paths(rel), labels=labels, splits=splits)
    train_split = "train" if "train" in splits else ""
    _check_classes(classes, index.counts(train_split), f"manifest {path} ({train_split or 'all'} rows)")
    missing = [p for p in rel[:5000] if not os.path.isfile(p)]
    if missing:
        raise DataError(f"manifest {path}: {len(missing)} of the first {min(5000, len(rel))} listed files do not "
                        f"exist, e.g. {missing[0]}")
    return index


def build_index(kind: str, root: str, cache: Optional[Path] = None) -> tuple[FileIndex, str]:
    """The dataset's index, read from `cache` when it is there (and saved there when it is not).
    Returns the index and where it came from."""
    if cache is not None and cache.is_file():
        index = FileIndex.load(cache)
        return index, f"file index read from {cache}"
    index = scan_image_folder(root) if kind == "image_folder" else read_manifest(root)
    if cache is not None:
        index.save(cache)
    return index, "scanned"


# ---------------------------------------------------------------- decoding in workers


@dataclass(frozen=True)
class _Key:
    index: int  # position in the split
    seed: int  # the draw seed for this sample's augmentation (0: no augmentation)
    train: bool


class _Decoded(torch.utils.data.Dataset):
    """Workers' view of a split: a key in, (uint8 CHW image or None, label, path, error) out."""

    def __init__(self, root: str, paths: Paths, labels: np.ndarray, eval_t: EvalTransform,
                 train_t: Optional[TrainTransform]) -> None:
        self.root, self.paths, self.labels, self.eval_t, self.train_t = root, paths, labels, eval_t, train_t

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: _Key) -> tuple:
        path = os.path.join(self.root, self.paths[key.index])
        try:
            if key.train and self.train_t is not None:
                pixels = self.train_t(path, np.random.default_rng(key.seed))
            else:
                pixels = self.eval_t(path)
        except Exception as exc:  # any decoder failure on any file: the main process decides (fail or skip)
            return None, int(self.labels[key.index]), path, f"{type(exc).__name__}: {exc}"
        return torch.from_numpy(pixels), int(self.labels[key.index]), path, None


def _collate(items: list[tuple]) -> tuple:
    good = [it for it in items if it[0] is not None]
    bad = [(it[2], it[3]) for it in items if it[0] is None]
    # default_collate stacks straight into shared memory inside a worker (no private copy to hand over)
    x = torch.utils.data.default_collate([it[0] for it in good]) if good else None
    y = torch.tensor([it[1] for it in good], dtype=torch.int64)
    return x, y, bad


class _Sampler(torch.utils.data.Sampler):
    """Global batches of one epoch, this rank's share of each; the plan is set before every pass, in the main
    process, so persistent workers serve every epoch."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.shuffle, self.seed, self.epoch, self.train = False, 0, 0, False

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[_Key]]:
        order = epoch_order(self.n, self.shuffle, self.seed, self.epoch)
        for start in range(0, self.n, self.batch_size):
            idx = rank_slice(order[start:start + self.batch_size], self.rank, self.world)
            yield [_Key(int(i), draw_seed(self.seed, self.epoch, int(i)) if self.train else 0, self.train)
                   for i in idx.tolist()]


_live: Optional["weakref.ref[FileSplit]"] = None  # the split whose loader workers are running


def default_workers() -> int:
    """The machine's cores, at most 8 (beyond that decoding rarely limits a single GPU)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


@dataclass
class FileSplit:
    """One split of a dataset on disk. `skipped` collects the unreadable files left out (on_corrupt: skip)."""

    root: str
    paths: Paths
    labels: torch.Tensor  # int64
    eval_transform: EvalTransform
    train_transform: Optional[TrainTransform] = None
    workers: int = 0
    on_corrupt: str = "fail"
    timeout: float = 600.0
    skipped: dict = field(default_factory=dict)  # path -> error
    _loaders: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray) -> "FileSplit":
        idx = np.asarray(idx, dtype=np.int64)
        return FileSplit(self.root, self.paths.take(idx), self.labels[torch.from_numpy(idx)], self.eval_transform,
                         self.train_transform, self.workers, self.on_corrupt, self.timeout, self.skipped)

    def _loader(self, batch_size: int, rank: int, world: int, pin: bool) -> tuple[Any, _Sampler]:
        global _live
        key = (batch_size, rank, world, pin)
        holder = _live() if _live is not None else None
        if holder is not None and holder is not self:
            holder.close()  # one split's workers alive at a time: memory stays at one set of workers
        _live = weakref.ref(self)
        if key not in self._loaders:
            self._loaders.clear()  # its workers persist across the epochs of one use (training, evaluation)
            sampler = _Sampler(len(self), batch_size, rank, world)
            dataset = _Decoded(self.root, self.paths, self.labels.numpy(), self.eval_transform, self.train_transform)
            w = min(self.workers, len(sampler)) if len(self) else 0
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=w, collate_fn=_collate, pin_memory=pin,
                persistent_workers=w > 0, prefetch_factor=2 if w > 0 else None,
                timeout=self.timeout if w > 0 else 0, worker_init_fn=_worker_init if w > 0 else None,
                multiprocessing_context=worker_context() if w > 0 else None)
            self._loaders[key] = (loader, sampler)
        return self._loaders[key]

    def close(self) -> None:
        """Stop this split's loader workers (they also stop when the split is garbage-collected)."""
        self._loaders.clear()

    def batches(self, spec: InputSpec, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                augment: tuple[str, ...] = (), device: Any = None, rank: int = 0,
                world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_batching(batch_size, augment, TRAIN_AUGMENTATIONS)
        train = bool(augment)
        if train and (self.train_transform is None or tuple(augment) != self.train_transform.augment):
            base = self.train_transform or TrainTransform(self.eval_transform, ())
            self.train_transform = TrainTransform(self.eval_transform, tuple(augment), base.scale, base.ratio,
                                                  base.color_jitter)
            self._loaders.clear()
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return self._iterate(spec, dev, (batch_size, rank, world, dev.type == "cuda"), (shuffle, seed, epoch, train))

    def _iterate(self, spec: InputSpec, dev: torch.device, key: tuple,
                 plan: tuple) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader, sampler = self._loader(*key)  # when iteration starts, so two pending calls cannot mix their plans
        sampler.shuffle, sampler.seed, sampler.epoch, sampler.train = plan
        it = iter(loader)
        while True:
            try:
                x, y, bad = next(it)
            except StopIteration:
                return
            except RuntimeError as exc:
                if "DataLoader worker" in str(exc) or "DataLoader timed out" in str(exc):
                    self._loaders.clear()
                    raise DataError(f"a data loader worker failed: {str(exc).splitlines()[0]} (run with "
                                    f"data.workers: 0 to see the failure in the main process)") from None
                raise
            for path, error in bad:
                if self.on_corrupt == "fail":
                    self._loaders.clear()
                    raise DataError(f"cannot read image {path}: {error}; fix or remove the file, or set "
                                    f"data.on_corrupt: skip to leave unreadable files out (counted in the report)")
                self.skipped[path] = error
            if x is None:
                continue
            if dev.type != "cpu":
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            yield spec.normalize(x), y


def check_stream_memory(image_size: int, channels: int, batch_size: int, workers: int) -> None:
    """Refuse settings whose batches alone would exhaust memory, before any worker starts: each worker keeps
    two uint8 batches ready, and the main process holds a float32 batch and its normalised copy."""
    from rescompress.data.base import _gib, available_memory

    pixels = batch_size * channels * image_size * image_size
    need = pixels * 2 * max(1, workers) + pixels * 4 * 3
    free = available_memory()
    if need > 0.5 * free:
        raise DataError(f"a batch of {batch_size} images at {image_size}x{image_size} with {workers} loader "
                        f"worker(s) needs about {_gib(need)} before the model's own memory, but only "
                        f"{_gib(free)} is available; lower data.image_size, train.batch_size / "
                        f"train.eval_batch_size or data.workers")


THREADED_RUNTIMES = ("jax", "tensorflow")  # imported by the TFLite converters; their threads do not survive fork


def worker_context() -> Any:
    """How loader workers start: forked (the fast default), or from a fork server once a runtime that keeps
    threads of its own is loaded in this process (a forked child of a process with JAX's or TensorFlow's
    threads can deadlock; the fork server is a fresh process that imports only this module)."""
    import multiprocessing
    import sys

    if not any(name in sys.modules for name in THREADED_RUNTIMES):
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is Pillow's; torch threads in every worker would only contend


def streaming_stats(split: FileSplit, sample: int, seed: int) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and std (of pixels scaled to [0, 1]) over at most `sample` training images, decoded
    with the evaluation transform and summed batch by batch; returns (mean, std, images used)."""
    n = min(sample, len(split))
    pick = np.sort(np.random.default_rng(draw_seed(seed, 7)).permutation(len(split))[:n])
    sub = split.subset(pick)
    c = split.eval_transform.channels
    ident = InputSpec(channels=c, height=1, width=1, mean=(0.0,) * c, std=(1.0,) * c)
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    count = 0
    for x, _ in sub.batches(ident, 64):
        x = x.to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    sub.close()
    if count == 0:
        raise DataError("no readable training image to compute normalisation statistics from")
    return (*stats_from_sums(total, squares, count), n)
