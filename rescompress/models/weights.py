"""Read weight files safely, load them into a model with clear mismatch errors, and freeze layers."""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rescompress.errors import WeightsError
from rescompress.models.resnet import CLASSIFIER
from rescompress.registry import suggest

FREEZE_MODES = ("none", "backbone", "stages_1_2")
_FREEZE_PREFIXES = {"stages_1_2": ("conv1.", "bn1.", "layer1.", "layer2.")}
_HEAD_KEYS = (f"{CLASSIFIER}.weight", f"{CLASSIFIER}.bias")
_MAX_LISTED = 5

# (block, depths) -> registry name, for guess_architecture
_KNOWN = {
    ("Bottleneck", (3, 4, 6, 3)): ("resnet50", (64, 128, 256, 512)),
    ("Bottleneck", (3, 4, 23, 3)): ("resnet101", (64, 128, 256, 512)),
    ("Bottleneck", (3, 8, 36, 3)): ("resnet152", (64, 128, 256, 512)),
    ("BasicBlock", (2, 2, 2, 2)): ("resnet18", (64, 128, 256, 512)),
    ("BasicBlock", (3, 4, 6, 3)): ("resnet34", (64, 128, 256, 512)),
    ("BasicBlock", (3, 3, 3)): ("resnet20", (16, 32, 64)),
    ("BasicBlock", (5, 5, 5)): ("resnet32", (16, 32, 64)),
    ("BasicBlock", (9, 9, 9)): ("resnet56", (16, 32, 64)),
    ("BasicBlock", (1, 1, 1)): ("resnet_tiny", (8, 16, 32)),
}


@dataclass
class LoadReport:
    """What `load_weights` did."""

    path: str
    loaded: int  # tensors copied into the model
    head_replaced: bool  # True when the file's classifier had another class count and was not loaded
    source_classes: int | None  # class count of the file's classifier, None when it has none
    note: str


def _unreadable(path: Path, err: Exception) -> WeightsError:
    text = str(err)
    code = re.search(r"GLOBAL (\S+)", text)
    if code:
        return WeightsError(
            f"cannot read weights file {path}: it needs pickled Python code ({code.group(1)}), which is not "
            "loaded for safety; only tensors and state_dicts are accepted (save model.state_dict() instead)"
        )
    lines = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    detail = lines[0].split(". ")[0][:120] if lines else ""
    if isinstance(err, RuntimeError) and detail:
        reason = detail  # torch's own zip-reader message is already descriptive
    else:
        kind = "unpickling failed" if isinstance(err, pickle.UnpicklingError) else type(err).__name__
        reason = f"{kind}: {detail}" if detail else kind
    return WeightsError(f"cannot read weights file {path}: it is not a PyTorch checkpoint ({reason})")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state_dict (bare, or under "state_dict"/"model") on CPU with weights_only=True, or from a
    `.safetensors` file (timm and Hugging Face checkpoints).

    A leading "module." (from DataParallel) is stripped. Non-tensor entries are dropped. timm's training
    checkpoints (state_dict, state_dict_ema, optimizer, and the run's argparse.Namespace) load as well: the
    Namespace is allowed as plain data; "state_dict" (not the EMA copy) is taken.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"cannot read weights file {path}: it is not a PyTorch checkpoint (the file is empty)")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler meets arbitrary bytes: any parse failure means "not a checkpoint"
            raise _unreadable(path, e) from e

    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        keys = ", ".join(map(str, list(obj)[:5])) or "none"
        raise WeightsError(f"weights file {path} holds no tensors (top-level keys: {keys})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    check_finite(sd, path)
    return sd


def check_finite(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a state_dict holding NaN or Inf, naming the first such tensor (training from it fails later with
    a misleading "lower the learning rate")."""
    for key, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsError(f"weights file {path}: tensor '{key}' holds {kind} ({bad} of {t.numel()} values); "
                               "the file was saved after training diverged, or is damaged")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights file {path}: it is not a safetensors file ({e})") from None


def _stage_depths(sd: Mapping[str, torch.Tensor]) -> list[int]:
    depths = []
    while True:
        prefix = f"layer{len(depths) + 1}."
        idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if not idx:
            return depths
        depths.append(max(idx) + 1)


def registry_name(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registry ResNet whose blocks and depths a state_dict has (widths may be pruned), or None."""
    depths = _stage_depths(state_dict)
    if "conv1.weight" not in state_dict or not depths:
        return None
    block = "Bottleneck" if "layer1.0.conv3.weight" in state_dict else "BasicBlock"
    return _KNOWN.get((block, tuple(depths)), (None, ()))[0]


def guess_architecture(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Describe the ResNet a state_dict holds, e.g. "resnet20-like (CIFAR-style, BasicBlock 3/3/3, ...)"."""
    sd = state_dict
    depths = _stage_depths(sd)
    if "conv1.weight" not in sd or not depths:
        first = ", ".join(list(sd)[:4])
        return f"not a ResNet (first keys: {first})"

    block = "Bottleneck" if "layer1.0.conv3.weight" in sd else "BasicBlock"
    widths = tuple(int(sd[f"layer{i + 1}.0.conv1.weight"].shape[0]) for i in range(len(depths)))
    stem = sd["conv1.weight"]
    name, std_widths = _KNOWN.get((block, tuple(depths)), ("ResNet", ()))
    parts = ["CIFAR-style"] if len(depths) == 3 else []
    parts.append(f"{block} blocks {'/'.join(map(str, depths))}")
    if widths != std_widths:
        parts.append(f"widths {'/'.join(map(str, widths))}")
    if len(depths) == 4 and stem.shape[-1] == 3:
        parts.append("3x3 stem")
    if f"{CLASSIFIER}.weight" in sd:
        parts.append(f"{sd[f'{CLASSIFIER}.weight'].shape[0]} classes")
    parts.append(f"{stem.shape[1]} input channels")
    return f"{name}-like ({', '.join(parts)})"


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _first_per_module(problems: list[tuple[str, str]]) -> list[str]:
    """One message per module (a BN layer's weight, bias and buffers would otherwise fill the list)."""
    seen: set[str] = set()
    out = []
    for key, text in problems:
        module = key.rsplit(".", 1)[0]
        if module not in seen:
            seen.add(module)
            out.append(text)
    return out


def load_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str) -> LoadReport:
    """Load a weights file into `model`; a classifier with another class count is kept fresh.

    Any other missing/unexpected key or shape mismatch raises WeightsError listing the first few.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    shape_diff = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]

    file_fc = sd.get(f"{CLASSIFIER}.weight")
    source_classes = int(file_fc.shape[0]) if file_fc is not None and file_fc.dim() == 2 else None
    own_fc = own.get(f"{CLASSIFIER}.weight")
    head_only = not shape_diff or (
        set(shape_diff) <= set(_HEAD_KEYS)
        and file_fc is not None
        and own_fc is not None
        and file_fc.shape[1:] == own_fc.shape[1:]
    )
    if missing or unexpected or not head_only:
        problems = [(k, f"{k}: file {_shape(sd[k])} vs model {_shape(own[k])}") for k in shape_diff]
        problems += [(k, f"missing in file: {k}") for k in missing]
        problems += [(k, f"unexpected in file: {k}") for k in unexpected]
        listed = _first_per_module(problems)[:_MAX_LISTED]
        more = f" (+{len(problems) - len(listed)} more)" if len(problems) > len(listed) else ""
        listed_text = "; ".join(listed)
        raise WeightsError(
            f"weights file {path} does not fit {model_name}: {listed_text}{more}; "
            f"the file seems to hold {guess_architecture(sd)}"
        )

    to_load = {k: v for k, v in sd.items() if k not in shape_diff}
    model.load_state_dict(to_load, strict=False)
    head_replaced = bool(shape_diff)
    if head_replaced:
        own_classes = own_fc.shape[0] if own_fc is not None else None
        note = (
            f"loaded {len(to_load)} tensors; the file's classifier has {source_classes} classes, the model "
            f"{own_classes}, so '{CLASSIFIER}' keeps its fresh initialisation and needs training"
        )
    else:
        note = f"loaded {len(to_load)} tensors"
    return LoadReport(str(path), len(to_load), head_replaced, source_classes, note)


def apply_freeze(model: nn.Module, mode: str) -> int:
    """Set requires_grad=False on the parts `mode` names; return how many parameter values were frozen.

    "none": nothing; "backbone": all but the classifier; "stages_1_2": stem (conv1, bn1), layer1, layer2.
    Use `set_train_mode` instead of `model.train()` so frozen BatchNorm statistics stay fixed too.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"unknown freeze mode '{mode}'{suggest(mode, FREEZE_MODES)} (choose from {FREEZE_MODES})")
    if mode == "none":
        return 0
    named = list(model.named_parameters())
    head = getattr(model, "classifier_name", CLASSIFIER)
    if mode == "backbone":
        if head is None or not any(n.startswith(f"{head}.") for n, _ in named):
            raise ValueError(f"cannot freeze the backbone: the model has no '{head or CLASSIFIER}' classifier")
        chosen = [p for n, p in named if not n.startswith(f"{head}.")]
    elif not hasattr(model, "stage_names"):
        raise ValueError(f"freeze {mode} needs a ResNet with stages (layer1, layer2, ...); this model has none: "
                         "use backbone or none")
    else:
        chosen = [p for n, p in named if n.startswith(_FREEZE_PREFIXES[mode])]
    for p in chosen:
        p.requires_grad_(False)
    return sum(p.numel() for p in chosen)


def set_train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, then put BatchNorm layers whose parameters are all frozen back in eval mode."""
    model.train()
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            m.eval()
    return model
