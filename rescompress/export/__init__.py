"""Export targets. Each module registers a `TargetSpec`: its config class, what it supports, and
`export(model, example, cfg, out_path, *, spec, from_stage, devices, calibration) -> Artifact`, where
`out_path` ends in the target's `suffix`, `devices` are the recipe's device profiles and `calibration(n)`
returns n normalised training images (for converters that quantize after training). Heavy backends are
imported inside `export`, and a missing one raises a `BackendMissingError` naming the extra to install."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from pydantic import BaseModel

from rescompress.export.artifact import Artifact, parity, top1
from rescompress.registry import Registry


@dataclass(frozen=True)
class TargetSpec:
    name: str
    config: type[BaseModel]
    export: Callable[..., Artifact]
    precisions: tuple[str, ...]
    runtime: str
    summary: str
    suffix: str  # the file the export writes: ".onnx", ".engine", ".tflite"
    extra: str = ""  # the pip extra that installs its backend, "" when core
    # which model an entry converts: "int8" (the qat/ptq model) or "fp32" (the last float model)
    source: Callable[[BaseModel], str] = lambda cfg: "int8" if cfg.precision == "int8" else "fp32"
    # (module, extra) that must be importable for an entry, checked when the run is planned; None = nothing
    requires: Callable[[BaseModel], Optional[tuple[str, str]]] = lambda cfg: None
    # the int8 schemes (qat/ptq layouts) whose model this target can ship as int8
    schemes: tuple[str, ...] = ("tensorrt", "onnxruntime", "tflite")
    # the `load_runner` of a file this target wrote, from the artifact's recorded `details` (None: nothing to
    # run, e.g. a deferred engine): how a resumed run uses an export it keeps
    reload: Callable[[dict], Optional[Callable]] = lambda details: None


TARGETS: Registry[TargetSpec] = Registry("export target")

from rescompress.export import onnx as _onnx  # noqa: E402,F401  (registers "onnx")
from rescompress.export import tensorrt as _tensorrt  # noqa: E402,F401  (registers "tensorrt")
from rescompress.export import tflite as _tflite  # noqa: E402,F401  (registers "tflite")

__all__ = ["Artifact", "TARGETS", "TargetSpec", "parity", "top1"]
