"""What every importer returns: the torch model, how to rebuild it, its input contract, and the source model
(run in its own runtime) that parity is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np

from rescompress.errors import ModelImportError

LAYER_TOLERANCE = 1e-4  # max |Δ| (fp32) above which an import fails; intermediate outputs are compared relative
                        # to their own magnitude when locating the first differing layer


@dataclass
class SourceInput:
    """How the source model's input follows from the torch model's input `x` (NCHW float, normalised as the
    input spec says): channels reordered by `channel_order`, then `x * scale + offset` per channel (in the new
    order), then laid out as `layout`. The identity by default (an ONNX model takes what torch takes)."""

    layout: str = "NCHW"
    channel_order: Optional[list[int]] = None
    scale: Optional[list[float]] = None
    offset: Optional[list[float]] = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.channel_order is not None:
            x = x[:, self.channel_order]
        c = x.shape[1]
        if self.scale is not None:
            x = x * np.asarray(self.scale, np.float32).reshape(1, c, 1, 1)
        if self.offset is not None:
            x = x + np.asarray(self.offset, np.float32).reshape(1, c, 1, 1)
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "channel_order": self.channel_order, "scale": self.scale, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceInput":
        return cls(layout=d.get("layout", "NCHW"), channel_order=d.get("channel_order"), scale=d.get("scale"),
                   offset=d.get("offset"))


class Source(Protocol):
    """The original model, run in its own runtime (TensorFlow for Keras, onnxruntime for ONNX)."""

    runtime: str  # e.g. "tensorflow 2.21.0 (keras 3.12.0)"

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (the classifier's output before any softmax) for a batch in the source's own layout."""

    def layer_outputs(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """The named layers' (or tensors') outputs, 4-D ones transposed to NCHW."""


@dataclass
class Imported:
    """An imported model and everything needed to rebuild, feed and check it."""

    model: Any  # a plain torch nn.Module in eval mode
    arch: dict  # models.build_arch arguments (plain data): a registry ResNet, or {"name": "graph", "graph": spec}
    channels: int
    height: int
    width: int
    normalization: Optional[dict]  # {"mean": [...], "std": [...]} on [0, 1] RGB pixels; None when the source says nothing
    preprocessing: str  # what the source model expected, in words
    source_input: SourceInput
    source: dict  # {"path", "format", "runtime", "architecture"}
    layer_map: dict[str, str] = field(default_factory=dict)  # torch module name -> source layer whose output equals it
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.arch["num_classes"])

    def meta(self) -> dict:
        """The import's plain-data record, as a checkpoint stores it (parity is added by the caller)."""
        return {"source": dict(self.source), "channels": self.channels, "height": self.height, "width": self.width,
                "normalization": self.normalization, "preprocessing": self.preprocessing,
                "source_input": self.source_input.to_dict(), "layer_map": dict(self.layer_map),
                "notes": list(self.notes)}


def unsupported(layer: str, kind: str, supported: list[str] | tuple[str, ...], detail: str = "") -> ModelImportError:
    """The one message for a layer or op an importer cannot map."""
    extra = f" ({detail})" if detail else ""
    return ModelImportError(f"layer '{layer}' of type {kind} is not supported{extra}; supported: "
                            f"{', '.join(supported)}")


def check_size(name: str, got: int, want: Optional[int], what: str) -> None:
    if want is not None and got != want:
        raise ModelImportError(f"{name} takes {what} {got}, but {want} was asked for")
