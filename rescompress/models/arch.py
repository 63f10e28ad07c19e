"""Build a model from its architecture record (plain data, as run plans and checkpoints store it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from rescompress.models.graph import GRAPH_ARCH, GraphModel, spec_classes, with_classes
from rescompress.models.resnet import CLASSIFIER, build_model

_BUILD_KEYS = ("num_classes", "in_channels", "small_input")


def build_arch(arch: Mapping[str, Any]) -> nn.Module:
    """A fresh model for `arch`: a registry ResNet ({"name", "num_classes", "in_channels", "small_input"}) or
    a graph model ({"name": "graph", "graph": spec, "num_classes": ...}; a `num_classes` other than the
    spec's resizes its classifier)."""
    if arch.get("name") == GRAPH_ARCH:
        spec = arch["graph"]
        classes = arch.get("num_classes")
        if classes is not None and spec_classes(spec) not in (None, classes):
            spec = with_classes(spec, classes)
        return GraphModel(spec)
    return build_model(arch["name"], **{k: arch[k] for k in _BUILD_KEYS if k in arch})


def classifier_name(model: nn.Module) -> str | None:
    """The name of the model's final linear layer (`fc` for the registry ResNets), or None."""
    name = getattr(model, "classifier_name", CLASSIFIER)
    if name is None:
        return None
    try:
        model.get_submodule(name)
    except AttributeError:
        return None
    return name


def describe_arch(arch: Mapping[str, Any]) -> str:
    """One short name for plans and reports: the registry name, or "graph (N nodes)"."""
    if arch.get("name") == GRAPH_ARCH:
        return f"graph model ({len(arch['graph'].get('nodes', []))} nodes)"
    return str(arch["name"])
