"""ResNet family (torchvision-compatible keys, one ReLU per use), graph models of imported networks, weight
loading and freezing."""

from rescompress.models.arch import build_arch, classifier_name, describe_arch
from rescompress.models.graph import GRAPH_ARCH, GraphModel
from rescompress.models.layout import channel_layout, conform_to_state_dict
from rescompress.models.resnet import (
    CLASSIFIER,
    MODELS,
    BasicBlock,
    Bottleneck,
    PreActBottleneck,
    ResNet,
    ResNetV2,
    build_model,
)
from rescompress.models.weights import (
    FREEZE_MODES,
    LoadReport,
    apply_freeze,
    guess_architecture,
    load_weights,
    read_state_dict,
    set_train_mode,
)

__all__ = [
    "GRAPH_ARCH",
    "GraphModel",
    "build_arch",
    "classifier_name",
    "describe_arch",
    "CLASSIFIER",
    "FREEZE_MODES",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "LoadReport",
    "PreActBottleneck",
    "ResNet",
    "ResNetV2",
    "apply_freeze",
    "build_model",
    "channel_layout",
    "conform_to_state_dict",
    "guess_architecture",
    "load_weights",
    "read_state_dict",
    "set_train_mode",
]
