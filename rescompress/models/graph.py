"""A model built from a declarative graph spec: standard layers plus their wiring, as plain JSON.

Imported models that are not one of the registry's ResNets (a hand-written Keras functional ResNet, an ONNX
graph of Conv/BatchNormalization/Relu/Add/Pool/Gemm) become a `GraphModel`. Every node is a plain torch
module (`nn.Conv2d`, `nn.BatchNorm2d`, `nn.Linear`, one `nn.ReLU` per use, ...) registered under the node's
name, so torch-pruning's dependency graph, `torch.export`, PT2E and every export treat it as a native model,
and its state_dict keys are `<node>.weight` and so on. The spec is plain data: a checkpoint stores it beside
the state_dict and reloads with `torch.load(..., weights_only=True)`.

Spec (all sizes NCHW, paddings as [top, bottom, left, right]):

    {"format": "rescompress-graph", "version": 1,
     "input": {"name": "input", "channels": 3, "height": 224, "width": 224},
     "nodes": [{"name": "conv1", "op": "conv", "inputs": ["input"], "in_channels": 3, "out_channels": 64,
                "kernel": [7, 7], "stride": [2, 2], "padding": [3, 3, 3, 3], "dilation": [1, 1],
                "groups": 1, "bias": false}, ...],
     "output": "fc"}

Ops: conv, batchnorm (features, eps), relu, add, pad (zeros), maxpool (kernel, stride, padding),
avgpool (kernel, stride, padding, count_include_pad), global_avgpool (keepdims), flatten, linear
(in_features, out_features, bias).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

GRAPH_FORMAT = "rescompress-graph"
GRAPH_VERSION = 1
GRAPH_ARCH = "graph"  # the arch name under which a checkpoint records a graph model
OPS = ("conv", "batchnorm", "relu", "add", "pad", "maxpool", "avgpool", "global_avgpool", "flatten", "linear")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GraphSpecError(ValueError):
    """The graph spec is malformed (unknown op, missing input, bad field)."""


def module_name(raw: str, taken: Iterable[str] = ()) -> str:
    """A valid, unused module name for a layer or tensor name ("conv2_block1/1:0" -> "conv2_block1_1_0")."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", raw).strip("_") or "node"
    if not name[0].isalpha() and name[0] != "_":
        name = f"n_{name}"
    taken = set(taken)
    out, n = name, 1
    while out in taken or out in _RESERVED:
        n += 1
        out = f"{name}_{n}"
    return out


_RESERVED = {"input", "forward", "training", "spec", "steps", "classifier_name", "stage_names"}


class Add(nn.Module):
    """The element-wise sum of its inputs (a residual join)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class GlobalAvgPool(nn.Module):
    def __init__(self, keepdims: bool) -> None:
        super().__init__()
        self.keepdims = keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


class MaxPoolPadded(nn.Module):
    """Max pooling over a padding torch's MaxPool2d cannot express (asymmetric, as TensorFlow's 'same'): the
    padded cells never win, as in TensorFlow."""

    def __init__(self, kernel: list[int], stride: list[int], padding: list[int]) -> None:
        super().__init__()
        top, bottom, left, right = padding
        self.pad = (left, right, top, bottom)
        self.pool = nn.MaxPool2d(tuple(kernel), tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(nn.functional.pad(x, self.pad, value=float("-inf")))


def _pair(v: Any, field: str, node: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    raise GraphSpecError(f"node '{node}': {field} must be an int or a pair of ints, got {v!r}")


def _pads(v: Any, node: str) -> list[int]:
    if isinstance(v, (list, tuple)) and len(v) == 4 and all(isinstance(i, int) and i >= 0 for i in v):
        return [int(i) for i in v]
    raise GraphSpecError(f"node '{node}': padding must be [top, bottom, left, right] of non-negative ints, got {v!r}")


def _symmetric(p: list[int]) -> bool:
    return p[0] == p[1] and p[2] == p[3]


def _modules(node: Mapping[str, Any]) -> list[tuple[str, nn.Module]]:
    """The modules one spec node becomes, as (suffix, module); an asymmetric conv padding is its own
    ZeroPad2d step before the conv."""
    op, name = node["op"], node["name"]
    if op == "conv":
        pads = _pads(node.get("padding", [0, 0, 0, 0]), name)
        pre = []
        if not _symmetric(pads):
            pre = [("_pad", nn.ZeroPad2d((pads[2], pads[3], pads[0], pads[1])))]
            pads = [0, 0, 0, 0]
        conv = nn.Conv2d(int(node["in_channels"]), int(node["out_channels"]), _pair(node["kernel"], "kernel", name),
                         stride=_pair(node.get("stride", 1), "stride", name), padding=(pads[0], pads[2]),
                         dilation=_pair(node.get("dilation", 1), "dilation", name), groups=int(node.get("groups", 1)),
                         bias=bool(node.get("bias", True)))
        return pre + [("", conv)]
    if op == "batchnorm":
        return [("", nn.BatchNorm2d(int(node["features"]), eps=float(node.get("eps", 1e-5))))]
    if op == "relu":
        return [("", nn.ReLU())]
    if op == "add":
        return [("", Add())]
    if op == "pad":
        t, b, l, r = _pads(node["padding"], name)
        return [("", nn.ZeroPad2d((l, r, t, b)))]
    if op == "maxpool":
        pads = _pads(node.get("padding", [0, 0, 0, 0]), name)
        kernel = _pair(node["kernel"], "kernel", name)
        stride = _pair(node.get("stride", kernel), "stride", name)
        if _symmetric(pads) and pads[0] * 2 <= kernel[0] and pads[2] * 2 <= kernel[1]:
            return [("", nn.MaxPool2d(kernel, stride, padding=(pads[0], pads[2])))]
        return [("", MaxPoolPadded(list(kernel), list(stride), pads))]
    if op == "avgpool":
        pads = _pads(node.get("padding", [0, 0, 0, 0]), name)
        kernel = _pair(node["kernel"], "kernel", name)
        if not _symmetric(pads) or pads[0] * 2 > kernel[0] or pads[2] * 2 > kernel[1]:
            raise GraphSpecError(f"node '{name}': average pooling with padding {pads} (asymmetric, or over half "
                                 "the kernel) is not supported")
        return [("", nn.AvgPool2d(kernel, _pair(node.get("stride", kernel), "stride", name), padding=(pads[0], pads[2]),
                                  count_include_pad=bool(node.get("count_include_pad", True))))]
    if op == "global_avgpool":
        return [("", GlobalAvgPool(bool(node.get("keepdims", False))))]
    if op == "flatten":
        return [("", nn.Flatten(1))]
    if op == "linear":
        return [("", nn.Linear(int(node["in_features"]), int(node["out_features"]), bias=bool(node.get("bias", True))))]
    raise GraphSpecError(f"node '{name}': unknown op '{op}' (supported: {', '.join(OPS)})")


def check_spec(spec: Mapping[str, Any]) -> None:
    """Raise GraphSpecError unless `spec` is a well-formed graph spec of this version."""
    if not isinstance(spec, Mapping) or spec.get("format") != GRAPH_FORMAT:
        raise GraphSpecError(f"not a {GRAPH_FORMAT} spec")
    if int(spec.get("version", 0)) > GRAPH_VERSION:
        raise GraphSpecError(f"graph spec version {spec.get('version')} is newer than this rescompress reads "
                             f"({GRAPH_VERSION}); upgrade rescompress")
    inp = spec.get("input") or {}
    known = {inp.get("name", "input")}
    for node in spec.get("nodes", []):
        name = node.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
            raise GraphSpecError(f"node name {name!r} is not a valid module name")
        if name in known:
            raise GraphSpecError(f"node name '{name}' is used twice")
        if node.get("op") not in OPS:
            raise GraphSpecError(f"node '{name}': unknown op '{node.get('op')}' (supported: {', '.join(OPS)})")
        missing = [i for i in node.get("inputs", []) if i not in known]
        if missing or not node.get("inputs"):
            raise GraphSpecError(f"node '{name}' reads {missing or 'nothing'}, which no earlier node produces")
        known.add(name)
    if spec.get("output") not in known:
        raise GraphSpecError(f"the graph's output '{spec.get('output')}' is not a node")


class GraphModel(nn.Module):
    """Runs the nodes of a graph spec in order; see the module docstring for the spec."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        check_spec(spec)
        self.spec = _plain(spec)
        self.input_name = spec["input"].get("name", "input")
        self.output_name = spec["output"]
        steps = []
        for node in spec["nodes"]:
            parts = _modules(node)
            inputs = list(node["inputs"])
            for suffix, module in parts:
                step = node["name"] + suffix
                if suffix and step in self._modules:
                    raise GraphSpecError(f"node '{node['name']}': its helper name '{step}' is taken")
                self.add_module(step, module)
                steps.append((step, tuple(inputs)))
                inputs = [step]
        self.steps = steps  # (module name, input names), in execution order; the last step of a node has its name
        nodes = {n["name"]: n for n in spec["nodes"]}
        out = nodes.get(self.output_name)
        self.classifier_name = self.output_name if out is not None and out["op"] == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for name, inputs in self.steps:
            env[name] = self._modules[name](*[env[i] for i in inputs])
        return env[self.output_name]

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every node's output, by node name (for locating where an import first differs from its source)."""
        env = {self.input_name: x}
        for name, inputs in self.steps:
            env[name] = self._modules[name](*[env[i] for i in inputs])
        return env


def _plain(obj: Any) -> Any:
    """A JSON-like deep copy (dicts, lists, str, int, float, bool, None), as a checkpoint stores it."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def with_classes(spec: Mapping[str, Any], num_classes: int) -> dict:
    """A copy of `spec` whose classifier (the output linear node) has `num_classes` outputs."""
    spec = _plain(spec)
    for node in spec["nodes"]:
        if node["name"] == spec["output"]:
            if node["op"] != "linear":
                raise GraphSpecError(f"the graph ends in a {node['op']} node, not a classifier: its class count "
                                     "cannot be changed")
            node["out_features"] = int(num_classes)
    return spec


def spec_classes(spec: Mapping[str, Any]) -> int | None:
    """The class count of the graph's classifier, or None when it does not end in one."""
    for node in spec.get("nodes", []):
        if node["name"] == spec.get("output") and node["op"] == "linear":
            return int(node["out_features"])
    return None
