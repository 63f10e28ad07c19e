"""ResNet architectures with torchvision's state_dict layout and one ReLU module per use.

ImageNet-style resnet18/34/50 load torchvision `.pth` files as is; CIFAR-style resnet20/32/56 and the
tiny test model use the same key names (conv1, bn1, layer1..3, fc). Every ReLU is its own module so that
PT2E quantization can annotate each use separately, and the residual add is a plain `out + identity`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from rescompress.registry import Registry

CLASSIFIER = "fc"

Builder = Callable[[int, int, bool], nn.Module]
MODELS: Registry[Builder] = Registry("model")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; `relu2` runs after the residual add."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's v1.5), 1x1 expand by 4; `relu3` after the add."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu3 = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Stem, then one `layerN` per entry of `depths`/`widths` (stride 2 from the second on), pool, fc.

    `stem` is "imagenet" (7x7 stride-2 conv + max-pool) or "small" (3x3 stride-1 conv, no pool).
    Registry builders set `rescompress_arch` (name and build arguments) so checkpoints can record it.
    """

    rescompress_arch: dict[str, object]

    def __init__(
        self,
        block: Block,
        depths: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        stem: str,
    ) -> None:
        super().__init__()
        stem_width = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "small":
            self.conv1 = _conv3x3(in_channels, stem_width)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem '{stem}' (choose 'imagenet' or 'small')")
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()

        cin = stem_width
        self.stage_names: list[str] = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stage, cin = _make_stage(block, cin, width, depth, stride=1 if i == 0 else 2)
            name = f"layer{i + 1}"
            self.add_module(name, stage)
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _make_stage(block: Block, cin: int, width: int, depth: int, stride: int) -> tuple[nn.Sequential, int]:
    cout = width * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    blocks = [block(cin, width, stride, downsample)]
    blocks += [block(cout, width) for _ in range(depth - 1)]
    return nn.Sequential(*blocks), cout


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _register(name: str, block: Block, depths: Sequence[int], widths: Sequence[int], *, cifar: bool) -> None:
    def build(num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
        stem = "small" if cifar or small_input else "imagenet"
        model = ResNet(block, depths, widths, num_classes=num_classes, in_channels=in_channels, stem=stem)
        model.rescompress_arch = {
            "name": name,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "small_input": small_input,
        }
        return model

    style = "CIFAR-style, 3x3 stem" if cifar else "ImageNet-style, torchvision keys"
    build.__doc__ = (f"{style}; {block.__name__} {'/'.join(map(str, depths))}, "
                     f"widths {'/'.join(map(str, widths))}")
    MODELS.add(name, build)


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)

_register("resnet18", BasicBlock, (2, 2, 2, 2), _IMAGENET_WIDTHS, cifar=False)
_register("resnet34", BasicBlock, (3, 4, 6, 3), _IMAGENET_WIDTHS, cifar=False)
_register("resnet50", Bottleneck, (3, 4, 6, 3), _IMAGENET_WIDTHS, cifar=False)
_register("resnet20", BasicBlock, (3, 3, 3), _CIFAR_WIDTHS, cifar=True)
_register("resnet32", BasicBlock, (5, 5, 5), _CIFAR_WIDTHS, cifar=True)
_register("resnet56", BasicBlock, (9, 9, 9), _CIFAR_WIDTHS, cifar=True)
_register("resnet_tiny", BasicBlock, (1, 1, 1), (8, 16, 32), cifar=True)


def build_model(name: str, *, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """Build a registered ResNet; unknown names raise UnknownNameError with a suggestion."""
    builder = MODELS.get(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return builder(num_classes, in_channels, small_input)
