"""A PyTorch state_dict in torchvision's layout (torchvision's own files, timm's plain resnet18/34/50, a
rescompress checkpoint) needs no conversion: it is loaded into the registry ResNet its keys describe. There is
no other runtime to compare with, so no parity is measured, and the import says so."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rescompress.errors import ModelImportError
from rescompress.imports.base import Imported, SourceInput

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".safetensors", ".ckpt")


def read_torch(path: Path, *, image_size: Optional[int] = None, channels: Optional[int] = None) -> Imported:
    import torch

    from rescompress.models import build_model, conform_to_state_dict, guess_architecture, read_state_dict
    from rescompress.models.weights import registry_name

    sd = read_state_dict(path)
    name = registry_name(sd)
    if name is None:
        raise ModelImportError(f"{path} is a PyTorch state_dict, but not of a ResNet rescompress builds (it seems to "
                               f"hold {guess_architecture(sd)}); export it to ONNX and import the .onnx file")
    conv1, fc = sd["conv1.weight"], sd.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise ModelImportError(f"{path} has no classifier (fc.weight); rescompress imports whole classifiers")
    cin = int(conv1.shape[1])
    if channels is not None and cin != channels:
        raise ModelImportError(f"{path} takes {cin}-channel inputs, but the data has {channels} channels; set "
                               f"data.channels: {cin}")
    small = int(conv1.shape[-1]) == 3
    model = build_model(name, num_classes=int(fc.shape[0]), in_channels=cin, small_input=small)
    conform_to_state_dict(model, sd)  # pruned widths come from the tensors
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelImportError(f"{path} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    size = image_size or (32 if small else 224)
    imagenet = int(fc.shape[0]) == 1000 and cin == 3
    normalization = ({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]} if imagenet else None)
    arch = {"name": name, "num_classes": int(fc.shape[0]), "in_channels": cin, "small_input": small}
    return Imported(model=model.eval(), arch=arch, channels=cin, height=size, width=size,
                    normalization=normalization,
                    preprocessing=("ImageNet mean/std on RGB in [0, 1] (a 1000-class torchvision-layout head)"
                                   if imagenet else "not recorded in the file"),
                    source_input=SourceInput(),
                    source={"path": str(path), "format": "torch", "runtime": f"torch {torch.__version__}",
                            "architecture": guess_architecture(sd)},
                    notes=["a PyTorch state_dict in torchvision's layout loads as is: no other runtime to compare "
                           "with, so no parity is measured"])
