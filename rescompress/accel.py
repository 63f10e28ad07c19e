"""Where training runs and in what float precision: `train.device`, `train.precision`, `train.channels_last`.

Every step that runs the model on data — baseline training, fine-tuning after pruning (and the taylor
importance batches), distillation (the teacher too), QAT, PTQ calibration, the autotune's evaluations and
`train.evaluate` / `predict` — runs on the recipe's device. A stage takes a CPU model and hands one back:
checkpoints, exports, lint and latency measurement keep working from CPU copies.

- `device`: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` (the current GPU) or `cuda:N`.
  Under torchrun every rank trains on its own GPU, `cuda:$LOCAL_RANK`. A CUDA device torch does not see is
  a `DeviceError`, raised when the run is planned (`check_train`), naming what torch sees.
- `precision`: `fp32`, or `bf16` / `fp16` mixed precision under `torch.autocast` (weights and optimizer stay
  in fp32; fp16 scales the loss with `torch.amp.GradScaler` so small gradients survive). On CUDA, bf16 needs
  an Ampere or newer GPU. On a CPU both run, but slowly unless the CPU has bf16/fp16 matrix units (AMX,
  avx512_bf16): there they serve to try a recipe, not to speed it up. QAT always trains in fp32: the
  fake-quantizers' ranges and rounding must see float32 values (the stage notes it when the recipe asks for
  another precision).
- `channels_last`: NHWC tensors for the model and each batch; convolutions on CUDA tensor cores are faster
  in it. The model is back in the default layout when a step hands it on. On the CPU it is not used (with a
  note): torch's CPU convolution backward crashes on channels_last tensors with few channels.
- On CUDA, `fit` lets cudnn search the fastest convolution algorithms for its input shapes while it runs
  (`conv_autotuning`; the setting is restored afterwards). Evaluation and calibration do not.

`move` places a model on a device. An eager module moves with `Module.to`; a PT2E graph (compress/pt2e.py)
also needs the device constants baked into its nodes and its plain tensor attributes moved, and is checked
afterwards to hold nothing on another device.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import torch
from torch import nn

from rescompress.errors import RescompressError

if TYPE_CHECKING:
    from rescompress.recipe import TrainConfig

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RescompressError):
    """The recipe asks for a device (or a precision on it) that this machine's torch cannot give."""


# ------------------------------------------------------------------------------------------------ devices


def describe_torch() -> str:
    """What torch sees, for error messages: version, CUDA build, visible devices."""
    built = torch.version.cuda
    build = f"built with CUDA {built}" if built else "a CPU-only build (no CUDA)"
    count = torch.cuda.device_count() if built and torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return f"torch {torch.__version__}, {build}, {count} CUDA device(s) visible{where}"


def _local_rank() -> Optional[int]:
    """This process's GPU under torchrun (LOCAL_RANK, with WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch.device for a `train.device` value; a CUDA device always with its index.

    Raises DeviceError when the spec asks for CUDA that torch does not see, names a GPU beyond the count, or
    names a GPU under torchrun (where each rank takes its LOCAL_RANK GPU)."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "auto" and not (spec == "cuda" or spec.startswith("cuda:")):
        raise DeviceError(f"train.device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    available = torch.cuda.is_available()
    if spec == "auto" and not available:
        return torch.device("cpu")
    if not available:
        fix = ("install a CUDA build of torch" if not torch.version.cuda
               else "check the driver and CUDA_VISIBLE_DEVICES")
        raise DeviceError(f"train.device is {spec!r} but torch sees no CUDA GPU ({describe_torch()}); {fix}, "
                          f"or set train.device: cpu (or auto)")
    count = torch.cuda.device_count()
    rank = _local_rank()
    if rank is not None:
        if spec.startswith("cuda:"):
            raise DeviceError(f"train.device is {spec!r}, but under torchrun each rank trains on its own GPU "
                              f"(LOCAL_RANK); write train.device: cuda (or auto)")
        if rank >= count:
            raise DeviceError(f"torchrun started local rank {rank}, but torch sees {count} CUDA device(s) "
                              f"({describe_torch()}); start at most {count} processes per node, or set "
                              f"train.device: cpu")
        return torch.device("cuda", rank)
    if spec.startswith("cuda:"):
        index = int(spec.split(":", 1)[1])
        if index >= count:
            raise DeviceError(f"train.device is {spec!r} but torch sees only {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1} ({describe_torch()})")
        return torch.device("cuda", index)
    return torch.device("cuda", torch.cuda.current_device())


def check_precision(device: torch.device, precision: str) -> None:
    """Raise DeviceError when `precision` cannot run on `device` (bf16 on a GPU older than Ampere)."""
    if precision not in PRECISIONS:
        raise DeviceError(f"train.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise DeviceError(f"train.precision bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0, "
                          f"Ampere, or newer); {name} has {major}.{minor}: use fp16 (or fp32)")


def check_train(cfg: "TrainConfig") -> torch.device:
    """Plan-time check of the recipe's `train:` device and precision; returns the device training will use.
    Raises DeviceError (a RescompressError: the CLI exits 2) before anything is trained."""
    device = resolve_device(cfg.device)
    check_precision(device, cfg.precision)
    return device


def train_device(cfg: "TrainConfig") -> torch.device:
    """The device the recipe's training, evaluation and calibration run on."""
    return resolve_device(cfg.device)


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (or tensor constant of a graph); CPU if it has none."""
    for t in _tensors(model):
        return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass and loss (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def grad_scaler(device: torch.device, precision: str) -> Optional["torch.amp.GradScaler"]:
    """The loss scaler fp16 training needs (None otherwise: bf16 has fp32's range)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def use_channels_last(device: torch.device, requested: bool) -> tuple[bool, str]:
    """Whether training uses channels_last on `device`, and a note when a request is not followed: only on
    CUDA. On the CPU, torch 2.13's convolution backward corrupts memory (a double free, then a crash) on
    channels_last tensors with few channels, such as an 8-channel stem or a layer pruned to 8 channels."""
    if requested and device.type != "cuda":
        return False, ("channels_last applies on CUDA only; training on the CPU in the default layout (torch's "
                       "CPU convolutions crash on channels_last tensors with few channels)")
    return requested, ""


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are in channels_last (judged on the first one where the two
    layouts differ)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
    return False


def to_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the training memory format (4-D tensors only)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@contextlib.contextmanager
def conv_autotuning(device: torch.device) -> Iterator[None]:
    """On CUDA, cudnn picks the fastest convolution algorithm per input shape inside the block (training
    shapes repeat every step, so the search pays for itself); the previous setting is restored after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# ------------------------------------------------------------------------------------------------ moving


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _attr_tensors(gm: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """Tensors a graph reads with get_attr that are not parameters or buffers (the lifted constants of a
    loaded torch.export archive): Module.to does not move those."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, leaf = str(node.target).rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        value = getattr(owner, leaf, None)
        if isinstance(value, torch.Tensor) and leaf not in owner._parameters and leaf not in owner._buffers:
            yield owner, leaf, value


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
    for _, _, t in _attr_tensors(model):
        yield t


def _node_devices(gm: nn.Module) -> Iterator[tuple[Any, torch.device]]:
    """(node, device) for every device constant in a graph's node arguments."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    for node in graph.nodes:
        for value in [*node.args, *node.kwargs.values()]:
            if isinstance(value, torch.device):
                yield node, value


def _move_graph_constants(gm: nn.Module, device: torch.device) -> None:
    """Device constants in node arguments (`device=cpu` of a factory op, pytorch/pytorch#121761) and plain
    tensor attributes onto `device`."""
    from torch.fx.node import map_aggregate

    for owner, leaf, value in list(_attr_tensors(gm)):
        setattr(owner, leaf, value.to(device))
    changed = False
    for node in gm.graph.nodes:
        def swap(v: Any) -> Any:
            return device if isinstance(v, torch.device) else v

        if any(isinstance(v, torch.device) for v in [*node.args, *node.kwargs.values()]):
            node.args = map_aggregate(node.args, swap)
            node.kwargs = map_aggregate(node.kwargs, swap)
            changed = True
    if changed:
        gm.recompile()


def misplaced(model: nn.Module, device: torch.device) -> list[str]:
    """What of `model` is not on `device`: parameters, buffers, graph constants and device arguments."""
    out = [f"{name} on {t.device}" for name, t in [*model.named_parameters(), *model.named_buffers()]
           if not _same(t.device, device)]
    out += [f"{leaf} on {t.device}" for _, leaf, t in _attr_tensors(model) if not _same(t.device, device)]
    out += [f"node {node.name} device={d}" for node, d in _node_devices(model) if not _same(d, device)]
    return out


def move(model: nn.Module, device: torch.device | str, *, channels_last: bool = False) -> nn.Module:
    """Put `model` (in place) on `device` in the given memory format; gradients follow their parameters.
    A graph (fx GraphModule) is checked afterwards: anything left on another device is a RuntimeError."""
    device = torch.device(device)
    graph = getattr(model, "graph", None) is not None
    model.to(device=device, memory_format=memory_format(channels_last))
    for p in model.parameters():
        if p.grad is not None and not _same(p.grad.device, p.device):
            p.grad = p.grad.to(p.device)
    if graph:
        _move_graph_constants(model, device)
        left = misplaced(model, device)
        if left:
            raise RuntimeError(f"moving the graph to {device} left {len(left)} tensor(s) or device argument(s) "
                               f"elsewhere: {', '.join(left[:5])}")
    return model


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str, *, channels_last: bool = False,
              extras: Iterable[nn.Module] = ()) -> Iterator[nn.Module]:
    """`model` (and `extras`, e.g. a teacher) on `device` inside the block, back on the device and in the
    memory format each came in after it, also when the block raises."""
    device = torch.device(device)
    modules = [model, *[m for m in extras if m is not None and m is not model]]
    homes = [(device_of(m), is_channels_last(m)) for m in modules]
    for m in modules:
        move(m, device, channels_last=channels_last)
    try:
        yield model
    finally:
        for m, (home, was_channels_last) in zip(modules, homes):
            move(m, home, channels_last=was_channels_last)
