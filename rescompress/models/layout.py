"""Channel layouts of (possibly pruned) models, and rebuilding a pruned model from a plain state_dict.

A pruned ResNet keeps the registry architecture's module names and only changes layer widths, so its
state_dict alone says what each layer looks like. `conform_to_state_dict` swaps every conv, BatchNorm
and linear layer whose tensors have other shapes for a fresh layer of the shapes the state_dict implies;
`model.load_state_dict(state_dict)` then succeeds. Checkpoints therefore need no pickled code and load with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def channel_layout(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution, by module name, in definition order."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, _CONVS)}


def _conv_like(old: nn.Module, weight: torch.Tensor) -> nn.Module:
    out_channels = int(weight.shape[0])
    depthwise = old.groups > 1 and old.groups == old.in_channels == old.out_channels
    groups = out_channels if depthwise else old.groups
    return type(old)(
        in_channels=int(weight.shape[1]) * groups,
        out_channels=out_channels,
        kernel_size=tuple(weight.shape[2:]),
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def _norm_like(old: nn.Module, features: int) -> nn.Module:
    ref = old.weight if old.weight is not None else old.running_mean
    return type(old)(
        features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )


def _linear_like(old: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    return nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def _replacement(name: str, module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """A fresh layer shaped like `state_dict` says, or None when `module` already fits it."""
    prefix = f"{name}." if name else ""
    if isinstance(module, _CONVS + (nn.Linear,)):
        weight = state_dict.get(f"{prefix}weight")
        if weight is None or weight.shape == module.weight.shape:
            return None
        return _linear_like(module, weight) if isinstance(module, nn.Linear) else _conv_like(module, weight)
    if isinstance(module, _NORMS):
        own = module.weight if module.weight is not None else module.running_mean
        saved = state_dict.get(f"{prefix}weight", state_dict.get(f"{prefix}running_mean"))
        if own is None or saved is None or saved.shape == own.shape:
            return None
        return _norm_like(module, int(saved.shape[0]))
    return None


def conform_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Replace, in place, each conv/BatchNorm/linear layer whose tensors in `state_dict` have other shapes.

    The new layers keep everything else (stride, padding, dilation, groups, bias, eps, momentum, training
    mode). Their values are fresh: load `state_dict` afterwards. Returns `model`.
    """
    swaps = []
    for name, module in model.named_modules():
        new = _replacement(name, module, state_dict) if name else None
        if new is not None:
            new.train(module.training)
            swaps.append((name, new))
    for name, new in swaps:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
    return model
