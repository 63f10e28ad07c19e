"""Export targets. Each module registers a `TargetSpec`: its config class, what it supports, and
`export(model, example, cfg, out_dir, ctx) -> Artifact`. Heavy backends are imported inside `export`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    extra: str = ""  # the pip extra that installs its backend, "" when core


TARGETS: Registry[TargetSpec] = Registry("export target")

from rescompress.export import onnx as _onnx  # noqa: E402,F401  (registers "onnx")

__all__ = ["Artifact", "TARGETS", "TargetSpec", "parity", "top1"]
