"""torchao PT2E plumbing shared by QAT and PTQ: capture, prepare, convert, train/eval modes, save and load.

The captured graph uses `torch.export.export(..., strict=True)` with a dynamic batch dimension and an
example batch of 2: non-strict capture leaves residual Adds and the pooling in float, and a batch of 1 would
be specialised into the graph. A converted model is a `GraphModule` of quantize/dequantize ops around the
float convolutions (the QDQ form every runtime's importer understands).

Devices. QAT trains and PTQ calibrates on the recipe's device (accel.py); capture, prepare and convert run
on the CPU, and the prepared graph is moved in between. Each CUDA trap this avoids or checks:

- Capture on CUDA once traced BatchNorm as `cudnn_batch_norm`, which torchao's QAT conv-bn fusion did not
  match, so conv-bn pairs trained unfused (and unannotated). Capture here is always on the CPU (a model on
  another device is captured from a CPU copy), where torch 2.13's export keeps the device-neutral
  `aten.batch_norm`; `check_prepared` then verifies that no convolution feeds a BatchNorm directly (every
  pair fused) and that every convolution's weight passes through an observer or fake-quantizer, and raises
  otherwise instead of training a graph that would not convert as meant.
- prepare_qat_pt2e creates its FakeQuantize and observer state on the CPU whatever device the graph is on
  (pytorch/pytorch#127783). Preparing on the CPU and moving the whole prepared graph afterwards puts the
  observers' buffers on the device with the weights.
- A CPU-captured graph cannot simply be `.cuda()`-ed (pytorch/pytorch#121761): device constants baked into
  nodes (`device=cpu` of factory ops) and plain tensor attributes do not follow `Module.to`. `accel.move`
  rewrites the nodes' device arguments, moves those attributes, and checks that nothing is left behind.
- train/eval on a captured graph are torchao's `move_exported_model_to_train` / `_eval`, which rewrite
  BatchNorm nodes by matching patterns traced on the graph's device (a CUDA trace may name BatchNorm
  differently from the CPU capture). `bind_modes` checks after every switch that each BatchNorm node is in
  the mode asked for, sets the `training` argument itself on any node the pattern missed, and raises for
  one it cannot switch: BatchNorm is never silently left in the wrong mode.
- `convert` always runs on the CPU (a graph on the GPU is moved back first): the int8 graph a GPU run hands
  on is the one a CPU run would, and passes the same export lint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from rescompress.compress.qgraph import is_quantized, scheme_of  # noqa: F401  (re-exported)
from rescompress.fileio import atomic_write

@contextlib.contextmanager
def _quiet_loggers(*names: str):
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


# torchao reports at import which optional CUDA kernels it could not load; none are used here
with _quiet_loggers("torchao", "torch.utils._pytree"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchao.quantization.pt2e  # noqa: F401

_EXTRA = "rescompress.json"


def _dynamic() -> tuple:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def _example(example: torch.Tensor) -> torch.Tensor:
    return example if example.shape[0] >= 2 else example.repeat(2, *([1] * (example.dim() - 1)))


@contextlib.contextmanager
def _quiet():
    """torchao and torch.export log optional-kernel and deprecation chatter at import and capture."""
    with _quiet_loggers("torchao", "torch._dynamo", "torch.export", "torch._export",
                        "torch.fx.experimental.symbolic_shapes"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def capture(model: nn.Module, example: torch.Tensor, *, train: bool) -> GraphModule:
    """The model as an aten graph (strict export, dynamic batch), in train or eval form."""
    model.train(train)
    with _quiet():
        ep = torch.export.export(model, (_example(example),), dynamic_shapes=_dynamic(), strict=True)
    return ep.module()


def bind_modes(model: GraphModule, *, observers: bool = True) -> GraphModule:
    """Give a captured graph working `.train()` / `.eval()`: BatchNorm switches between batch and running
    statistics, and observers only watch data in training mode (evaluation never moves a scale).

    `model.rescompress_freeze_bn` / `model.rescompress_freeze_observers` keep BatchNorm statistics or
    observers fixed from then on, even in training mode (the late phase of QAT)."""
    from torchao.quantization.pt2e import (
        disable_observer,
        enable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    model.rescompress_freeze_bn = False
    model.rescompress_freeze_observers = not observers
    eps = _batch_norm_eps(model)  # torchao's mode switch rewrites them with its pattern's 1e-5

    def _train(self: GraphModule, mode: bool = True) -> GraphModule:
        bn_training = mode and not self.rescompress_freeze_bn
        with _quiet():
            if bn_training:
                move_exported_model_to_train(self)
            else:
                move_exported_model_to_eval(self)
        _restore_batch_norm_eps(self, eps)
        _force_batchnorm_mode(self, bn_training)
        self.apply(enable_observer if mode and not self.rescompress_freeze_observers else disable_observer)
        for m in self.modules():
            m.training = mode
        return self

    model.train = types.MethodType(_train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(lambda self: self.train(False), model)  # type: ignore[method-assign]
    return model


# BatchNorm ops a captured graph may hold, all with `training` as their sixth argument
_BATCH_NORMS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default", "aten.cudnn_batch_norm.default",
                "aten.native_batch_norm.default")


def _batch_norm_nodes(gm: GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in _BATCH_NORMS]


def _running_var(node: Any) -> Optional[str]:
    arg = node.args[4] if len(node.args) > 4 else None
    return arg.target if getattr(arg, "op", None) == "get_attr" else None


def _batch_norm_eps(gm: GraphModule) -> dict[str, float]:
    """Each BatchNorm's epsilon, by the name of its running-variance buffer."""
    return {name: float(n.args[7]) for n in _batch_norm_nodes(gm)
            if (name := _running_var(n)) is not None and len(n.args) > 7}


def _restore_batch_norm_eps(gm: GraphModule, eps: dict[str, float]) -> None:
    """torchao's QAT conv-BatchNorm fusion rewrites every BatchNorm with the pattern's literal epsilon (1e-5),
    both in the BatchNorm node and in its `sqrt(running_var + eps)` weight scaling: a Keras model's 1e-3 would
    silently change once BatchNorm statistics freeze and at conversion. Put each layer's own epsilon back."""
    changed = False
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if str(n.target) in _BATCH_NORMS and (name := _running_var(n)) in eps and len(n.args) > 7:
            if float(n.args[7]) != eps[name]:
                n.args = (*n.args[:7], eps[name], *n.args[8:])
                changed = True
        elif str(n.target) == "aten.add.Tensor" and len(n.args) == 2 and isinstance(n.args[1], float):
            src = n.args[0]
            if getattr(src, "op", None) == "get_attr" and src.target in eps and n.args[1] != eps[src.target]:
                n.args = (src, eps[src.target])
                changed = True
    if changed:
        gm.recompile()


def _force_batchnorm_mode(gm: GraphModule, training: bool) -> None:
    """After torchao's switch: every BatchNorm node uses batch statistics (`training`) or running ones (not).
    A node torchao's pattern did not match (its patterns are traced on the graph's device, and a device may
    trace BatchNorm as another op) gets its `training` argument set directly, the same change the pattern
    makes, keeping the node's own momentum and eps; a node that cannot be switched is an error."""
    fixed = False
    for n in _batch_norm_nodes(gm):
        if len(n.args) > 5 and isinstance(n.args[5], bool) and n.args[5] != training:
            n.args = (*n.args[:5], training, *n.args[6:])
            fixed = True
    if fixed:
        gm.recompile()
    wrong = [n.name for n in _batch_norm_nodes(gm) if len(n.args) <= 5 or bool(n.args[5]) != training]
    if wrong:
        from rescompress.accel import device_of

        raise RuntimeError(f"switching the captured graph to {'training' if training else 'eval'} mode left "
                           f"{len(wrong)} BatchNorm node(s) ({', '.join(wrong[:3])}) in the other mode on "
                           f"{device_of(gm)}: torchao's BatchNorm pattern did not match this graph's ops")


def check_prepared(prepared: GraphModule, keep_float: tuple[str, ...] = ()) -> None:
    """A prepared graph is as the quantizer meant it: no convolution feeds a BatchNorm directly (conv-bn
    pairs fused for QAT, folded for PTQ) and every convolution's weight passes through an observer or
    fake-quantizer (except in the `keep_float` modules). Raises RuntimeError naming the nodes otherwise."""
    convs = [n for n in prepared.graph.nodes if n.op == "call_function" and str(n.target) == "aten.conv2d.default"]
    bns = set(_batch_norm_nodes(prepared))
    unfused = [c.name for c in convs if any(u in bns for u in c.users)]

    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    filters = [get_module_name_filter(name) for name in keep_float]  # as ResNetQuantizer skips them

    def kept(node) -> bool:
        return any(f(node) for f in filters)

    def observed(node) -> bool:  # the weight argument, through the fused pattern's scaling, from an observer
        seen, todo = set(), [node.args[1]]
        while todo:
            arg = todo.pop()
            if not isinstance(arg, torch.fx.Node) or arg in seen:
                continue
            seen.add(arg)
            if arg.op == "call_module":
                return True
            if arg.op == "call_function" and str(arg.target) in ("aten.mul.Tensor", "aten.reshape.default",
                                                                 "aten.view.default"):
                todo.extend(a for a in arg.args if isinstance(a, torch.fx.Node))
        return False

    unobserved = [c.name for c in convs if not kept(c) and not observed(c)]
    if unfused or unobserved:
        from rescompress.accel import device_of

        what = []
        if unfused:
            what.append(f"{len(unfused)} convolution(s) feed BatchNorm unfused ({', '.join(unfused[:3])})")
        if unobserved:
            what.append(f"{len(unobserved)} convolution weight(s) have no observer ({', '.join(unobserved[:3])})")
        raise RuntimeError(f"the prepared int8 graph (on {device_of(prepared)}) is not as the quantizer meant it: "
                           f"{'; '.join(what)}")


def prepare(model: nn.Module, example: torch.Tensor, quantizer, *, qat: bool,
            keep_float: tuple[str, ...] = ()) -> GraphModule:
    """Capture `model` and insert observers (PTQ) or fake-quantize modules (QAT), then check the result
    (`check_prepared`). Capture and preparation run on the CPU (a model elsewhere is captured from a CPU
    copy, and left where it is); the prepared graph is returned on the model's device."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    from rescompress.accel import device_of, move

    device = device_of(model)
    if device.type != "cpu":
        model = move(copy.deepcopy(model), "cpu")
    graph = capture(model, example.cpu(), train=qat)
    eps = _batch_norm_eps(graph)
    with _quiet():
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)
    _restore_batch_norm_eps(prepared, eps)
    check_prepared(prepared, keep_float)
    prepared = bind_modes(prepared)
    return move(prepared, device) if device.type != "cpu" else prepared


_FOLDING_PATCH = threading.Lock()


@contextlib.contextmanager
def _conv2d_bn_folding_only():
    """convert_pt2e folds QAT conv-bn pairs by tracing replacement patterns for conv1d, conv2d and both
    transposed convolutions; a ResNet holds only conv2d, and each skipped pattern family saves seconds.

    torchao's helper is replaced only inside the block and is torchao's own again after it, also when the
    block raises. Conversions in several threads take turns: interleaved, one would save the other's
    replacement as "the original" and leave it installed for good."""
    from torchao.quantization.pt2e import qat_utils

    with _FOLDING_PATCH:
        original = qat_utils._fold_conv_bn_qat_helper

        def conv2d_only(m, conv_fn, example_inputs, is_cuda):
            return original(m, conv_fn, example_inputs, is_cuda) if conv_fn is F.conv2d else m

        qat_utils._fold_conv_bn_qat_helper = conv2d_only
        try:
            yield
        finally:
            qat_utils._fold_conv_bn_qat_helper = original


def convert(prepared: GraphModule) -> GraphModule:
    """Observers/fake-quantizers -> quantize/dequantize ops with int8 weights; BatchNorm folded. Runs on the
    CPU (a prepared graph elsewhere is moved back first) and returns a CPU graph."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from rescompress.accel import device_of, move

    if device_of(prepared).type != "cpu":
        move(prepared, "cpu")
    prepared.eval()
    with _quiet(), _conv2d_bn_folding_only():
        converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return bind_modes(converted, observers=False).eval()


def _drop_unused_tensors(gm: GraphModule) -> None:
    """convert_pt2e folds the int8 weights into new constants but leaves the float parameters they came
    from on the module; drop every parameter or buffer the graph no longer reads."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]:
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, leaf)
    gm.delete_all_unused_submodules()


def calibrate(prepared: GraphModule, batches: Iterable[torch.Tensor], progress: Optional[Callable[[], None]] = None) -> int:
    """Run observers over `batches`; returns the number of images seen."""
    prepared.rescompress_freeze_bn = True  # BatchNorm on its running statistics
    prepared.train()  # observers watch only in training mode
    seen = 0
    with torch.no_grad():
        for x in batches:
            prepared(x)
            seen += len(x)
            if progress:
                progress()
    prepared.eval()
    return seen


def save_quantized(path: Path, model: GraphModule, example: torch.Tensor, meta: dict) -> None:
    """A converted model as a torch.export archive (`.pt2`): graph and int8 tensors, no pickled code."""
    with _quiet():
        ep = torch.export.export(model, (_example(example),), dynamic_shapes=_dynamic(), strict=False)
    atomic_write(path, lambda p: torch.export.save(ep, p, extra_files={_EXTRA: json.dumps(meta)}))


def _refuse_pickled_payloads(path: Path) -> None:
    """torch.export.load unpickles (weights_only=False) any payload the archive marks `use_pickle`; ours
    never has one, so an archive that does is refused before loading."""
    from rescompress.errors import WeightsError

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    if any(meta.get("use_pickle") for meta in config.values()):
                        raise WeightsError(f"{path} holds pickled tensors, which are not loaded for safety; "
                                           f"an int8 checkpoint written by rescompress has none")
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as exc:
        raise WeightsError(f"{path} is not a torch.export archive ({type(exc).__name__})") from None


def load_quantized(path: Path) -> tuple[GraphModule, dict]:
    _refuse_pickled_payloads(path)
    extra = {_EXTRA: ""}
    with _quiet():
        ep = torch.export.load(str(path), extra_files=extra)
    model = bind_modes(ep.module(), observers=False).eval()
    return model, json.loads(extra[_EXTRA] or "{}")
