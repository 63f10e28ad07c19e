"""torchao PT2E plumbing shared by QAT and PTQ: capture, prepare, convert, train/eval modes, save and load.

The captured graph uses `torch.export.export(..., strict=True)` with a dynamic batch dimension and an
example batch of 2: non-strict capture leaves residual Adds and the pooling in float, and a batch of 1 would
be specialised into the graph. A converted model is a `GraphModule` of quantize/dequantize ops around the
float convolutions (the QDQ form every runtime's importer understands).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import types
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Optional

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

    def _train(self: GraphModule, mode: bool = True) -> GraphModule:
        with _quiet():
            if mode and not self.rescompress_freeze_bn:
                move_exported_model_to_train(self)
            else:
                move_exported_model_to_eval(self)
        self.apply(enable_observer if mode and not self.rescompress_freeze_observers else disable_observer)
        for m in self.modules():
            m.training = mode
        return self

    model.train = types.MethodType(_train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(lambda self: self.train(False), model)  # type: ignore[method-assign]
    return model


def prepare(model: nn.Module, example: torch.Tensor, quantizer, *, qat: bool) -> GraphModule:
    """Capture `model` and insert observers (PTQ) or fake-quantize modules (QAT)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    graph = capture(model, example, train=qat)
    with _quiet():
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)
    return bind_modes(prepared)


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
    """Observers/fake-quantizers -> quantize/dequantize ops with int8 weights; BatchNorm folded."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

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
