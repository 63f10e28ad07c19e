"""A run that starts from an imported model: `model.weights` names a Keras or ONNX file (imported at plan
time, parity measured on the recipe's own images) or a checkpoint written by `rescompress import`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from rescompress.errors import ModelImportError

PARITY_IMAGES = 32


@dataclass
class StartModel:
    """The imported model a run starts from, and what is known about its source."""

    arch: dict  # the import's own architecture (its own class count)
    channels: int
    height: int
    width: int
    normalization: Optional[dict]
    state_dict: dict
    meta: dict  # Imported.meta() plus "parity" once measured
    imported: Any = None  # the Imported, when the file was imported in this process
    source: Any = None  # its Source (Keras / ONNX runtime), when open
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.arch["num_classes"])

    @property
    def parity(self) -> Optional[dict]:
        return self.meta.get("parity")

    def describe(self) -> str:
        src = self.meta.get("source", {})
        text = f"{src.get('architecture', 'imported model')} from {src.get('format', '?')}, as {self.arch['name']}"
        if self.parity:
            from rescompress.imports import summary

            text += f"; parity {summary(self.parity)}"
        return text

    def arch_for(self, num_classes: int) -> dict:
        return {**self.arch, "num_classes": int(num_classes)}

    def load_into(self, model: Any) -> str:
        """Copy the imported weights into `model` (built by `arch_for`); a classifier with another class count
        keeps its fresh initialisation. Returns a note for the stage record."""
        from rescompress.models.arch import classifier_name

        own = model.state_dict()
        head = classifier_name(model)
        skipped = [k for k, v in self.state_dict.items() if k in own and own[k].shape != v.shape]
        if skipped and not all(k.startswith(f"{head}.") for k in skipped):
            raise ModelImportError(f"the imported weights do not fit the model: {', '.join(skipped[:4])}")
        model.load_state_dict({k: v for k, v in self.state_dict.items() if k not in skipped}, strict=not skipped)
        if skipped:
            return (f"imported weights loaded; its classifier has {self.num_classes} classes, the data "
                    f"{own[f'{head}.weight'].shape[0]}, so '{head}' keeps a fresh initialisation and needs training")
        return "imported weights loaded"

    def open_source(self) -> Any:
        """The source model in its runtime, opened again from its path when this process did not import it."""
        if self.source is None:
            from rescompress.imports import read_source

            path = Path(self.meta["source"]["path"])
            if not path.exists():
                raise ModelImportError(f"the source model {path} is no longer there")
            _, self.source = read_source(path, image_size=self.height, channels=self.channels)
        return self.source

    def source_input(self) -> Any:
        from rescompress.imports.base import SourceInput

        return SourceInput.from_dict(self.meta["source_input"])

    def source_runner(self) -> Callable[[np.ndarray], np.ndarray]:
        """Logits of the source model for a batch in the torch model's input layout and normalisation."""
        source, transform = self.open_source(), self.source_input()
        return lambda x: source.logits(transform.apply(x))


def is_start_file(path: str | Path) -> bool:
    from rescompress.imports import is_foreign, read_imported

    return is_foreign(path) or (Path(path).is_file() and read_imported(path) is not None)


def open_start(path: str | Path, *, image_size: Optional[int], channels: Optional[int]) -> Optional[StartModel]:
    """The StartModel for a weights path, or None when it is a plain PyTorch state_dict."""
    from rescompress.imports import is_foreign, read_imported, read_source

    p = Path(path)
    if is_foreign(p):
        imported, source = read_source(p, image_size=image_size, channels=channels)
        return StartModel(arch=imported.arch, channels=imported.channels, height=imported.height,
                          width=imported.width, normalization=imported.normalization,
                          state_dict=imported.model.state_dict(), meta=imported.meta(), imported=imported,
                          source=source, notes=list(imported.notes))
    if not p.is_file():
        return None
    payload = read_imported(p)
    if payload is None:
        return None
    from rescompress.models.weights import check_finite

    check_finite(payload["state_dict"], p)
    spec = payload["input"]
    c, h, w = int(spec["channels"]), int(spec["height"]), int(spec["width"])
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ModelImportError(f"{p} was imported for {h}x{w} inputs, but data.image_size is {image_size}; set "
                               f"data.image_size: {h}, or import the source again with --image-size {image_size}")
    if channels is not None and c != channels:
        raise ModelImportError(f"{p} takes {c}-channel inputs, but data.channels is {channels}; set "
                               f"data.channels: {c}")
    return StartModel(arch=payload["arch"], channels=c, height=h, width=w, normalization=spec.get("normalization"),
                      state_dict=payload["state_dict"], meta=payload["import"],
                      notes=list(payload["import"].get("notes", [])))


def measure_on_images(start: StartModel, x: np.ndarray, labels: np.ndarray, tolerance: float) -> dict:
    """Parity of a model imported in this process against its source, on the recipe's own images."""
    from rescompress.imports import measure_parity

    parity = measure_parity(start.imported, start.source, x, labels, tolerance=tolerance, inputs="real")
    start.meta["parity"] = parity
    return parity
