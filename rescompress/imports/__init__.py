"""Bring your own model: Keras (`.keras`, `.h5`, SavedModel directory) and ONNX ResNets become rescompress
models, with parity against the source model measured in its own runtime every time.

    imported, source = read_source(path, image_size=224)
    parity = measure_parity(imported, source, inputs, labels)   # fails above the tolerance, naming the layer
    save_imported(out, imported, parity)                        # reloads with torch.load(weights_only=True)

torchvision and timm state_dicts need no import: their keys already are the registry ResNets' keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rescompress.errors import ModelImportError
from rescompress.imports.base import LAYER_TOLERANCE, Imported, Source, SourceInput

IMPORT_FORMAT = "rescompress-checkpoint"
FOREIGN_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx")

__all__ = ["FOREIGN_SUFFIXES", "Imported", "LAYER_TOLERANCE", "Source", "SourceInput", "is_foreign",
           "measure_parity", "random_inputs", "read_source", "save_imported"]


def is_foreign(path: str | Path) -> bool:
    """True for a model file that needs importing (Keras or ONNX), False for a PyTorch weights file."""
    p = Path(path)
    return p.suffix.lower() in FOREIGN_SUFFIXES or (p.is_dir() and (p / "saved_model.pb").is_file())


def read_source(path: str | Path, *, image_size: Optional[int] = None,
                channels: Optional[int] = None) -> tuple[Imported, Optional[Source]]:
    """Import a Keras, ONNX or PyTorch model file; returns the import and its source model for parity (None for
    a PyTorch state_dict: it is loaded as is)."""
    p = Path(path)
    if not p.exists():
        raise ModelImportError(f"model file not found: {p}")
    if p.suffix.lower() == ".onnx":
        from rescompress.imports.onnx_import import read_onnx

        return read_onnx(p, image_size=image_size, channels=channels)
    if p.suffix.lower() in (".keras", ".h5", ".hdf5") or p.is_dir():
        from rescompress.imports.keras_import import read_keras

        return read_keras(p, image_size=image_size, channels=channels)
    from rescompress.imports.torch_import import TORCH_SUFFIXES, read_torch

    if p.suffix.lower() in TORCH_SUFFIXES:
        return read_torch(p, image_size=image_size, channels=channels), None
    raise ModelImportError(f"{p}: not a model file rescompress imports (Keras .keras, .h5 or a SavedModel "
                           "directory, .onnx, or a PyTorch state_dict: .pt, .pth, .safetensors)")


def random_inputs(imported: Imported, n: int, seed: int = 0) -> np.ndarray:
    """`n` seeded random images (uniform pixels), normalised as the imported model's input spec says."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, imported.channels, imported.height, imported.width), dtype=np.float32)
    norm = imported.normalization
    if norm is not None:
        mean = np.asarray(norm["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(norm["std"], np.float32).reshape(1, -1, 1, 1)
        x = (x - mean) / std
    return x.astype(np.float32)


def _torch_logits(model: Any, x: np.ndarray, batch: int = 16) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(x[i:i + batch])).numpy())
    return np.concatenate(outs).astype(np.float32)


def _torch_layer_outputs(model: Any, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """The named modules' outputs, in the order the modules ran."""
    import torch

    seen: dict[str, np.ndarray] = {}
    hooks = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue

        def hook(_m: Any, _inp: Any, out: Any, name: str = name) -> None:
            seen.setdefault(name, out.detach().numpy().copy())

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return seen


def first_difference(imported: Imported, source: Source, x: np.ndarray,
                     tolerance: float = LAYER_TOLERANCE) -> Optional[dict]:
    """The first layer (in execution order) whose output differs from the source's by more than `tolerance`
    times its own magnitude (at least 1), or None when every compared layer agrees."""
    names = list(imported.layer_map)
    mine = _torch_layer_outputs(imported.model, x[:4], names)
    theirs = source.layer_outputs(imported.source_input.apply(x[:4]), [imported.layer_map[n] for n in mine])
    for name, out in mine.items():
        ref = theirs.get(imported.layer_map[name])
        if ref is None:
            continue
        if ref.shape != out.shape:
            return {"layer": imported.layer_map[name], "module": name,
                    "detail": f"output shape {tuple(out.shape)} vs the source's {tuple(ref.shape)}"}
        diff = float(np.abs(out - ref).max())
        scale = max(1.0, float(np.abs(ref).max()))
        if diff > tolerance * scale:
            return {"layer": imported.layer_map[name], "module": name,
                    "detail": f"max |Δ| {diff:.3g} at output magnitude {scale:.3g}"}
    return None


def measure_parity(imported: Imported, source: Source, x: np.ndarray, labels: Optional[np.ndarray] = None, *,
                   tolerance: float = LAYER_TOLERANCE, inputs: str = "random") -> dict:
    """Compare the imported torch model with its source on `x` (torch input layout and normalisation).

    Returns max |Δlogit|, the top-1 agreement of the two models' predictions on real images or with labels,
    and with labels each one's top-1. Above `tolerance` raises ModelImportError naming the first layer whose output differs."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    mine = _torch_logits(imported.model, x)
    theirs = np.asarray(source.logits(imported.source_input.apply(x)), dtype=np.float32)
    if theirs.shape != mine.shape:
        raise ModelImportError(f"the source model returns {theirs.shape} for {len(x)} inputs, the import {mine.shape}")
    diff = float(np.abs(mine - theirs).max())
    record = {"max_abs_diff": diff, "tolerance": tolerance, "n": int(len(x)), "inputs": inputs,
              "source_runtime": source.runtime,
              "top1_agreement": None, "source_top1": None, "top1": None}
    if labels is not None or inputs == "real":  # agreement on random noise says little; on images it does
        record["top1_agreement"] = float((mine.argmax(1) == theirs.argmax(1)).mean())
    if labels is not None:
        labels = np.asarray(labels)
        record["source_top1"] = float((theirs.argmax(1) == labels).mean())
        record["top1"] = float((mine.argmax(1) == labels).mean())
    if not np.isfinite(diff) or diff > tolerance:
        where = first_difference(imported, source, x)
        loc = (f"; the first layer whose output differs is '{where['layer']}' (module {where['module']}: "
               f"{where['detail']})" if where else
               "; no single layer's output differs beyond the tolerance: the difference builds up over the layers")
        raise ModelImportError(f"the import of {imported.source['path']} does not match the source model in "
                               f"{source.runtime}: max |Δlogit| {diff:.3g} > {tolerance:g} on {len(x)} {inputs} "
                               f"inputs{loc}")
    return record


def unmeasured(imported: Imported) -> dict:
    """The parity record of an import with no other runtime to compare with (a PyTorch state_dict)."""
    return {"max_abs_diff": None, "tolerance": None, "n": 0, "inputs": None, "source_runtime": None,
            "top1_agreement": None, "source_top1": None, "top1": None,
            "status": "not measured: a PyTorch state_dict in torchvision's layout is loaded as is"}


def checkpoint_payload(imported: Imported, parity: dict) -> dict:
    """What `save_imported` writes: plain data plus the state_dict (no pickled code)."""
    spec = {"channels": imported.channels, "height": imported.height, "width": imported.width,
            "normalization": imported.normalization}
    return {"format": IMPORT_FORMAT, "version": 1, "arch": imported.arch, "stage": "import", "metrics": {},
            "input": spec, "import": {**imported.meta(), "parity": parity},
            "state_dict": imported.model.state_dict()}


def save_imported(path: str | Path, imported: Imported, parity: dict) -> Path:
    """Write the imported model as a rescompress checkpoint, and `<path>.json` (its architecture, input contract
    and parity, readable without torch)."""
    import torch

    from rescompress.fileio import atomic_write, atomic_write_json

    path = Path(path)
    payload = checkpoint_payload(imported, parity)
    atomic_write(path, lambda p: torch.save(payload, p))
    atomic_write_json(path.with_name(path.name + ".json"),
                      {k: v for k, v in payload.items() if k != "state_dict"})
    return path


def read_imported(path: str | Path) -> Optional[dict]:
    """The payload of an imported-model checkpoint, or None when `path` is another kind of weights file."""
    import torch

    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or not one of ours: the caller's own reader reports it
        return None
    if isinstance(obj, dict) and obj.get("format") == IMPORT_FORMAT and "import" in obj and "arch" in obj:
        return obj
    return None


def summary(parity: dict) -> str:
    """One line: "max |Δlogit| 3.1e-06 vs tensorflow 2.21.0 on 32 random inputs; top-1 agreement 100.00 %"."""
    if parity.get("max_abs_diff") is None:
        return str(parity.get("status", "not measured"))
    text = (f"max |Δlogit| {parity['max_abs_diff']:.2e} vs {parity['source_runtime']} on {parity['n']} "
            f"{parity['inputs']} inputs")
    if parity.get("top1_agreement") is not None:
        text += f"; top-1 agreement {parity['top1_agreement'] * 100:.2f} %"
    return text


def to_json(imported: Imported, parity: dict, out: Optional[Path]) -> str:
    return json.dumps({"source": imported.source, "output": str(out) if out else None,
                       "architecture": imported.arch["name"], "num_classes": imported.num_classes,
                       "input": {"channels": imported.channels, "height": imported.height, "width": imported.width,
                                 "normalization": imported.normalization, "preprocessing": imported.preprocessing},
                       "max_abs_diff": parity["max_abs_diff"], "top1_agreement": parity["top1_agreement"],
                       "parity": parity, "notes": imported.notes}, indent=2)
