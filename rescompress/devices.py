"""Device profiles: one YAML file per device under `devices/` (or a path given in the recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rescompress.errors import RecipeError, UnknownNameError
from rescompress.registry import suggest

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "devices"


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    latency_source: Literal["measured", "none"] = Field(
        "measured", description="how latency is obtained: measured on this host in the artifact's runtime, "
                                "or none (accuracy only, until the device can be reached or estimated)")
    runtimes: list[str] = ["torch", "onnxruntime"]
    int8_scheme: Optional[Literal["tensorrt", "onnxruntime", "tflite"]] = Field(
        None, description="the int8 layout its runtime runs fast; the default scheme of qat/ptq stages")
    threads: Optional[int] = Field(None, gt=0, description="default: the recipe's report.latency.threads")
    trtexec: str = Field("trtexec", description="trtexec on the device, for the engine build command of a deferred "
                                                "tensorrt export (JetPack: /usr/src/tensorrt/bin/trtexec)")


def search_dirs() -> list[Path]:
    dirs = [Path.cwd() / "devices", BUILTIN_DIR]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def available_devices() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(search_dirs()):  # the working directory's profiles win
        for f in sorted(d.glob("*.yaml")):
            found[f.stem] = f
    return dict(sorted(found.items()))


def load_device(name_or_path: str) -> DeviceProfile:
    """A device by profile name (`host-cpu`) or by path to a YAML profile."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        known = available_devices()
        if name_or_path not in known:
            raise UnknownNameError(
                f"unknown device '{name_or_path}'{suggest(name_or_path, list(known))} (known: {', '.join(known)})")
        path = known[name_or_path]
    if not path.is_file():
        raise RecipeError(f"device profile not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return DeviceProfile.model_validate(data)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: YAML syntax error: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise RecipeError(f"{path}: {loc}: {first['msg']}") from None
