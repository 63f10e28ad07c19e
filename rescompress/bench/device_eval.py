"""Accuracy measured on the device itself (`top1_source: device`).

The validation and test images (all of them, or a stratified subset of each, `report.device_eval_images`)
are packed once per artifact into one array file in exactly the form the artifact's input takes: the input
spec's preprocessing, the artifact's layout (NCHW, or NHWC for a channels-last TFLite model), and, where the
model's input is int8, quantized with the model's own input scale and zero point. The device runs that file
through the artifact and sends back the logits; top-1, and agreement with the host's predictions on the same
images, are computed here.

Failures are statuses, as for latency ("unreachable", "runtime-missing", "out-of-memory", "timeout",
"failed", ...), never exceptions: the rest of the report is still written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class EvalOutcome:
    """What a device evaluation gave: a status, a message saying what to do about a failure, the logits
    (N, classes) float32 (dequantized) of the packed images in order when it worked, how they were computed
    on the device, and the facts the device reported about itself."""
    status: str
    message: str = ""
    logits: Optional[np.ndarray] = None
    method: str = ""
    device_facts: dict = field(default_factory=dict)


def stratified_subset(labels: np.ndarray, n: Optional[int], seed: int = 0) -> np.ndarray:
    """Sorted indices of about `n` images of `labels`, each class in proportion to its share (largest
    remainder, at least one per class where n allows); every index when `n` is None or not below the split."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked)) if picked else np.arange(0)


@dataclass
class EvalSet:
    """The images every device evaluates: the chosen validation images, then the chosen test images, as one
    float32 NCHW array file (normalised with the input spec), with their labels."""
    path: Path  # the .npy file
    labels: np.ndarray  # int64, in file order
    parts: dict[str, slice]  # "val_top1" / "top1" -> their rows of the file
    indices: dict[str, np.ndarray]  # the rows' indices into each whole split
    sizes: dict[str, int]  # each whole split's size

    @property
    def subset(self) -> bool:
        """Whether some split is sent only in part."""
        return any(len(self.indices[k]) < self.sizes[k] for k in self.parts)

    def describe(self) -> str:
        names = {"val_top1": "validation", "top1": "test"}
        return ", ".join(f"{len(self.indices[k])} of {self.sizes[k]} {names[k]} images" for k in self.parts)


def build_eval_set(splits: dict, spec, images: Optional[int], out_dir: Path, seed: int = 0,
                   batch_size: int = 64) -> EvalSet:
    """Write the images of `splits` ({"val_top1": split, "top1": split}) that devices evaluate into
    `out_dir/images.npy`: every image, or a stratified subset of `images` per split. Written batch by batch into
    a memory-mapped file, so memory stays O(batch) whatever the image size."""
    from rescompress.data import batches

    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = {k: stratified_subset(split.labels.numpy(), images, seed) for k, split in splits.items()}
    total = sum(len(i) for i in chosen.values())
    path = out_dir / "images.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, *spec_chw(spec)))
    labels, parts, row = np.empty(total, dtype=np.int64), {}, 0
    for key, split in splits.items():
        start = row
        for x, y in batches(split.subset(chosen[key]), spec, batch_size):
            mm[row:row + len(x)] = x.numpy()
            labels[row:row + len(x)] = y.numpy()
            row += len(x)
        parts[key] = slice(start, row)
    mm.flush()
    del mm
    np.save(out_dir / "labels.npy", labels)
    return EvalSet(path, labels, parts, chosen, {k: len(s) for k, s in splits.items()})


def spec_chw(spec) -> tuple[int, int, int]:
    return (spec.channels, spec.height, spec.width)


def pack_for(art, eval_set: EvalSet, out_dir: Path, batch_size: int = 256) -> Path:
    """The eval images in exactly the form `art`'s input takes on the device: float32 NCHW for ONNX and
    TensorRT (their inputs are float); for TFLite the model's own layout and dtype, an int8/uint8 input quantized
    with the model's own input scale and zero point (as the LiteRT runner here quantizes it)."""
    if art.target != "tflite":
        return eval_set.path
    from rescompress.export.tflite import litert_interpreter

    detail = litert_interpreter(art.path).get_input_details()[0]
    dtype = np.dtype(detail["dtype"])
    nhwc = art.details.get("layout") == "nhwc"
    scale, zero_point = detail["quantization"]
    src = np.load(eval_set.path, mmap_mode="r")
    shape = (len(src), *(src.shape[2:] + src.shape[1:2] if nhwc else src.shape[1:]))
    path = out_dir / f"images_{art.name}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    for i in range(0, len(src), batch_size):
        x = np.asarray(src[i:i + batch_size])
        if nhwc:
            x = x.transpose(0, 2, 3, 1)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
        out[i:i + batch_size] = x.astype(dtype)
    out.flush()
    del out
    return path


def score(logits: np.ndarray, eval_set: EvalSet, host_logits: dict[str, np.ndarray]) -> dict:
    """Per split: the device's top-1 on the images sent, the host's top-1 on the same images, the difference in
    points, and how often their predictions agree. `host_logits` holds the host's logits of each whole split."""
    if logits.ndim != 2 or len(logits) != len(eval_set.labels):
        raise ValueError(f"the device returned logits of shape {logits.shape} for {len(eval_set.labels)} images")
    out = {}
    for key, rows in eval_set.parts.items():
        device_pred = logits[rows].argmax(1)
        labels = eval_set.labels[rows]
        entry = {"images": int(len(labels)), "of": eval_set.sizes[key],
                 "device_top1": float((device_pred == labels).mean()) if len(labels) else None}
        host = host_logits.get(key)
        if host is not None and len(labels):
            host_pred = host[eval_set.indices[key]].argmax(1)
            entry["host_top1"] = float((host_pred == labels).mean())
            entry["agreement"] = float((host_pred == device_pred).mean())
            entry["delta_pt"] = round((entry["device_top1"] - entry["host_top1"]) * 100, 3)
        out[key] = entry
    return out
