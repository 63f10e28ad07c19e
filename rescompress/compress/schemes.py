"""Int8 layouts per deployment runtime, as a torchao PT2E quantizer for ResNet graphs.

Each runtime runs only some int8 layouts fast, so the scheme follows the target:

    scheme        activations                      weights (symmetric, per output channel)   residual Add
    tensorrt      int8, symmetric (zero point 0)   int8 in [-127, 127]                       Q/DQ on both inputs
    onnxruntime   uint8, affine (U8S8)             int8 in [-63, 63] (7-bit, reduced range)  Q/DQ on both inputs
    tflite        int8, affine (any zero point)    int8 in [-127, 127]                       Q/DQ on both inputs

Activations are per tensor; weights are per output channel (axis 0). onnxruntime's U8S8 kernels on x86
CPUs without VNNI add pairs of u8 x s8 products in saturating int16; with 8-bit weights that overflowed
here (the int8 ONNX agreed with the torch int8 model on 72 % of digits test images), 7-bit weights cannot
overflow (255 * 63 * 2 < 32767) and agree on all of them. Conv -> BatchNorm -> ReLU and
Add -> ReLU are quantized as one unit (one observer at the end), which is how every runtime fuses them.
Pooling, flatten and max-pool share their input's quantization parameters, so they stay in int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.fx import GraphModule, Node

from rescompress.compress import pt2e as _pt2e  # noqa: F401  (imports torchao without its kernel-loading chatter)
from torchao.quantization.pt2e import (
    FakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)
from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

SchemeName = Literal["tensorrt", "onnxruntime", "tflite"]
SCHEMES: tuple[str, ...] = ("tensorrt", "onnxruntime", "tflite")
OBSERVERS: tuple[str, ...] = ("minmax", "moving_average", "histogram")


@dataclass(frozen=True)
class Scheme:
    name: str
    act_dtype: torch.dtype
    act_min: int
    act_max: int
    act_symmetric: bool
    summary: str
    weight_max: int = 127  # weights are symmetric in [-weight_max, weight_max]


_SCHEMES = {
    "tensorrt": Scheme("tensorrt", torch.int8, -128, 127, True,
                       "int8 symmetric activations (zero point 0) per tensor, int8 symmetric per-channel weights"),
    "onnxruntime": Scheme("onnxruntime", torch.uint8, 0, 255, False,
                          "uint8 activations per tensor, 7-bit symmetric per-channel weights in int8 (U8S8, "
                          "reduced range)", weight_max=63),
    "tflite": Scheme("tflite", torch.int8, -128, 127, False,
                     "int8 affine activations per tensor, int8 symmetric per-channel weights (LiteRT int8 spec)"),
}


def get_scheme(name: str) -> Scheme:
    return _SCHEMES[name]


def _specs(scheme: Scheme, *, qat: bool, observer: str):
    """(activation spec, weight spec) as torchao QuantizationSpecs."""

    act_qscheme = torch.per_tensor_symmetric if scheme.act_symmetric else torch.per_tensor_affine
    w_qscheme = torch.per_channel_symmetric
    if qat:
        act_ctr = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=scheme.act_min,
                                         quant_max=scheme.act_max, dtype=scheme.act_dtype, qscheme=act_qscheme)
        w_ctr = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-scheme.weight_max,
                                       quant_max=scheme.weight_max,
                                       dtype=torch.int8, qscheme=w_qscheme, ch_axis=0)
    else:
        act_obs = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
                   "histogram": HistogramObserver}[observer]
        act_ctr = act_obs.with_args(eps=2**-12)
        w_ctr = PerChannelMinMaxObserver.with_args(eps=2**-12)
    act = QuantizationSpec(dtype=scheme.act_dtype, quant_min=scheme.act_min, quant_max=scheme.act_max,
                           qscheme=act_qscheme, observer_or_fake_quant_ctr=act_ctr)
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-scheme.weight_max, quant_max=scheme.weight_max,
                              qscheme=w_qscheme, ch_axis=0,
                              observer_or_fake_quant_ctr=w_ctr)
    return act, weight


_aten = torch.ops.aten
_CONV = {_aten.conv2d.default}
_LINEAR = {_aten.linear.default}
_BN = {_aten.batch_norm.default, _aten._native_batch_norm_legit.default,
       _aten._native_batch_norm_legit_no_training.default, _aten.cudnn_batch_norm.default}
_RELU = {_aten.relu.default, _aten.relu_.default}
_ADD = {_aten.add.Tensor, _aten.add_.Tensor}
_SHARED = {_aten.adaptive_avg_pool2d.default, _aten.mean.dim, _aten.max_pool2d.default, _aten.flatten.using_ints,
           _aten.view.default, _aten.reshape.default, _aten.avg_pool2d.default}


def _only_user(node: Node, targets: set) -> Optional[Node]:
    """The single user of `node` when it is one of `targets` (BN outputs go through getitem in some graphs)."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.target in targets:
        return user
    return None


def _bn_output(bn: Node) -> Node:
    """Training-mode batch norm returns a tuple; its first element is the activation."""
    import operator

    getitems = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
    return getitems[0] if getitems else bn


class ResNetQuantizer(Quantizer):
    """A PT2E quantizer for the ResNet family under one runtime's int8 scheme."""

    def __init__(self, scheme: str, *, qat: bool, observer: str = "minmax", keep_float: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.scheme = get_scheme(scheme)
        self.act, self.weight = _specs(self.scheme, qat=qat, observer=observer)
        self.keep_float = tuple(keep_float)  # module names (e.g. "conv1", "fc") left in floating point

    def validate(self, model: GraphModule) -> None:
        pass

    def annotate(self, model: GraphModule) -> GraphModule:
        filters = [get_module_name_filter(name) for name in self.keep_float]
        _annotate(model, self.act, self.weight, skip=lambda n: any(f(n) for f in filters))
        return model


def _annotate(model: GraphModule, act, weight, skip) -> None:
    key = "quantization_annotation"

    def annotated(n: Node) -> bool:
        return key in n.meta and n.meta[key]._annotated

    def mark(n: Node, input_map=None, output=None) -> None:
        n.meta[key] = QuantizationAnnotation(input_qspec_map=input_map or {}, output_qspec=output, _annotated=True)

    for node in model.graph.nodes:
        if node.op != "call_function" or annotated(node) or skip(node):
            continue
        if node.target in _CONV or node.target in _LINEAR:
            x, w = node.args[0], node.args[1]
            chain = [node]
            bn = _only_user(node, _BN)
            if bn is not None:
                chain.append(bn)
                out = _bn_output(bn)
                if out is not bn:
                    chain.append(out)
            relu = _only_user(chain[-1], _RELU)
            if relu is not None:
                chain.append(relu)
            mark(node, {x: act, w: weight}, output=act if len(chain) == 1 else None)
            for n in chain[1:-1]:
                mark(n)
            if len(chain) > 1:
                mark(chain[-1], output=act)
        elif node.target in _ADD and all(isinstance(a, Node) for a in node.args[:2]):
            a, b = node.args[0], node.args[1]
            relu = _only_user(node, _RELU)
            mark(node, {a: act, b: act}, output=None if relu is not None else act)
            if relu is not None:
                mark(relu, output=act)
        elif node.target in _SHARED:
            x = node.args[0]
            if not isinstance(x, Node):
                continue
            mark(node, {x: act}, output=SharedQuantizationSpec((x, node)))
