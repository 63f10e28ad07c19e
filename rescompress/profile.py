"""Model cost figures for the report: parameters, multiply-accumulates, and size on disk."""

from __future__ import annotations

import io

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    """Trainable parameters; for a PT2E int8 model, its int8 weight constants plus the float ones left."""
    total = sum(p.numel() for p in model.parameters())
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("quantized_decomposed.dequantize_per_channel"):
                weight = node.args[0]
                if getattr(weight, "op", None) == "get_attr":
                    total += getattr(model, weight.target).numel()
    return total


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of convolutions and matrix products in one forward pass on `example[:1]`,
    counted by torch's dispatcher-level FLOP counter (so float, pruned and PT2E int8 graphs count alike)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(example[:1])
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the serialised state_dict: what a checkpoint of this model costs on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def profile(model: nn.Module, example: torch.Tensor) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, example), "size_bytes": state_dict_bytes(model)}
