"""One training and evaluation loop, shared by the baseline, fine-tuning, distillation and QAT.

`fit` trains in place. With `state_path` it saves model and optimizer state after every epoch and, when that
file exists, continues from it: a killed run resumes mid-stage with the same result (batch order and
augmentation are functions of (seed, epoch), so there is no generator state to keep).

Devices (see accel.py): `fit` trains on `train.device`, under `train.precision` and `train.channels_last`.
The model comes in on the CPU (or anywhere), is moved to the device with whatever its loss function also
runs (a teacher, listed in the loss function's `modules` attribute), and goes back where it came from, in
the default memory format, when `fit` returns or raises: a stage always hands on a CPU model. Batches arrive
on the device from `data.batches(..., device=)`. The optimizer is built inside `fit` for the parameters as
they are then, so a model pruned between two calls trains with a fresh optimizer over its new parameters.
On CUDA the running loss and accuracy stay on the GPU and are read every few steps (each read waits for the
GPU); on the CPU after every step. `evaluate` and `predict` run where the model is, or on `device`.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rescompress import accel, distributed
from rescompress.data import DatasetBundle, InputSpec, Split, batches
from rescompress.errors import PlanError, ResumeError
from rescompress.fileio import atomic_write
from rescompress.models import set_train_mode
from rescompress.recipe import TrainConfig

# loss_fn(model, x, y) -> (loss, logits): the logits are the model's own, for the running train top-1.
# A loss that runs modules of its own (a teacher) lists them in a `modules` attribute: fit moves them with
# the model.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

CUDA_READ_EVERY = 20  # steps between reads of the running loss on CUDA (a read waits for the GPU)


_clock: ContextVar[Optional[list[float]]] = ContextVar("rescompress_training_clock", default=None)


@contextlib.contextmanager
def training_clock() -> Iterator[list[float]]:
    """Sum the seconds spent in `fit` epochs (training and the per-epoch validation) inside the block:
    `with training_clock() as spent: ...; spent[0]`. A pipeline step's time minus this is its overhead
    (pruning analysis, calibration, conversion, export)."""
    spent = [0.0]
    token = _clock.set(spent)
    try:
        yield spent
    finally:
        _clock.reset(token)


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits

    return loss_fn


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def resolve_augment(cfg: TrainConfig, data: DatasetBundle) -> tuple[str, ...]:
    if cfg.augment == "auto":
        return tuple(data.augmentations)
    if cfg.augment == "none":
        return ()
    return tuple(cfg.augment)


def lr_at(step: int, total: int, base: float, cfg: TrainConfig, steps_per_epoch: int) -> float:
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return base * (step + 1) / warm
    if cfg.schedule == "constant" or total <= warm:
        return base
    frac = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * frac))
    return base * (0.1 ** int(frac * 3))  # "step": ÷10 at 1/3 and 2/3 of training


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PlanError("nothing to train: every parameter is frozen (model.freeze)")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def fit(
    model: nn.Module,
    data: DatasetBundle,
    cfg: TrainConfig,
    *,
    epochs: Optional[int] = None,
    lr: Optional[float] = None,
    seed: int = 0,
    console: Optional[Console] = None,
    state_path: Optional[Path] = None,
    loss_fn: Optional[LossFn] = None,
    epoch_hook: Optional[Callable[[nn.Module, int], None]] = None,
    desc: str = "train",
    device: Optional[torch.device | str] = None,
    precision: Optional[str] = None,
) -> list[dict]:
    """Train `model` in place; returns one dict per epoch (loss, train/val top-1, seconds).

    `device` and `precision` default to the recipe's `train.device` / `train.precision` (QAT passes fp32).
    `epoch_hook(model, epoch)` runs after the model is put in training mode at the start of each epoch
    (QAT uses it to freeze BatchNorm statistics and observers for the last epochs)."""
    epochs = cfg.epochs if epochs is None else epochs
    base_lr = cfg.lr if lr is None else lr
    console = console or Console(stderr=True)
    augment = resolve_augment(cfg, data)
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
    device = accel.resolve_device(cfg.device) if device is None else torch.device(device)
    precision = precision or cfg.precision
    accel.check_precision(device, precision)
    extras = tuple(getattr(loss_fn, "modules", ()))
    channels_last, why = accel.use_channels_last(device, cfg.channels_last)
    if why:
        console.print(f"[dim]{desc}: {why}[/dim]")
    with accel.on_device(model, device, channels_last=channels_last, extras=extras), accel.conv_autotuning(device):
        return _fit_on_device(model, data, cfg, epochs=epochs, base_lr=base_lr, seed=seed, console=console,
                              state_path=state_path, loss_fn=loss_fn, epoch_hook=epoch_hook, desc=desc,
                              augment=augment, device=device, precision=precision, channels_last=channels_last)


def _fit_on_device(model: nn.Module, data: DatasetBundle, cfg: TrainConfig, *, epochs: int, base_lr: float,
                   seed: int, console: Console, state_path: Optional[Path], loss_fn: LossFn,
                   epoch_hook: Optional[Callable[[nn.Module, int], None]], desc: str, augment: tuple[str, ...],
                   device: torch.device, precision: str, channels_last: bool) -> list[dict]:
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = epochs * steps_per_epoch
    w = distributed.world()
    ranks = w.size
    sync_bn = False
    if cfg.sync_batchnorm:
        model, note = distributed.use_sync_batchnorm(model)
        sync_bn = note.startswith("SyncBatchNorm")
        console.print(f"[dim]{desc}: {note}[/dim]")
    optimizer = make_optimizer(model, cfg, base_lr)
    history: list[dict] = []
    start_epoch = 0
    if state_path is not None and state_path.exists():
        start_epoch, history = _load_state(state_path, model, optimizer)
        console.print(f"[dim]{desc}: resuming after epoch {start_epoch}/{epochs}[/dim]")

    scaler = accel.grad_scaler(device, precision)
    read_every = 1 if device.type == "cpu" else CUDA_READ_EVERY
    trained = distributed.wrap(model)  # DistributedDataParallel under torchrun, else the model itself
    try:
        with progress_bar(console) as progress:
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                set_train_mode(model)
                if epoch_hook is not None:
                    epoch_hook(model, epoch)
                task = progress.add_task(f"{desc} {epoch + 1}/{epochs}", total=steps_per_epoch, info="")
                running = _Running(desc, epoch)
                for i, (x, y) in enumerate(batches(data.train, data.input_spec, cfg.batch_size, shuffle=True,
                                                    seed=seed, epoch=epoch, augment=augment, device=device,
                                                    rank=w.rank, world=ranks)):
                    if ranks > 1 and min(cfg.batch_size, len(data.train) - i * cfg.batch_size) < 2 * ranks:
                        continue  # a last global batch too small to split: every rank skips it alike
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(epoch * steps_per_epoch + i, total, base_lr, cfg, steps_per_epoch)
                    with accel.autocast(device, precision):
                        loss, logits = loss_fn(trained, accel.to_format(x, channels_last), y)
                    running.add(loss, logits, y)
                    if (i + 1) % read_every == 0:
                        running.read()  # raises on a non-finite loss
                        progress.update(task, info=f"loss {running.loss:.3f}")
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is None:
                        loss.backward()
                        optimizer.step()
                    else:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    progress.update(task, advance=1)
                running.read()
                progress.remove_task(task)
                loss_sum, seen, correct = running.loss_sum, running.seen, running.correct
                if ranks > 1:
                    loss_sum, seen, correct = distributed.all_sum([loss_sum, seen, correct])
                    distributed.sync_state(model)
                row = {
                    "epoch": epoch + 1,
                    "loss": loss_sum / max(1, seen),
                    "train_top1": correct / max(1, seen),
                    "val_top1": evaluate(model, data.val, data.input_spec, cfg.eval_batch_size,
                                         channels_last=channels_last) if len(data.val) else None,
                    "seconds": time.perf_counter() - t0,
                }
                history.append(row)
                if (spent := _clock.get()) is not None:
                    spent[0] += row["seconds"]
                val = f" val {row['val_top1'] * 100:.1f}%" if row["val_top1"] is not None else ""
                console.print(f"  {desc} epoch {epoch + 1}/{epochs}  loss {row['loss']:.3f}  "
                              f"train {row['train_top1'] * 100:.1f}%{val}  {row['seconds']:.1f}s")
                if state_path is not None and distributed.is_main():
                    _save_state(state_path, epoch + 1, history, model, optimizer)
    finally:
        if sync_bn:
            distributed.plain_batchnorm(model)
    model.eval()
    return history


class _Running:
    """The running loss and train top-1 of an epoch, summed where the model runs and read on demand (on
    CUDA a read waits for the GPU, so it happens every few steps)."""

    def __init__(self, desc: str, epoch: int) -> None:
        self.desc, self.epoch = desc, epoch
        self.pending: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        self.loss_sum, self.seen, self.correct = 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.pending.append((loss.detach(), len(y), (logits.detach().argmax(1) == y).sum()))

    def read(self) -> None:
        for loss, n, correct in self.pending:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.desc}: loss became {value} at epoch {self.epoch + 1}; "
                                         f"lower the learning rate")
            self.loss_sum += value * n
            self.seen += n
            self.correct += int(correct.item())
        self.pending.clear()

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.seen)


def _save_state(path: Path, epoch: int, history: list, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state = {
        "epoch": epoch,
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    atomic_write(path, lambda p: torch.save(state, p))


def _load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["epoch"]), list(state["history"])
    except Exception as exc:  # a torn or foreign file: say which, never train on half a state
        raise ResumeError(f"cannot resume from {path}: it is damaged or not a training state ({type(exc).__name__}). "
                          f"Delete it to restart this stage from its beginning.") from None


@torch.no_grad()
def predict(model: nn.Module, split: Split, spec: InputSpec, batch_size: int = 256, *,
            device: Optional[torch.device | str] = None, channels_last: bool = False) -> np.ndarray:
    """Logits for a whole split, as float32 numpy (N, classes), computed in fp32 on `device` (default: where
    the model is; it goes back there afterwards)."""
    device = accel.device_of(model) if device is None else torch.device(device)
    with accel.on_device(model, device, channels_last=channels_last):
        model.eval()
        outs = [model(accel.to_format(x, channels_last)).float().cpu().numpy()
                for x, _ in batches(split, spec, batch_size, device=device)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, split: Split, spec: InputSpec, batch_size: int = 256, *,
             device: Optional[torch.device | str] = None, channels_last: bool = False) -> float:
    """Top-1 accuracy (a fraction) on a split, on `device` (default: where the model is)."""
    if len(split) == 0:
        return float("nan")
    logits = predict(model, split, spec, batch_size, device=device, channels_last=channels_last)
    return float((logits.argmax(1) == split.labels.numpy()).mean())
