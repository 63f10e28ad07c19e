"""ResNet architectures with torchvision's state_dict layout and one ReLU module per use.

ImageNet-style resnet18/34/50/101/152 load torchvision `.pth` files as is; CIFAR-style resnet20/32/56 and
the tiny test model use the same key names (conv1, bn1, layer1..3, fc). Every ReLU is its own module so that
PT2E quantization can annotate each use separately, and the residual add is a plain `out + identity`.

The `*_keras` models are the layouts of keras.applications: resnet50/101/152_keras (v1: stride on the
first 1x1 conv of a bottleneck, BN epsilon 1.001e-5, torchvision keys) and resnet50/101/152v2_keras
(`ResNetV2`, pre-activation blocks; keys documented on that class).
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


def _conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=bias)


BN_EPS = 1e-5  # torch's default
KERAS_BN_EPS = 1.001e-5  # keras.applications ResNets
STRIDE_ON = ("3x3", "1x1")


class BasicBlock(nn.Module):
    """Two 3x3 convs; `relu2` runs after the residual add."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 bn_eps: float = BN_EPS) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu2 = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4; `relu3` after the add.

    `stride_on` is "3x3" (torchvision's v1.5) or "1x1" (the original v1, as keras.applications ResNet50).
    """

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 stride_on: str = "3x3", bn_eps: float = BN_EPS) -> None:
        super().__init__()
        if stride_on not in STRIDE_ON:
            raise ValueError(f"unknown stride_on '{stride_on}' (choose '3x3' or '1x1')")
        cout = width * self.expansion
        self.conv1 = _conv1x1(cin, width, stride if stride_on == "1x1" else 1)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, width, stride if stride_on == "3x3" else 1)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout, eps=bn_eps)
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
    `stride_on` ("3x3" or "1x1", Bottleneck only) and `bn_eps` (every BatchNorm) select the keras.applications
    v1 variant. Registry builders set `rescompress_arch` (name and build arguments) so checkpoints can record it.
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
        stride_on: str = "3x3",
        bn_eps: float = BN_EPS,
    ) -> None:
        super().__init__()
        if stride_on != "3x3" and block is not Bottleneck:
            raise ValueError(f"stride_on '{stride_on}' needs Bottleneck blocks, not {block.__name__}")
        stem_width = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            # Keras pads with zeros (ZeroPadding2D(1), then a 'valid' pool), torch with -inf: the same here,
            # because the pool follows a ReLU (inputs >= 0) and every 3x3/2 window holds a real value.
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "small":
            self.conv1 = _conv3x3(in_channels, stem_width)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem '{stem}' (choose 'imagenet' or 'small')")
        self.bn1 = nn.BatchNorm2d(stem_width, eps=bn_eps)
        self.relu = nn.ReLU()

        options: dict[str, object] = {"bn_eps": bn_eps}
        if block is Bottleneck:
            options["stride_on"] = stride_on
        cin = stem_width
        self.stage_names: list[str] = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stage, cin = _make_stage(block, cin, width, depth, stride=1 if i == 0 else 2, **options)
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


def _make_stage(block: Block, cin: int, width: int, depth: int, stride: int, *, bn_eps: float = BN_EPS,
                **options: object) -> tuple[nn.Sequential, int]:
    cout = width * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout, eps=bn_eps))
    blocks = [block(cin, width, stride, downsample, bn_eps=bn_eps, **options)]
    blocks += [block(cout, width, bn_eps=bn_eps, **options) for _ in range(depth - 1)]
    return nn.Sequential(*blocks), cout


class PreActBottleneck(nn.Module):
    """keras.applications' ResNetV2 block: `bn0`/`relu0` (pre-activation), 1x1 reduce (`conv1` `bn1` `relu1`),
    3x3 with the block's stride (`conv2` `bn2` `relu2`), 1x1 expand by 4 with a bias (`conv3`), then
    `out + identity` with no activation after it.

    The shortcut is `downsample` (a 1x1 conv with a bias, on the pre-activation) when `conv_shortcut`, else
    `subsample` (MaxPool2d(1, stride), on the block's input) when strided, else the input itself.
    """

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, conv_shortcut: bool = False, *,
                 bn_eps: float = KERAS_BN_EPS) -> None:
        super().__init__()
        cout = width * self.expansion
        if not conv_shortcut and cin != cout:
            raise ValueError(f"an identity shortcut needs {cout} input channels, got {cin}")
        self.bn0 = nn.BatchNorm2d(cin, eps=bn_eps)
        self.relu0 = nn.ReLU()
        self.downsample = _conv1x1(cin, cout, stride, bias=True) if conv_shortcut else None
        self.subsample = nn.MaxPool2d(kernel_size=1, stride=stride) if not conv_shortcut and stride != 1 else None
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(width, cout, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu0(self.bn0(x))
        if self.downsample is not None:
            identity = self.downsample(pre)
        elif self.subsample is not None:
            identity = self.subsample(x)
        else:
            identity = x
        out = self.relu1(self.bn1(self.conv1(pre)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.conv3(out) + identity


class ResNetV2(nn.Module):
    """keras.applications' ResNet50V2/101V2/152V2 (pre-activation).

    Modules: `conv1` (7x7/2 with a bias, no BN after it), `maxpool` (ZeroPad2d(1) + MaxPool2d(3, 2): its input
    can be negative, so the padding must be zeros, not torch's -inf), `layer1`..`layer4` of PreActBottleneck
    (keys `layerN.i.{bn0, conv1, bn1, conv2, bn2, conv3}`, `layerN.0.downsample` the 1x1 conv shortcut), then
    `post_bn`, `post_relu`, `avgpool`, `fc`. Each stage starts with a conv shortcut (stride 1) and
    downsamples in its last block, except the last stage (stride 1 throughout). The "small" stem is a 3x3
    stride-1 conv with a bias and no pool.
    """

    rescompress_arch: dict[str, object]

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        stem: str,
        bn_eps: float = KERAS_BN_EPS,
    ) -> None:
        super().__init__()
        stem_width = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=True)
            self.maxpool: nn.Module = nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(kernel_size=3, stride=2))
        elif stem == "small":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=True)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem '{stem}' (choose 'imagenet' or 'small')")

        cin = stem_width
        self.stage_names: list[str] = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stride = 2 if i < len(depths) - 1 else 1
            stage, cin = _make_preact_stage(cin, width, depth, stride, bn_eps)
            name = f"layer{i + 1}"
            self.add_module(name, stage)
            self.stage_names.append(name)
        self.post_bn = nn.BatchNorm2d(cin, eps=bn_eps)
        self.post_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.post_relu(self.post_bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _make_preact_stage(cin: int, width: int, depth: int, stride: int, bn_eps: float) -> tuple[nn.Sequential, int]:
    cout = width * PreActBottleneck.expansion
    if depth == 1:
        return nn.Sequential(PreActBottleneck(cin, width, stride, conv_shortcut=True, bn_eps=bn_eps)), cout
    blocks = [PreActBottleneck(cin, width, 1, conv_shortcut=True, bn_eps=bn_eps)]
    blocks += [PreActBottleneck(cout, width, bn_eps=bn_eps) for _ in range(depth - 2)]
    blocks.append(PreActBottleneck(cout, width, stride, bn_eps=bn_eps))
    return nn.Sequential(*blocks), cout


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _register(name: str, block: Block | type[PreActBottleneck], depths: Sequence[int], widths: Sequence[int], *,
              cifar: bool = False, keras: bool = False) -> None:
    """Register a builder `(num_classes, in_channels, small_input)`; `small_input` (or `cifar`) picks the
    3x3 stride-1 stem without a pool, for every layout."""

    def build(num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
        stem = "small" if cifar or small_input else "imagenet"
        shape = {"num_classes": num_classes, "in_channels": in_channels, "stem": stem}
        model: ResNet | ResNetV2
        if block is PreActBottleneck:
            model = ResNetV2(depths, widths, **shape)
        elif keras:
            model = ResNet(block, depths, widths, stride_on="1x1", bn_eps=KERAS_BN_EPS, **shape)
        else:
            model = ResNet(block, depths, widths, **shape)
        model.rescompress_arch = {
            "name": name,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "small_input": small_input,
        }
        return model

    if block is PreActBottleneck:
        style = "keras.applications ResNetV2 layout, pre-activation"
    elif keras:
        style = "keras.applications ResNet layout (v1: stride on the first 1x1, BN eps 1.001e-5), torchvision keys"
    else:
        style = "CIFAR-style, 3x3 stem" if cifar else "ImageNet-style, torchvision keys"
    build.__doc__ = (f"{style}; {block.__name__} {'/'.join(map(str, depths))}, "
                     f"widths {'/'.join(map(str, widths))}")
    MODELS.add(name, build)


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)

_register("resnet18", BasicBlock, (2, 2, 2, 2), _IMAGENET_WIDTHS, cifar=False)
_register("resnet34", BasicBlock, (3, 4, 6, 3), _IMAGENET_WIDTHS, cifar=False)
_register("resnet50", Bottleneck, (3, 4, 6, 3), _IMAGENET_WIDTHS, cifar=False)
_register("resnet101", Bottleneck, (3, 4, 23, 3), _IMAGENET_WIDTHS, cifar=False)
_register("resnet152", Bottleneck, (3, 8, 36, 3), _IMAGENET_WIDTHS, cifar=False)
_register("resnet20", BasicBlock, (3, 3, 3), _CIFAR_WIDTHS, cifar=True)
_register("resnet32", BasicBlock, (5, 5, 5), _CIFAR_WIDTHS, cifar=True)
_register("resnet56", BasicBlock, (9, 9, 9), _CIFAR_WIDTHS, cifar=True)
_register("resnet_tiny", BasicBlock, (1, 1, 1), (8, 16, 32), cifar=True)

KERAS_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
for _n, _depths in KERAS_DEPTHS.items():
    _register(f"resnet{_n}_keras", Bottleneck, _depths, _IMAGENET_WIDTHS, keras=True)
    _register(f"resnet{_n}v2_keras", PreActBottleneck, _depths, _IMAGENET_WIDTHS, keras=True)


def build_model(name: str, *, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """Build a registered ResNet; unknown names raise UnknownNameError with a suggestion."""
    builder = MODELS.get(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return builder(num_classes, in_channels, small_input)
