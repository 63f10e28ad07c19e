"""One training and evaluation loop, shared by the baseline, fine-tuning and (later) distillation and QAT.

`fit` trains in place. With `state_path` it saves model, optimizer and RNG state after every epoch and,
when that file exists, continues from it: a killed run resumes mid-stage with the same result.
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

from rescompress import distributed
from rescompress.data import DatasetBundle, InputSpec, Split, batches
from rescompress.errors import PlanError, ResumeError
from rescompress.fileio import atomic_write
from rescompress.models import set_train_mode
from rescompress.recipe import TrainConfig

# loss_fn(model, x, y) -> (loss, logits): the logits are the model's own, for the running train top-1.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
) -> list[dict]:
    """Train `model` in place; returns one dict per epoch (loss, train/val top-1, seconds).

    `epoch_hook(model, epoch)` runs after the model is put in training mode at the start of each epoch
    (QAT uses it to freeze BatchNorm statistics and observers for the last epochs)."""
    epochs = cfg.epochs if epochs is None else epochs
    base_lr = cfg.lr if lr is None else lr
    console = console or Console(stderr=True)
    augment = resolve_augment(cfg, data)
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)

    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg, base_lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    start_epoch = 0
    if state_path is not None and state_path.exists():
        start_epoch, history = _load_state(state_path, model, optimizer, generator)
        console.print(f"[dim]{desc}: resuming after epoch {start_epoch}/{epochs}[/dim]")

    ranks = distributed.world().size
    trained = distributed.wrap(model)  # DistributedDataParallel under torchrun, else the model itself
    with progress_bar(console) as progress:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            set_train_mode(model)
            if epoch_hook is not None:
                epoch_hook(model, epoch)
            task = progress.add_task(f"{desc} {epoch + 1}/{epochs}", total=steps_per_epoch, info="")
            seen = correct = 0
            loss_sum = 0.0
            for i, (x, y) in enumerate(batches(data.train, data.input_spec, cfg.batch_size, shuffle=True,
                                                generator=generator, augment=augment)):
                if len(y) < 2 * ranks and ranks > 1:
                    continue  # a last batch too small to split: every rank skips it alike
                x, y = distributed.shard(x, y)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch * steps_per_epoch + i, total, base_lr, cfg, steps_per_epoch)
                loss, logits = loss_fn(trained, x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(y)
                seen += len(y)
                correct += (logits.detach().argmax(1) == y).sum().item()
                progress.update(task, advance=1, info=f"loss {loss_sum / seen:.3f}")
            progress.remove_task(task)
            if ranks > 1:
                loss_sum, seen, correct = distributed.all_sum([loss_sum, seen, correct])
                distributed.sync_state(model)
            row = {
                "epoch": epoch + 1,
                "loss": loss_sum / max(1, seen),
                "train_top1": correct / max(1, seen),
                "val_top1": evaluate(model, data.val, data.input_spec, cfg.eval_batch_size) if len(data.val) else None,
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            if (spent := _clock.get()) is not None:
                spent[0] += row["seconds"]
            val = f" val {row['val_top1'] * 100:.1f}%" if row["val_top1"] is not None else ""
            console.print(f"  {desc} epoch {epoch + 1}/{epochs}  loss {row['loss']:.3f}  "
                          f"train {row['train_top1'] * 100:.1f}%{val}  {row['seconds']:.1f}s")
            if state_path is not None and distributed.is_main():
                _save_state(state_path, epoch + 1, history, model, optimizer, generator)
    model.eval()
    return history


def _save_state(path: Path, epoch: int, history: list, model: nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> None:
    state = {
        "epoch": epoch,
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    atomic_write(path, lambda p: torch.save(state, p))


def _load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> tuple[int, list]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        return int(state["epoch"]), list(state["history"])
    except Exception as exc:  # a torn or foreign file: say which, never train on half a state
        raise ResumeError(f"cannot resume from {path}: it is damaged or not a training state ({type(exc).__name__}). "
                          f"Delete it to restart this stage from its beginning.") from None


@torch.no_grad()
def predict(model: nn.Module, split: Split, spec: InputSpec, batch_size: int = 256) -> np.ndarray:
    """Logits for a whole split, as float32 numpy (N, classes)."""
    model.eval()
    outs = [model(x).float().numpy() for x, _ in batches(split, spec, batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, split: Split, spec: InputSpec, batch_size: int = 256) -> float:
    """Top-1 accuracy (a fraction) on a split."""
    if len(split) == 0:
        return float("nan")
    logits = predict(model, split, spec, batch_size)
    return float((logits.argmax(1) == split.labels.numpy()).mean())
