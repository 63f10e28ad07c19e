import importlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def need(module, install):
    """Import `module`, or stop with the pip line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        sys.exit(f"this example needs {module} ({exc}): {install}")


def read_config():
    pre = json.loads((HERE / "preprocess.json").read_text(encoding="utf-8"))
    labels = (HERE / "labels.txt").read_text(encoding="utf-8").splitlines()
    return pre, labels


def load_image(path, pre):
    """One image file as a (C, H, W) uint8 array: luminance ("L") or RGB; with `resize` set, the shorter
    side resized to it and the center crop taken, else the whole image resized to the crop size."""
    mode, crop = pre["color"], pre["crop"]
    width, height = crop["width"], crop["height"]
    resample = getattr(Image.Resampling, pre["interpolation"].upper())

    def resized(w, h):
        scale = pre["resize"] / min(w, h)
        return max(width, round(w * scale)), max(height, round(h * scale))

    with Image.open(path) as img:
        w, h = img.size
        if img.format == "JPEG":  # decode at a reduced scale, never below what the resize needs
            img.draft(mode, (width, height) if pre["resize"] is None else resized(w, h))
        img = img.convert(mode)
        img.load()
    if pre["resize"] is None:
        img = img.resize((width, height), resample)
    else:
        nw, nh = resized(*img.size)
        img = img.resize((nw, nh), resample)
        left, top = (nw - width) // 2, (nh - height) // 2
        img = img.crop((left, top, left + width, top + height))
    pixels = np.array(img, dtype=np.uint8)
    return pixels[None] if mode == "L" else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def model_input(path, pre):
    """A batch of one image as the model file takes it: pixels / 255, (x - mean) / std, in its layout, and
    quantized with the input's scale and zero point when the input is an integer tensor."""
    pixels = load_image(path, pre)[None]
    x = pixels.astype(np.float32) / np.float32(pre["scale"]["divide_by"])
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = ((x - mean) / std).astype(np.float32)
    if pre["layout"] == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    dtype = np.dtype(pre["input"]["dtype"])
    q = pre["input"].get("quantization")
    if q:
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / q["scale"] + q["zero_point"]), info.min, info.max)
    return np.ascontiguousarray(x, dtype=dtype)


def logits_of(y, pre):
    """The model's output as float logits (dequantized when the output is an integer tensor)."""
    q = pre["output"].get("quantization")
    if q:
        return (y.astype(np.float32) - q["zero_point"]) * q["scale"]
    return y.astype(np.float32)


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python {Path(__file__).name} IMAGE [IMAGE ...]  (prints the top-5 classes of each)")
        return 0 if argv else 2
    pre, labels = read_config()
    run = open_model(pre)
    for path in argv:
        logits = logits_of(run(model_input(path, pre)), pre)[0]
        z = np.exp(logits.astype(np.float64) - logits.max())
        probs = z / z.sum()
        print(path)
        for i in np.argsort(-probs, kind="stable")[:5]:
            name = labels[i] if i < len(labels) else str(i)
            print(f"  {name}\t{probs[i]:.4f}")
    return 0
