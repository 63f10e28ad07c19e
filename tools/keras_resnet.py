"""A hand-written Keras functional ResNet, as the Keras ResNet tutorials write one, trained in Keras on digits.

Conv2D → BatchNormalization → Activation pairs joined by Add, a stride-2 'same' convolution in each
downsampling block (TensorFlow pads those asymmetrically), a Rescaling layer at the input, global average
pooling, Dropout and a softmax Dense. It is what `rescompress import` and `model.weights: FILE.keras` are
checked against.

    python tools/keras_resnet.py --out digits_resnet.keras --epochs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def build(size: int = 32, channels: int = 1, classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
          name: str = "tutorial_resnet"):
    import keras
    from keras import layers

    def block(x, filters: int, stride: int, tag: str):
        shortcut = x
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{tag}_conv1")(x)
        y = layers.BatchNormalization(momentum=0.9, name=f"{tag}_bn1")(y)
        y = layers.Activation("relu", name=f"{tag}_relu1")(y)
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{tag}_conv2")(y)
        y = layers.BatchNormalization(momentum=0.9, name=f"{tag}_bn2")(y)
        if stride != 1 or x.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{tag}_proj")(x)
            shortcut = layers.BatchNormalization(momentum=0.9, name=f"{tag}_proj_bn")(shortcut)
        y = layers.Add(name=f"{tag}_add")([y, shortcut])
        return layers.Activation("relu", name=f"{tag}_out")(y)

    inputs = keras.Input((size, size, channels), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for i, filters in enumerate(widths):
        x = block(x, filters, 1 if i == 0 else 2, f"stage{i + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(0.1, name="dropout")(x)
    outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def digits_pixels(size: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """rescompress's own digits splits (same seed, same split as a recipe with `seed: 0`), as NHWC pixels in
    0..255 — what the Keras model takes."""
    from rescompress.data import batches, load_dataset

    bundle = load_dataset("digits", image_size=size, channels=1, seed=seed, normalize={"mean": [0.0], "std": [1.0]})
    out = {}
    for key in ("train", "val", "test"):
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in batches(getattr(bundle, key), bundle.input_spec, 512)])
        out[key] = (np.concatenate(xs).transpose(0, 2, 3, 1) * 255.0, np.concatenate(ys))
    return out


def train_on_digits(model, epochs: int, seed: int = 0, size: int = 32) -> dict[str, float]:
    """Train `model` in Keras on digits; returns its Keras test and validation top-1."""
    import keras

    keras.utils.set_random_seed(seed)
    data = digits_pixels(size, seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = data["train"]
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    top1 = {}
    for key in ("test", "val"):
        xk, yk = data[key]
        top1[key] = float((model.predict(xk, verbose=0).argmax(1) == yk).mean())
    return top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the .keras file to write")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = build(size=args.size)
    top1 = train_on_digits(model, args.epochs, args.seed, args.size)
    model.save(args.out)
    print(f"wrote {args.out}: Keras top-1 test {top1['test'] * 100:.2f} %, val {top1['val'] * 100:.2f} % "
          f"after {args.epochs} epochs")


if __name__ == "__main__":
    main()
