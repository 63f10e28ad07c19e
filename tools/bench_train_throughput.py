#!/usr/bin/env python
"""Training throughput: images/s of rescompress's `train.fit` loop against a plain PyTorch training loop.

    .venv/bin/python tools/bench_train_throughput.py --model resnet18 --size 224 --device cpu --threads 2
    .venv/bin/python tools/bench_train_throughput.py --dataset fashion_mnist --device cpu   # ResNet-20 at 32²
    .venv/bin/python tools/bench_train_throughput.py --model resnet50 --size 224 --device cuda --precision bf16 --channels-last

Both loops train the same model (two copies of the same initial weights) on the same device, with the same
batch size, threads, optimizer (SGD, momentum 0.9, Nesterov, weight decay 5e-4, constant learning rate),
precision (autocast; fp16 with a GradScaler) and memory format (channels_last on CUDA only, as in fit), on
the same images.

- rescompress: one `fit` call over `warmup + rounds` epochs, each epoch `--steps` batches: what a recipe's
  training step runs per epoch (batches from `rescompress.data.batches` normalised on the device, the
  learning rate set per step, the loss and top-1 read every few steps on CUDA, progress bar, epoch line).
  Its one-off setup (moving the model to the device and back, building the optimizer) is reported apart.
- plain: the loop a practitioner writes by hand: model and optimizer built once on the device, forward,
  cross-entropy, backward, step, no reads until the round ends. With `--plain-data batches` (default) it
  draws its batches from the same `rescompress.data.batches` call as fit (so the ratio is the training
  loop's own cost); with `prebuilt` from normalised tensors prepared on the device beforehand (so the
  ratio also charges rescompress for its data path).

Rounds interleave: the plain loop runs inside fit's epoch hook, in the order P O O P P O O P ..., so each
loop's rounds are preceded by the other's alike and machine noise falls on both. Per-round images/s give
the median and p90 (90th percentile of per-round images/s) of each loop and the ratio of medians. Warm-up
rounds (cudnn's algorithm search, allocator growth) are dropped. Writes JSON with --out.

Data: `--dataset random` (default) is random uint8 images at --size (training speed does not depend on
pixel values; there is no ImageNet on these machines) and is labelled so in the JSON; `fashion_mnist`
reads the real Fashion-MNIST IDX files (install them with `make fashion-mnist`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

FASHION_HINT = ("Fashion-MNIST is not installed here: run `make fashion-mnist` (Debian package "
                "dataset-fashion-mnist, files under /usr/share/datasets/fashion-mnist)")


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="registry model; default resnet18 (random) or resnet20 (fashion_mnist)")
    ap.add_argument("--size", type=int, default=None, help="image side; default 224 (random) or 32 (fashion_mnist)")
    ap.add_argument("--dataset", choices=("random", "fashion_mnist"), default="random")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 32 on the CPU")
    ap.add_argument("--steps", type=int, default=None, help="batches per round; default 16 on CUDA, 6 on the CPU")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds per loop (an even count balances the order)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds per loop dropped before timing")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--plain-data", choices=("batches", "prebuilt"), default="batches")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--min-ratio", type=float, default=None,
                    help="exit 1 when rescompress's median is below this fraction of the plain loop's")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = ap.parse_args(argv)
    fashion = args.dataset == "fashion_mnist"
    args.model = args.model or ("resnet20" if fashion else "resnet18")
    args.size = args.size or (32 if fashion else 224)
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be at least 1 and --warmup at least 0")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_data(args: argparse.Namespace, n: int):
    """(DatasetBundle with exactly `n` training images and no validation split, what the images are)."""
    from rescompress.data import DatasetBundle, InputSpec, Split, load_dataset

    empty = lambda c: Split(torch.zeros(0, c, args.size, args.size, dtype=torch.uint8),  # noqa: E731
                            torch.zeros(0, dtype=torch.int64))
    if args.dataset == "fashion_mnist":
        from rescompress.errors import DataError

        try:
            full = load_dataset("fashion_mnist", image_size=args.size, val_fraction=0.0, seed=0)
        except DataError as exc:
            raise SystemExit(f"{FASHION_HINT}\n({exc})") from None
        if len(full.train) < n:
            raise SystemExit(f"fashion_mnist has {len(full.train)} training images; --steps x --batch-size asks for {n}")
        train = Split(full.train.images[:n].contiguous(), full.train.labels[:n].contiguous())
        bundle = DatasetBundle("fashion_mnist", train, empty(1), empty(1), full.num_classes, full.class_names,
                               full.input_spec, (), full.source)
        return bundle, f"Fashion-MNIST training images ({full.source}), resized to {args.size}², 1 channel"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 1000 if args.size >= 96 else 10, (n,), generator=g)
    classes = 1000 if args.size >= 96 else 10
    spec = InputSpec(channels=3, height=args.size, width=args.size, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225))
    bundle = DatasetBundle("random", Split(images, labels), empty(3), empty(3), classes,
                           [str(i) for i in range(classes)], spec, (), "random uint8 images")
    return bundle, (f"random uint8 images {args.size}² RGB, ImageNet normalisation (training speed does not "
                    f"depend on pixel values)")


class PlainLoop:
    """The hand-written baseline: built once on the device, no host reads inside a round."""

    def __init__(self, model: torch.nn.Module, data: Any, args: argparse.Namespace, device: torch.device,
                 batch_size: int) -> None:
        from rescompress import accel

        self.model = accel.move(model, device, channels_last=args.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.data, self.args, self.device, self.batch_size = data, args, device, batch_size
        self.prebuilt = None
        if args.plain_data == "prebuilt":
            from rescompress.data import batches

            self.prebuilt = [(self._format(x), y) for x, y in batches(data.train, data.input_spec, batch_size,
                                                                      device=device)]

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.args.channels_last else x

    def _batches(self, epoch: int):
        if self.prebuilt is not None:
            return self.prebuilt
        from rescompress.data import batches

        return ((self._format(x), y) for x, y in batches(self.data.train, self.data.input_spec, self.batch_size,
                                                         shuffle=True, seed=0, epoch=epoch, device=self.device))

    def round(self, epoch: int) -> float:
        """Seconds for one pass over the round's batches, the GPU finished."""
        self.model.train()
        _sync(self.device)
        t0 = time.perf_counter()
        for x, y in self._batches(epoch):
            ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.opt.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
        _sync(self.device)
        return time.perf_counter() - t0


def _stats(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "min": float(np.min(values)), "max": float(np.max(values)), "rounds": [round(v, 2) for v in values]}


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    from rich.console import Console

    from rescompress import accel
    from rescompress.bench.latency import provenance
    from rescompress.models import build_model
    from rescompress.recipe import TrainConfig
    from rescompress.train import fit

    if args.threads:
        torch.set_num_threads(args.threads)
    device = accel.resolve_device(args.device)
    accel.check_precision(device, args.precision)
    requested = args.channels_last
    args.channels_last = requested and device.type == "cuda"  # as fit does: channels_last applies on CUDA only
    batch_size = args.batch_size or (128 if device.type == "cuda" else 32)
    steps = args.steps or (16 if device.type == "cuda" else 6)
    data, what = build_data(args, steps * batch_size)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=data.num_classes, in_channels=data.input_spec.channels,
                        small_input=args.size < 96)
    plain = PlainLoop(copy.deepcopy(model), data, args, device, batch_size)
    epochs = args.warmup + args.rounds
    plain_seconds: dict[int, float] = {}
    hook_seconds: dict[int, float] = {}

    def hook(_model: torch.nn.Module, epoch: int) -> None:
        """The plain rounds due before our epoch `epoch` (order P O O P P O O P ...)."""
        t0 = time.perf_counter()
        if epoch % 2 == 0:
            for r in ([epoch - 1] if epoch > 0 else []) + [epoch]:
                plain_seconds[r] = plain.round(r)
        _sync(device)
        hook_seconds[epoch] = time.perf_counter() - t0

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=args.lr, optimizer="sgd", momentum=0.9,
                      weight_decay=5e-4, schedule="constant", augment="none", device=str(device),
                      precision=args.precision, channels_last=args.channels_last, threads=args.threads)
    console = Console(stderr=True, quiet=args.quiet)
    with accel.conv_autotuning(device):
        t0 = time.perf_counter()
        history = fit(model, data, cfg, seed=0, console=console, epoch_hook=hook, desc="rescompress fit")
        fit_wall = time.perf_counter() - t0
        if (epochs - 1) % 2 == 1:  # the last plain round comes after our last epoch
            plain_seconds[epochs - 1] = plain.round(epochs - 1)
    ours_seconds = {h["epoch"] - 1: h["seconds"] - hook_seconds[h["epoch"] - 1] for h in history}
    images = steps * batch_size
    timed = range(args.warmup, epochs)
    ours = [images / ours_seconds[e] for e in timed]
    base = [images / plain_seconds[e] for e in timed]
    setup = fit_wall - sum(h["seconds"] for h in history)
    result = {
        "benchmark": "train_throughput",
        "config": {
            "model": args.model, "size": args.size, "dataset": args.dataset, "data": what,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "precision": args.precision, "channels_last": args.channels_last, "channels_last_requested": requested,
            "batch_size": batch_size,
            "steps_per_round": steps, "images_per_round": images, "rounds": args.rounds, "warmup_rounds": args.warmup,
            "threads": torch.get_num_threads(), "plain_data": args.plain_data,
            "optimizer": f"SGD lr {args.lr:g} (constant), momentum 0.9, Nesterov, weight decay 5e-4",
            "cudnn_benchmark": device.type == "cuda", "order": "P O O P P O O P ... (plain inside fit's epoch hook)",
        },
        "loops": {
            "rescompress": {
                "includes": "train.fit epochs: rescompress.data.batches (uint8 -> device, normalised there), lr set "
                            "per step, autocast/GradScaler, loss and top-1 summed on the device and read every "
                            f"{1 if device.type == 'cpu' else 'few'} step(s), progress bar and epoch line; "
                            "setup (model to the device and back, optimizer) reported apart",
                "images_per_s": _stats(ours), "setup_seconds": round(setup, 3)},
            "plain": {
                "includes": ("hand-written loop, model and optimizer built once on the device, no host reads in a "
                             "round; batches from the same rescompress.data.batches call" if args.plain_data == "batches"
                             else "hand-written loop on normalised batches prepared on the device beforehand"),
                "images_per_s": _stats(base)},
        },
        "ratio": float(np.median(ours) / np.median(base)),
        "paired_ratio_median": float(np.median([o / b for o, b in zip(ours, base)])),
        "final_loss": history[-1]["loss"] if math.isfinite(history[-1]["loss"]) else None,
        "provenance": {**provenance(), "torch": torch.__version__, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None},
    }
    log(f"{args.model} {args.size}² {args.precision}{' channels_last' if args.channels_last else ''} on {device} "
        f"batch {batch_size}: rescompress {result['loops']['rescompress']['images_per_s']['median']:.1f} img/s, "
        f"plain {result['loops']['plain']['images_per_s']['median']:.1f} img/s, ratio {result['ratio']:.3f}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    result = run(args)
    if args.out is not None:
        from rescompress.fileio import atomic_write_json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(result, indent=2))
    if args.min_ratio is not None and result["ratio"] < args.min_ratio:
        print(f"rescompress reached {result['ratio']:.3f}x the plain loop, below {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
