"""keras.applications ResNet50/101/152 (v1) and ResNet50V2/101V2/152V2, recognised by their layer names and
wiring and imported weight for weight onto the registry's `resnet*_keras` / `resnet*v2_keras` models.

Recognised: the application as built (include_top=True, Dense 'predictions'), or include_top=False followed
by GlobalAveragePooling2D (or pooling='avg'), any Dropouts, one Dense and optionally a softmax layer, with
any names; the backbone may be the model itself or one nested model inside it. Anything else is not matched,
so that the caller can fall back to a generic graph import. TensorFlow is imported only by the importer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from rescompress.errors import ModelImportError
from rescompress.imports.base import Imported, SourceInput, check_size

_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_WIDTHS = (64, 128, 256, 512)
_EPS = 1.001e-5
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_BGR = [2, 1, 0]


@dataclass
class _Match:
    name: str  # registry name
    version: int  # 1 (ResNet50) or 2 (ResNet50V2)
    depths: tuple[int, ...]
    backbone: Any  # the Keras model whose layers are conv1_conv, conv2_block1_..., possibly nested in the model
    nested: bool
    head: list = field(default_factory=list)  # the layers after the features, in order: GAP, Dropout*, Dense, softmax?
    dense: Any = None
    softmax: Optional[str] = None  # where a softmax was dropped: "Dense" or a layer name

    @property
    def architecture(self) -> str:
        return f"keras.applications ResNet{_DEPTHS[self.depths]}{'V2' if self.version == 2 else ''}"


def match_keras_application(kmodel: Any) -> Optional[str]:
    """The registry name (e.g. "resnet50_keras", "resnet101v2_keras") of the keras.applications ResNet that
    `kmodel` is, or None when it is anything else."""
    found = _match(kmodel)
    return None if found is None else found.name


def import_keras_application(kmodel: Any, name: str, path: Union[str, Path], *,
                             image_size: Union[int, Sequence[int], None] = None) -> Imported:
    """Import `kmodel` (recognised by `match_keras_application` as `name`) onto the registry model `name`.

    Every weight is copied (conv kernels HWIO -> OIHW, the Dense kernel transposed, BatchNorm statistics;
    a conv bias followed by a BatchNorm is folded into its running mean). 'caffe' models (v1) take BGR: the
    first conv's input channels are reordered so that the torch model takes RGB. `image_size` (an int or
    (height, width)) is needed when the Keras input has no fixed size.
    """
    from rescompress.models.arch import build_arch

    found = _match(kmodel)
    if found is None or found.name != name:
        what = "no keras.applications ResNet" if found is None else f"{found.architecture}, not {name}"
        raise ModelImportError(f"{path}: the Keras model is {what}")
    height, width, channels = _input_size(kmodel, path, image_size)

    arch = {"name": name, "num_classes": int(found.dense.units), "in_channels": channels, "small_input": False}
    model = build_arch(arch).eval()
    caffe = found.version == 1 and channels == 3
    layer_map, folded, consumed = _copy_weights(model, found, path, first_conv_order=_BGR if caffe else None)
    _check_all_consumed(found, consumed, path)

    notes = []
    if found.softmax:
        where = f"Dense '{found.dense.name}'" if found.softmax == "Dense" else f"layer '{found.softmax}'"
        notes.append(f"the softmax of {where} is dropped: the torch model emits logits, and fc matches "
                     f"Dense '{found.dense.name}' before the softmax")
    if folded:
        notes.append(f"{folded} conv biases are folded into the following BatchNorm (running_mean -= bias)")
    if caffe:
        notes.append("the first conv's input channels are reversed: the torch model takes RGB, Keras BGR")
    for layer in found.head:
        if type(layer).__name__ == "Dropout":
            notes.append(f"Dropout '{layer.name}' is the identity at inference and has no torch module")
    if found.nested:
        notes.append(f"the backbone is the nested model '{found.backbone.name}'; layer_map names its layers "
                     f"'{found.backbone.name}/<layer>'")

    if caffe:
        mean = [m / 255.0 for m in reversed(_CAFFE_MEAN_BGR)]
        normalization: Optional[dict] = {"mean": mean, "std": [1 / 255.0] * 3}
        preprocessing = ("keras.applications 'caffe': BGR, 0..255 minus the ImageNet mean "
                         f"{list(_CAFFE_MEAN_BGR)} (BGR order), no std")
        source_input = SourceInput(layout="NHWC", channel_order=list(_BGR))
    elif found.version == 2:
        normalization = {"mean": [0.5] * channels, "std": [0.5] * channels}
        preprocessing = "keras.applications 'tf': x / 127.5 - 1 on 0..255 RGB pixels"
        source_input = SourceInput(layout="NHWC")
    else:
        normalization = None
        preprocessing = f"unknown: keras.applications 'caffe' preprocessing is defined for 3 channels, not {channels}"
        source_input = SourceInput(layout="NHWC")

    return Imported(
        model=model, arch=arch, channels=channels, height=height, width=width, normalization=normalization,
        preprocessing=preprocessing, source_input=source_input,
        source={"path": str(path), "format": "keras", "runtime": _runtime(kmodel),
                "architecture": found.architecture},
        layer_map=layer_map, notes=notes)


# --- recognition ---------------------------------------------------------------------------------------------

def _match(kmodel: Any) -> Optional[_Match]:
    try:
        return _match_or_fail(kmodel)
    except (_NoMatch, AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None


class _NoMatch(Exception):
    pass


def _need(cond: bool) -> None:
    if not cond:
        raise _NoMatch


def _match_or_fail(kmodel: Any) -> _Match:
    layers = list(kmodel.layers)
    _need(len(kmodel.inputs) == 1 and len(kmodel.outputs) == 1)
    if any(layer.name == "conv1_conv" for layer in layers):
        backbone, nested = kmodel, False
    else:
        inner = [layer for layer in layers if hasattr(layer, "layers")
                 and any(sub.name == "conv1_conv" for sub in layer.layers)]
        _need(len(inner) == 1)
        backbone, nested = inner[0], True
    by_name = {layer.name: layer for layer in backbone.layers}
    _need(len(by_name) == len(backbone.layers) and len(backbone.inputs) == 1 and len(backbone.outputs) == 1)
    version = 2 if "post_bn" in by_name else 1

    depths = []
    for stage in range(2, 6):
        n = 0
        while f"conv{stage}_block{n + 1}_out" in by_name:
            n += 1
        depths.append(n)
    depths_t = tuple(depths)
    _need(depths_t in _DEPTHS and not any(name.startswith("conv6_") for name in by_name))

    spec = _SpecChecker(by_name)
    source = _producer(backbone.inputs[0])
    _need(type(by_name.get(source)).__name__ == "InputLayer")
    spec.used.add(source)
    feature = (_check_v1 if version == 1 else _check_v2)(spec, source, depths_t)

    head_in_backbone = [layer for layer in backbone.layers if layer.name not in spec.used]
    prev = _chain(head_in_backbone, feature)
    _need(_producer(backbone.outputs[0]) == prev)
    head = list(head_in_backbone)
    if nested:
        source = _producer(kmodel.inputs[0])
        calls = [node for node in backbone._inbound_nodes
                 if [_producer(t) for t in _node_inputs(node)] == [source]]
        _need(len(calls) == 1)
        rest = [layer for layer in layers if layer is not backbone and layer.name != source]
        _need(all(type(layer).__name__ != "InputLayer" for layer in rest))
        prev = _chain(rest, backbone.name)
        head += rest
    _need(_producer(kmodel.outputs[0]) == prev)
    dense, softmax = _check_head(head)
    suffix = "v2_keras" if version == 2 else "_keras"
    return _Match(name=f"resnet{_DEPTHS[depths_t]}{suffix}", version=version, depths=depths_t, backbone=backbone,
                  nested=nested, head=head, dense=dense, softmax=softmax)


def _node_inputs(node: Any) -> list:
    tensors = node.input_tensors
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def _producer(tensor: Any) -> str:
    return tensor._keras_history[0].name


def _inputs(layer: Any) -> list[str]:
    nodes = layer._inbound_nodes
    _need(len(nodes) == 1)
    return [_producer(t) for t in _node_inputs(nodes[0])]


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, str):
        return value.lower()
    return value


class _SpecChecker:
    """Checks named layers against the expected kind, inputs and configuration, and records them as used."""

    def __init__(self, by_name: dict[str, Any]) -> None:
        self.by_name = by_name
        self.used: set[str] = set()

    def __call__(self, name: str, kind: str, inputs: Sequence[str], **config: Any) -> str:
        layer = self.by_name.get(name)
        _need(layer is not None and type(layer).__name__ == kind and name not in self.used)
        _need(sorted(_inputs(layer)) == sorted(inputs))
        _check_config(layer, kind, config)
        self.used.add(name)
        return name


def _check_config(layer: Any, kind: str, want: dict[str, Any]) -> None:
    cfg = layer.get_config()
    if "data_format" in cfg:
        _need(cfg["data_format"] in (None, "channels_last"))
    if kind == "Conv2D":
        _need(_norm(cfg.get("dilation_rate", (1, 1))) in ((1, 1), 1) and cfg.get("groups", 1) == 1)
        _need(_norm(cfg.get("activation")) == "linear")
    elif kind == "BatchNormalization":
        axis = cfg.get("axis")
        _need(_norm(axis if isinstance(axis, (list, tuple)) else [axis]) in ((3,), (-1,)))
        _need(cfg.get("center", True) and cfg.get("scale", True) and not cfg.get("renorm", False))
        _need(math.isclose(float(cfg["epsilon"]), _EPS, rel_tol=1e-6))
    elif kind == "Activation":
        _need(_norm(cfg.get("activation")) == "relu")
    for key, value in want.items():
        _need(_norm(cfg.get(key)) == _norm(value))


def _check_v1(c: _SpecChecker, source: str, depths: tuple[int, ...]) -> str:
    c("conv1_pad", "ZeroPadding2D", [source], padding=((3, 3), (3, 3)))
    c("conv1_conv", "Conv2D", ["conv1_pad"], filters=64, kernel_size=(7, 7), strides=(2, 2), padding="valid")
    c("conv1_bn", "BatchNormalization", ["conv1_conv"])
    c("conv1_relu", "Activation", ["conv1_bn"])
    c("pool1_pad", "ZeroPadding2D", ["conv1_relu"], padding=((1, 1), (1, 1)))
    prev = c("pool1_pool", "MaxPooling2D", ["pool1_pad"], pool_size=(3, 3), strides=(2, 2), padding="valid")
    for stage, (depth, width) in enumerate(zip(depths, _WIDTHS), start=2):
        for i in range(1, depth + 1):
            b = f"conv{stage}_block{i}"
            s = 2 if i == 1 and stage > 2 else 1
            shortcut = prev
            if i == 1:
                c(f"{b}_0_conv", "Conv2D", [prev], filters=4 * width, kernel_size=(1, 1), strides=(s, s),
                  padding="valid")
                shortcut = c(f"{b}_0_bn", "BatchNormalization", [f"{b}_0_conv"])
            c(f"{b}_1_conv", "Conv2D", [prev], filters=width, kernel_size=(1, 1), strides=(s, s), padding="valid")
            c(f"{b}_1_bn", "BatchNormalization", [f"{b}_1_conv"])
            c(f"{b}_1_relu", "Activation", [f"{b}_1_bn"])
            c(f"{b}_2_conv", "Conv2D", [f"{b}_1_relu"], filters=width, kernel_size=(3, 3), strides=(1, 1),
              padding="same")
            c(f"{b}_2_bn", "BatchNormalization", [f"{b}_2_conv"])
            c(f"{b}_2_relu", "Activation", [f"{b}_2_bn"])
            c(f"{b}_3_conv", "Conv2D", [f"{b}_2_relu"], filters=4 * width, kernel_size=(1, 1), strides=(1, 1),
              padding="valid")
            c(f"{b}_3_bn", "BatchNormalization", [f"{b}_3_conv"])
            c(f"{b}_add", "Add", [shortcut, f"{b}_3_bn"])
            prev = c(f"{b}_out", "Activation", [f"{b}_add"])
    return prev


def _check_v2(c: _SpecChecker, source: str, depths: tuple[int, ...]) -> str:
    c("conv1_pad", "ZeroPadding2D", [source], padding=((3, 3), (3, 3)))
    c("conv1_conv", "Conv2D", ["conv1_pad"], filters=64, kernel_size=(7, 7), strides=(2, 2), padding="valid")
    c("pool1_pad", "ZeroPadding2D", ["conv1_conv"], padding=((1, 1), (1, 1)))
    prev = c("pool1_pool", "MaxPooling2D", ["pool1_pad"], pool_size=(3, 3), strides=(2, 2), padding="valid")
    for stage, (depth, width) in enumerate(zip(depths, _WIDTHS), start=2):
        for i in range(1, depth + 1):
            b = f"conv{stage}_block{i}"
            s = 2 if i == depth and stage < 5 else 1
            c(f"{b}_preact_bn", "BatchNormalization", [prev])
            c(f"{b}_preact_relu", "Activation", [f"{b}_preact_bn"])
            if i == 1:
                shortcut = c(f"{b}_0_conv", "Conv2D", [f"{b}_preact_relu"], filters=4 * width, kernel_size=(1, 1),
                             strides=(s, s), padding="valid")
            elif s > 1:
                shortcut = _strided_identity(c, f"{b}_out", f"{b}_3_conv", prev, s)
            else:
                shortcut = prev
            c(f"{b}_1_conv", "Conv2D", [f"{b}_preact_relu"], filters=width, kernel_size=(1, 1), strides=(1, 1),
              padding="valid")
            c(f"{b}_1_bn", "BatchNormalization", [f"{b}_1_conv"])
            c(f"{b}_1_relu", "Activation", [f"{b}_1_bn"])
            c(f"{b}_2_pad", "ZeroPadding2D", [f"{b}_1_relu"], padding=((1, 1), (1, 1)))
            c(f"{b}_2_conv", "Conv2D", [f"{b}_2_pad"], filters=width, kernel_size=(3, 3), strides=(s, s),
              padding="valid")
            c(f"{b}_2_bn", "BatchNormalization", [f"{b}_2_conv"])
            c(f"{b}_2_relu", "Activation", [f"{b}_2_bn"])
            c(f"{b}_3_conv", "Conv2D", [f"{b}_2_relu"], filters=4 * width, kernel_size=(1, 1), strides=(1, 1),
              padding="valid")
            prev = c(f"{b}_out", "Add", [shortcut, f"{b}_3_conv"])
    c("post_bn", "BatchNormalization", [prev])
    return c("post_relu", "Activation", ["post_bn"])


def _strided_identity(c: _SpecChecker, add: str, branch: str, block_input: str, stride: int) -> str:
    """The unnamed MaxPooling2D(1, stride) that subsamples a V2 block's input for its Add."""
    others = [name for name in _inputs(c.by_name[add]) if name != branch]
    _need(len(others) == 1)
    return c(others[0], "MaxPooling2D", [block_input], pool_size=(1, 1), strides=(stride, stride), padding="valid")


def _chain(layers: list, prev: str) -> str:
    for layer in layers:
        _need(_inputs(layer) == [prev])
        prev = layer.name
    return prev


def _check_head(head: list) -> tuple[Any, Optional[str]]:
    kinds = [type(layer).__name__ for layer in head]
    _need(len(head) >= 2 and kinds[0] == "GlobalAveragePooling2D")
    cfg = head[0].get_config()
    _need(not cfg.get("keepdims", False) and cfg.get("data_format") in (None, "channels_last"))
    i = 1
    while i < len(head) and kinds[i] == "Dropout":
        i += 1
    _need(i < len(head) and kinds[i] == "Dense")
    dense = head[i]
    activation = _norm(dense.get_config().get("activation"))
    _need(activation in ("linear", "softmax"))
    softmax = "Dense" if activation == "softmax" else None
    tail = head[i + 1:]
    if tail:
        _need(len(tail) == 1 and softmax is None)
        layer, kind = tail[0], kinds[i + 1]
        cfg = layer.get_config()
        if kind == "Activation":
            _need(_norm(cfg.get("activation")) == "softmax")
        else:
            _need(kind == "Softmax" and _norm(cfg.get("axis", -1)) in (-1, 1, (-1,), (1,)))
        softmax = layer.name
    return dense, softmax


# --- import --------------------------------------------------------------------------------------------------

def _input_size(kmodel: Any, path: Union[str, Path], image_size: Any) -> tuple[int, int, int]:
    shape = tuple(kmodel.input_shape)
    _, h, w, c = shape
    if c is None:
        raise ModelImportError(f"{path}: the Keras model's input {shape} has no channel count")
    want: tuple[Optional[int], Optional[int]] = (None, None)
    if image_size is not None:
        want = (int(image_size), int(image_size)) if isinstance(image_size, (int, np.integer)) else \
            (int(image_size[0]), int(image_size[1]))
    if h is None or w is None:
        if image_size is None:
            raise ModelImportError(f"{path}: the Keras model takes any image size (input {shape}); give "
                                   "image_size (e.g. 224) to import it")
    check_size(str(path), h if h is not None else want[0], want[0], "height")
    check_size(str(path), w if w is not None else want[1], want[1], "width")
    return int(h if h is not None else want[0]), int(w if w is not None else want[1]), int(c)


def _pairs(found: _Match) -> list[tuple[str, str, str]]:
    """(torch module, Keras layer, kind) for every weight-bearing or output-matching module, in order."""
    out: list[tuple[str, str, str]] = []
    if found.version == 1:
        out += [("conv1", "conv1_conv", "conv"), ("bn1", "conv1_bn", "bn"), ("relu", "conv1_relu", "out"),
                ("maxpool", "pool1_pool", "out")]
    else:
        out += [("conv1", "conv1_conv", "conv"), ("maxpool", "pool1_pool", "out")]
    for stage, depth in enumerate(found.depths, start=2):
        layer = f"layer{stage - 1}"
        for i in range(1, depth + 1):
            t, k = f"{layer}.{i - 1}", f"conv{stage}_block{i}"
            if found.version == 1:
                if i == 1:
                    out += [(f"{t}.downsample.0", f"{k}_0_conv", "conv"), (f"{t}.downsample.1", f"{k}_0_bn", "bn")]
                for j in (1, 2, 3):
                    out += [(f"{t}.conv{j}", f"{k}_{j}_conv", "conv"), (f"{t}.bn{j}", f"{k}_{j}_bn", "bn")]
                    if j < 3:
                        out.append((f"{t}.relu{j}", f"{k}_{j}_relu", "out"))
                out += [(f"{t}.relu3", f"{k}_out", "out"), (t, f"{k}_out", "out")]
            else:
                out += [(f"{t}.bn0", f"{k}_preact_bn", "bn"), (f"{t}.relu0", f"{k}_preact_relu", "out")]
                if i == 1:
                    out.append((f"{t}.downsample", f"{k}_0_conv", "conv"))
                for j in (1, 2):
                    out += [(f"{t}.conv{j}", f"{k}_{j}_conv", "conv"), (f"{t}.bn{j}", f"{k}_{j}_bn", "bn"),
                            (f"{t}.relu{j}", f"{k}_{j}_relu", "out")]
                out += [(f"{t}.conv3", f"{k}_3_conv", "conv"), (t, f"{k}_out", "out")]
        out.append((layer, f"conv{stage}_block{depth}_out", "out"))
    if found.version == 2:
        out += [("post_bn", "post_bn", "bn"), ("post_relu", "post_relu", "out")]
    return out


def _weights(layer: Any, path: Union[str, Path]) -> list[np.ndarray]:
    arrays = [np.asarray(w, dtype=np.float64) for w in layer.get_weights()]
    for a in arrays:
        if not np.isfinite(a).all():
            raise ModelImportError(f"{path}: layer '{layer.name}' holds NaN or Inf weights")
    return arrays


def _copy_weights(model: Any, found: _Match, path: Union[str, Path], *,
                  first_conv_order: Optional[list[int]]) -> tuple[dict[str, str], int, set[str]]:
    import torch

    current = model.state_dict()
    new: dict[str, Any] = {}
    layer_map: dict[str, str] = {}
    consumed: set[str] = set()
    prefix = f"{found.backbone.name}/" if found.nested else ""
    bn_after = {}  # torch BN -> the bias of the conv before it, still to fold
    folded = 0

    def put(key: str, value: np.ndarray, layer: Any) -> None:
        want = tuple(current[key].shape)
        if tuple(value.shape) != want:
            raise ModelImportError(f"{path}: layer '{layer.name}' has shape {list(value.shape)} where "
                                   f"{key} needs {list(want)}")
        new[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

    by_name = {layer.name: layer for layer in found.backbone.layers}
    pairs = _pairs(found)
    bn_of_conv = {t: nxt for (t, _, kind), (nxt, _, nkind) in zip(pairs, pairs[1:]) if (kind, nkind) == ("conv", "bn")}
    for t, k, kind in pairs:
        layer = by_name[k]
        if kind == "conv":
            consumed.add(k)
            kernel, *bias = _weights(layer, path)
            w = kernel.transpose(3, 2, 0, 1)
            if t == "conv1" and first_conv_order is not None:
                swapped = np.empty_like(w)
                swapped[:, first_conv_order] = w
                w = swapped
            put(f"{t}.weight", w, layer)
            has_bias = f"{t}.bias" in current
            if t in bn_of_conv and not has_bias:
                if bias:
                    bn_after[bn_of_conv[t]] = bias[0]
                    folded += 1
                else:
                    layer_map[t] = prefix + k
            elif has_bias:
                put(f"{t}.bias", bias[0] if bias else np.zeros(w.shape[0]), layer)
                layer_map[t] = prefix + k
            else:
                raise ModelImportError(f"{path}: layer '{k}' has a bias that {t} cannot hold")
        elif kind == "bn":
            consumed.add(k)
            gamma, beta, mean, var = _weights(layer, path)
            put(f"{t}.weight", gamma, layer)
            put(f"{t}.bias", beta, layer)
            put(f"{t}.running_mean", mean - bn_after.pop(t, 0.0), layer)
            put(f"{t}.running_var", var, layer)
            layer_map[t] = prefix + k
        else:
            layer_map[t] = prefix + k

    dense = found.dense
    consumed.add(dense.name)
    kernel, *bias = _weights(dense, path)
    put("fc.weight", kernel.T, dense)
    put("fc.bias", bias[0] if bias else np.zeros(kernel.shape[1]), dense)
    layer_map["fc"] = dense.name

    missing = [key for key in current if key not in new and not key.endswith("num_batches_tracked")]
    if missing:
        raise ModelImportError(f"{path}: no Keras weights for {', '.join(missing[:5])}")
    model.load_state_dict({**current, **new}, assign=True)
    return layer_map, folded, consumed


def _check_all_consumed(found: _Match, consumed: set[str], path: Union[str, Path]) -> None:
    for layer in [*found.backbone.layers, *found.head]:
        if layer.name not in consumed and layer.weights and layer is not found.backbone:
            raise ModelImportError(f"{path}: the weights of layer '{layer.name}' ({type(layer).__name__}) "
                                   "have no place in the torch model")


def _runtime(kmodel: Any) -> str:
    import tensorflow as tf

    if type(kmodel).__module__.startswith("tf_keras"):
        import tf_keras as keras
    else:
        import keras
    return f"tensorflow {tf.__version__} (keras {keras.__version__})"
