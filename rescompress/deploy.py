"""Load an exported artifact or a bundle and classify images with it: `rescompress.load(path)`.

`load` takes a bundle directory (`runs/<run>/bundles/<artifact>`, see `rescompress.bundle`), or one model
file: an .onnx, .tflite, .engine/.plan, or a run's torch checkpoint (.pt, .pt2). A bare file needs its
preprocessing from somewhere: a `preprocess.json` beside it (a file inside a bundle), or the report.json of
the run directory it was written into (`runs/<run>/artifacts/` or `runs/<run>/checkpoints/`), or, for a
rescompress checkpoint, the input spec stored inside it. Without any of these it is refused.

The returned `Predictor` runs the model on the runtime its file is for (onnxruntime, LiteRT, TensorRT, torch)
through the runners the pipeline measures with. Images become model input exactly as the run's evaluation
transform turns an image file into pixels (`rescompress.data.transforms.EvalTransform`): shorter side resized
to `resize` then the center crop, or the whole image resized, with the named PIL interpolation, RGB or
luminance, /255, then (x - mean) / std.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from rescompress.errors import BackendMissingError, DataError, RescompressError

BUNDLE_SCHEMA_VERSION = 1  # the newest preprocess.json this rescompress reads
PREPROCESS = "preprocess.json"
LABELS = "labels.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # what `rescompress predict FOLDER` picks up
RUNTIMES = {".onnx": "onnxruntime", ".tflite": "litert", ".engine": "tensorrt", ".plan": "tensorrt",
            ".pt": "torch", ".pth": "torch", ".pt2": "torch"}
TARGET_RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert", "tensorrt": "tensorrt", "torch": "torch"}
INSTALL = {
    "onnxruntime": "onnxruntime is a core dependency of rescompress: pip install 'rescompress' (or "
                   "pip install onnxruntime) to put it back",
    "litert": "pip install 'rescompress[tflite]'",
    "tensorrt": "TensorRT runs on a host with an NVIDIA GPU and CUDA: pip install 'rescompress[tensorrt]' there",
    "torch": "torch is a core dependency of rescompress: pip install 'rescompress'",
}

Image = Any  # a path (str or os.PathLike), a PIL image, or a numpy array; see `Predictor.__call__`


class BundleError(RescompressError):
    """An artifact or bundle cannot be loaded: missing, unreadable, newer than this rescompress, or without
    the preprocessing it needs."""


# ---------------------------------------------------------------- preprocessing


def preprocess_from_spec(spec: Any) -> dict[str, Any]:
    """The image-to-input steps of an `InputSpec` (or its dict), as preprocess.json holds them."""
    d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    channels = int(d["channels"])
    return {
        "color": "RGB" if channels == 3 else "L",
        "channels": channels,
        "resize": int(d["resize"]) if d.get("resize") is not None else None,
        "crop": {"height": int(d["height"]), "width": int(d["width"])},
        "interpolation": str(d.get("interpolation") or "bilinear"),
        "scale": {"divide_by": 255.0},
        "mean": [float(m) for m in d["mean"]],
        "std": [float(s) for s in d["std"]],
        "layout": str(d.get("layout") or "NCHW"),
        "transform": d.get("transform") or "",
    }


@dataclass(frozen=True)
class Preprocessing:
    """How one image becomes one model input (C, H, W) float32, as the run's evaluation transform does it."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Optional[int] = None
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, pre: dict) -> "Preprocessing":
        try:
            crop = pre["crop"]
            out = cls(channels=int(pre["channels"]), height=int(crop["height"]), width=int(crop["width"]),
                      mean=tuple(float(m) for m in pre["mean"]), std=tuple(float(s) for s in pre["std"]),
                      resize=int(pre["resize"]) if pre.get("resize") is not None else None,
                      interpolation=str(pre.get("interpolation", "bilinear")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the preprocessing is incomplete ({type(exc).__name__}: {exc}); expected channels, "
                              f"crop.height, crop.width, mean, std, resize, interpolation") from None
        if out.channels not in (1, 3):
            raise BundleError(f"images can be read as RGB (3 channels) or luminance (1), not {out.channels} channels")
        return out

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    def _size_for(self, w: int, h: int) -> tuple[int, int]:
        """The size the full frame is resized to before the center crop (as `EvalTransform._resized`)."""
        scale = self.resize / min(w, h)
        return max(self.width, round(w * scale)), max(self.height, round(h * scale))

    def _want(self, w: int, h: int) -> tuple[int, int]:
        return (self.width, self.height) if self.resize is None else self._size_for(w, h)

    def pixels(self, image: Any) -> np.ndarray:
        """uint8 (C, H, W) pixels of a path, a PIL image or a uint8 (H, W[, C]) array, resized and cropped."""
        from PIL import Image as PILImage

        from rescompress.data.transforms import _decode, _resample

        if isinstance(image, (str, os.PathLike)):
            img = _read_image(Path(image), self.mode, self._want)
        elif isinstance(image, PILImage.Image):
            img = image.convert(self.mode)
        elif isinstance(image, np.ndarray):
            img = _array_image(image).convert(self.mode)
        else:
            raise DataError(f"cannot read an image from a {type(image).__name__}: give a file path, a PIL image "
                            f"or a numpy array")
        resample = _resample(self.interpolation)
        if self.resize is None:
            img = img.resize((self.width, self.height), resample)
        else:
            nw, nh = self._size_for(*img.size)
            img = img.resize((nw, nh), resample)
            left, top = (nw - self.width) // 2, (nh - self.height) // 2
            img = img.crop((left, top, left + self.width, top + self.height))
        pixels = np.array(img, dtype=np.uint8)
        return pixels[None] if self.channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std, as `InputSpec.normalize_numpy`."""
        x = pixels.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32, copy=False)

    def batch(self, images: Any) -> np.ndarray:
        """A float32 NCHW batch from one image or a list of them (see `Predictor.__call__` for the forms)."""
        if isinstance(images, np.ndarray):
            if images.dtype.kind == "f":
                return self._preprocessed(images)
            if images.dtype != np.uint8:
                raise DataError(f"an image array must be uint8 pixels (H, W[, C]) or (N, H, W, C), or a float "
                                f"NCHW batch already normalised; got {images.dtype} {images.shape}")
            if images.ndim == 4:
                images = list(images)
            else:
                images = [images]
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise DataError("no images given")
        return self.normalize(np.stack([self.pixels(im) for im in images]))

    def _preprocessed(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:
            x = x[None]
        want = (self.channels, self.height, self.width)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise DataError(f"a float array is taken as an already preprocessed NCHW batch of shape (N, "
                            f"{', '.join(map(str, want))}); got {x.shape}. Pass uint8 pixels (H, W, C) to have "
                            f"them resized and normalised")
        return np.ascontiguousarray(x, dtype=np.float32)


def _read_image(path: Path, mode: str, want: Callable[[int, int], tuple[int, int]]) -> Any:
    from PIL import UnidentifiedImageError

    from rescompress.data.transforms import _decode

    if not path.exists():
        raise DataError(f"image {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give an image file (rescompress predict takes a folder)")
    try:
        img, _, _ = _decode(str(path), mode, want)
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image file Pillow can read (expected one of "
                        f"{', '.join(IMAGE_SUFFIXES)})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise DataError(f"{path} cannot be decoded as an image ({type(exc).__name__}: {exc})") from None
    return img


def _array_image(a: np.ndarray) -> Any:
    from PIL import Image as PILImage

    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)):
        return PILImage.fromarray(np.ascontiguousarray(a))
    raise DataError(f"a uint8 image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- the predictor


@dataclass
class Predictor:
    """A model file on its runtime, with the preprocessing and class names it was trained with.

    `predictor(images)` returns float32 logits (N, classes). `images` is one of:
    - a file path (str or os.PathLike), a PIL image, or a list of them;
    - a uint8 numpy array of pixels: one image (H, W), (H, W, C), or a batch (N, H, W, C); these are resized,
      cropped and normalised like an image file;
    - a float numpy array: a batch already preprocessed, NCHW (N, C, H, W) or one image (C, H, W), normalised
      with `preprocess["mean"]` and `["std"]`; it goes to the model as is (NHWC and int8 models included: the
      runner transposes and quantizes).

    `predict(images, top=5)` returns, per image, the `top` (label, probability) pairs, best first.
    """

    path: Path
    runtime: str  # onnxruntime, litert, tensorrt, torch
    labels: list[str]
    preprocess: dict  # preprocess.json's content (for a bare file: built from its run's report)
    source: str  # where the preprocessing came from
    _run: Callable[[np.ndarray], np.ndarray] = field(repr=False, default=None)
    _steps: Preprocessing = field(repr=False, default=None)

    def __post_init__(self) -> None:
        self._steps = Preprocessing.from_dict(self.preprocess)

    def inputs(self, images: Any) -> np.ndarray:
        """The float32 NCHW batch `images` become."""
        return self._steps.batch(images)

    def __call__(self, images: Any) -> np.ndarray:
        return np.asarray(self._run(self.inputs(images)), dtype=np.float32)

    def predict(self, images: Any, top: int = 5) -> list[list[tuple[str, float]]]:
        if top < 1:
            raise DataError(f"top must be at least 1, got {top}")
        probs = softmax(self(images))
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:top]
            out.append([(self.label(int(i)), float(row[i])) for i in order])
        return out

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)


def load(path: Union[str, os.PathLike], *, threads: Optional[int] = None) -> Predictor:
    """A `Predictor` for a bundle directory or a model file (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path} does not exist; give a bundle directory (runs/<run>/bundles/<artifact>) or an "
                          f"artifact file (.onnx, .tflite, .engine, .pt, .pt2)")
    if path.is_dir():
        return _load_bundle(path, threads)
    if path.suffix.lower() not in RUNTIMES:
        raise BundleError(f"{path.name} is not a model file rescompress runs (known: "
                          f"{', '.join(sorted(RUNTIMES))}) and not a bundle directory")
    if (path.parent / PREPROCESS).is_file():
        pre, labels = read_bundle(path.parent)
        return _predictor(path, pre, labels, f"{path.parent / PREPROCESS}", threads)
    found = _from_run_dir(path)
    if found is None and RUNTIMES[path.suffix.lower()] == "torch":
        found = _from_checkpoint(path)
    if found is None:
        raise BundleError(f"no preprocessing found for {path}: it is not in a bundle (no {PREPROCESS} beside it) "
                          f"and no report.json of a run lists it. Load its bundle (runs/<run>/bundles/<artifact>), "
                          f"or keep the file in its run directory's artifacts/ folder")
    pre, labels, source = found
    return _predictor(path, pre, labels, source, threads)


def read_bundle(bundle: Path) -> tuple[dict, list[str]]:
    """preprocess.json and labels.txt of a bundle directory, checked."""
    pre_path = bundle / PREPROCESS
    if not pre_path.is_file():
        raise BundleError(f"{bundle} is not a bundle: it has no {PREPROCESS}")
    try:
        pre = json.loads(pre_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{pre_path} is not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(pre, dict):
        raise BundleError(f"{pre_path} must hold a JSON object")
    version = pre.get("bundle_schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{pre_path} has no integer bundle_schema_version; it was not written by rescompress")
    if version > BUNDLE_SCHEMA_VERSION:
        import rescompress

        raise BundleError(f"{bundle} was written by a newer rescompress (bundle_schema_version {version}; "
                          f"rescompress {rescompress.__version__} reads up to {BUNDLE_SCHEMA_VERSION}); upgrade: "
                          f"pip install -U rescompress")
    labels_path = bundle / LABELS
    labels = (labels_path.read_text(encoding="utf-8").splitlines() if labels_path.is_file()
              else [str(i) for i in range(int(pre.get("num_classes") or 0))])
    return pre, labels


def _load_bundle(bundle: Path, threads: Optional[int]) -> Predictor:
    pre, labels = read_bundle(bundle)
    model = bundle / str(pre.get("artifact") or "")
    if pre.get("runtime") == "tensorrt" and pre.get("engine"):
        engine = bundle / pre["engine"]
        if not engine.is_file():
            command = pre.get("build_command") or "the trtexec command in model_card.md"
            raise BundleError(f"{bundle} holds the TensorRT-ready ONNX but no engine yet: build it on the device, "
                              f"in the bundle folder, with `{command}`; or load {model.name} to run the ONNX in "
                              f"onnxruntime")
        model = engine
    if not pre.get("artifact") or not model.is_file():
        raise BundleError(f"{bundle} is missing its model file {model.name!r} (named in {PREPROCESS})")
    return _predictor(model, pre, labels, str(bundle / PREPROCESS), threads)


def _from_run_dir(path: Path) -> Optional[tuple[dict, list[str], str]]:
    """The artifact row of the report.json that lists `path` (in the folder above or the one above that)."""
    target = path.resolve()
    for run_dir in (path.parent, path.parent.parent):
        report_path = run_dir / "report.json"
        if not report_path.is_file():
            continue
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        for row in report.get("artifacts") or []:
            if row.get("path") and (run_dir / row["path"]).resolve() == target and row.get("input_spec"):
                pre = {**preprocess_from_spec(row["input_spec"]), **_runner_options(row)}
                return pre, class_names(report), f"{report_path} (artifact {row.get('name')})"
    return None


def _from_checkpoint(path: Path) -> Optional[tuple[dict, list[str], str]]:
    meta = _checkpoint_meta(path)
    spec = meta.get("input_spec")
    if not spec:
        return None
    classes = int((meta.get("arch") or {}).get("num_classes") or 0)
    return preprocess_from_spec(spec), [str(i) for i in range(classes)], f"the input spec stored in {path.name}"


def _checkpoint_meta(path: Path) -> dict:
    from rescompress.rundir import CHECKPOINT_FORMAT

    try:
        if path.suffix.lower() == ".pt2":
            from rescompress.compress.pt2e import load_quantized

            meta = load_quantized(path)[1]
        else:
            import torch

            meta = torch.load(path, map_location="cpu", weights_only=True)
    except RescompressError:
        raise
    except Exception as exc:  # torch raises many types on a file that is not a checkpoint
        raise BundleError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise BundleError(f"{path} is not a checkpoint written by a rescompress run (no {CHECKPOINT_FORMAT!r} "
                          f"format field)")
    return meta


def class_names(report: dict) -> list[str]:
    """The dataset's class names from a report, or "0".."n-1" where it does not list them."""
    dataset = report.get("dataset") or {}
    names = dataset.get("class_names")
    if names:
        return [str(n) for n in names]
    return [str(i) for i in range(int(dataset.get("num_classes") or 0))]


def _runner_options(row: dict) -> dict:
    """How the pipeline ran an artifact: an int8 ONNX in another runtime's layout runs unfused in
    onnxruntime (rescompress.export.onnx `_reload`), as its top-1 was measured."""
    details = row.get("details") or {}
    out: dict[str, Any] = {"target": row.get("target"), "name": row.get("name")}
    if row.get("target") in ("onnx", "tensorrt") and details.get("scheme") not in (None, "onnxruntime"):
        out["graph_optimization"] = "disabled"
    return out


def _predictor(model: Path, pre: dict, labels: list[str], source: str, threads: Optional[int]) -> Predictor:
    runtime = RUNTIMES[model.suffix.lower()]
    run = _runner(model, runtime, pre, threads)
    return Predictor(path=model, runtime=runtime, labels=labels, preprocess=pre, source=source, _run=run)


def _require(runtime: str, module: str, what: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:
        raise BackendMissingError(f"{what} needs {module}, which cannot be imported here ({type(exc).__name__}: "
                                  f"{exc}); {INSTALL[runtime]}") from None


def _runner(model: Path, runtime: str, pre: dict, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    what = f"running {model.name}"
    if runtime == "onnxruntime":
        _require(runtime, "onnxruntime", what)
        from rescompress.export.onnx import ort_runner

        try:
            return ort_runner(model, threads, optimize=pre.get("graph_optimization") != "disabled")
        except Exception as exc:  # onnxruntime raises its own exception types on an unreadable model
            raise BundleError(f"onnxruntime cannot load {model} ({type(exc).__name__}: {exc})") from None
    if runtime == "litert":
        _require(runtime, "ai_edge_litert.interpreter", what)
        from rescompress.export.tflite import tflite_runner

        try:
            return tflite_runner(model, threads, nhwc=str(pre.get("layout", "NCHW")).upper() == "NHWC")
        except (ValueError, RuntimeError) as exc:  # the interpreter refuses a file that is not a model
            raise BundleError(f"LiteRT cannot load {model} ({type(exc).__name__}: {exc})") from None
    if runtime == "tensorrt":
        _require(runtime, "tensorrt", what)
        import torch

        if not torch.cuda.is_available():
            raise BackendMissingError(f"{what} needs an NVIDIA GPU that torch can use (torch.cuda.is_available() "
                                      f"is False); {INSTALL['tensorrt']}")
        from rescompress.export.tensorrt import engine_runner

        try:
            return engine_runner(model, threads)
        except RuntimeError as exc:
            raise BundleError(str(exc)) from None
    return _torch_runner(model, pre, threads)


def _torch_runner(model_path: Path, pre: dict, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    from rescompress.data import InputSpec
    from rescompress.export.torch_eager import torch_artifact
    from rescompress.rundir import load_checkpoint

    meta = _checkpoint_meta(model_path)
    arch = meta.get("arch")
    if not arch:
        raise BundleError(f"{model_path} does not record its architecture; it cannot be rebuilt")
    model = load_checkpoint(model_path, None, arch)
    steps = Preprocessing.from_dict(pre)
    spec = InputSpec(channels=steps.channels, height=steps.height, width=steps.width, mean=steps.mean,
                     std=steps.std, resize=steps.resize, interpolation=steps.interpolation)
    art = torch_artifact(model, spec, name=model_path.stem, precision="", from_stage="", checkpoint=model_path)
    return art.runner(threads)


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (not in its subfolders), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def predict_paths(predictor: Predictor, paths: Sequence[Path], top: int) -> list[dict]:
    """Per image file: its path and the top (index, label, score) rows."""
    out = []
    for path in paths:
        probs = softmax(predictor(path))[0]
        order = np.argsort(-probs, kind="stable")[:top]
        out.append({"image": str(path),
                    "top": [{"index": int(i), "label": predictor.label(int(i)), "score": float(probs[i])}
                            for i in order]})
    return out
