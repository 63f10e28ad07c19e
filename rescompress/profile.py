"""Model cost figures for the report: parameters, multiply-accumulates, and size on disk."""

from __future__ import annotations

import io

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass on `example` (batch 1), counted by torch-pruning's op counter."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example[:1])
    finally:
        model.train(was_training)
    return int(macs)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the serialised state_dict: what a checkpoint of this model costs on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def profile(model: nn.Module, example: torch.Tensor) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, example), "size_bytes": state_dict_bytes(model)}
