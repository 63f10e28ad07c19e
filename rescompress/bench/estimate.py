"""Estimated latency: a layer-wise roofline calibrated on published figures.

(draft: layer table)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Layer:
    """One operation of a forward pass, at the batch of the example it was traced with.

    `kind`: conv, linear, pool (max or average, incl. the global average pool) or add (a residual add).
    BatchNorm and ReLU are not listed: every target runtime folds BatchNorm into the conv's weights and runs the
    ReLU in the conv's epilogue, so they cost no kernel and no memory traffic of their own.
    """
    name: str
    kind: str
    macs: int
    weight_elems: int
    in_elems: int
    out_elems: int


def layer_table(model: "nn.Module", example: "torch.Tensor") -> list[Layer]:
    """The convs, linears, pools and residual adds that one forward pass of `model` on `example` runs, in order.

    Channel counts and spatial sizes are those of the real modules and tensors (so a structurally pruned
    model gives its own, smaller, table); the batch is `example.shape[0]`.
    """
    import torch
    from torch import nn

    names = {m: n for n, m in model.named_modules()}
    rows: list[Layer] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names.get(module, type(module).__name__)
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            cin_per_group = module.in_channels // module.groups
            kh, kw = module.kernel_size
            macs = output.numel() * cin_per_group * kh * kw
            weights = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            rows.append(Layer(name, "conv", int(macs), int(weights), int(x.numel()), int(output.numel())))
        elif isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
            weights = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            rows.append(Layer(name, "linear", int(macs), int(weights), int(x.numel()), int(output.numel())))
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            rows.append(Layer(name, "pool", 0, 0, int(x.numel()), int(output.numel())))
        elif _is_residual_block(module):
            # the block ends with relu(out + identity): an add of two tensors of the output's shape
            rows.append(Layer(f"{name}.add", "add", 0, 0, 2 * int(output.numel()), int(output.numel())))

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                               nn.AdaptiveMaxPool2d)) or _is_residual_block(module):
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


def _is_residual_block(module: object) -> bool:
    from rescompress.models.resnet import BasicBlock, Bottleneck

    return isinstance(module, (BasicBlock, Bottleneck))
