"""The recipe: one YAML file, validated strictly, saved resolved (defaults filled in) in every run dir.

Every section is a pydantic model with ``extra="forbid"``. Stage and export entries are one-key mappings
(``- finetune: {epochs: 2}``) whose options are validated against the config class the stage or target
registered. Errors name the file, the field path and what was expected, and suggest the nearest valid key.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rescompress.errors import RecipeError
from rescompress.registry import suggest

SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = "resnet20"
    weights: Optional[str] = Field(None, description="state_dict or checkpoint to start from")
    num_classes: Optional[int] = Field(None, gt=0, description="default: the dataset's class count")
    in_channels: Optional[int] = Field(None, gt=0, description="default: the dataset's channels")
    stem: Literal["auto", "imagenet", "small"] = "auto"
    freeze: Literal["none", "backbone", "stages_1_2"] = "none"


class DataConfig(Strict):
    name: str = "digits"
    root: Optional[str] = None
    image_size: Optional[int] = Field(None, gt=0)
    channels: Optional[Literal[1, 3]] = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    limit_train: Optional[int] = Field(None, gt=0)


class TrainConfig(Strict):
    epochs: int = Field(15, ge=0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: Union[Literal["auto", "none"], list[Literal["crop", "flip"]]] = "auto"
    threads: Optional[int] = Field(None, gt=0, description="torch intra-op threads; default: all cores")


class LatencyConfig(Strict):
    batch: int = Field(1, gt=0)
    warmup: int = Field(20, ge=0)
    runs: int = Field(200, gt=0)
    threads: Optional[int] = Field(None, gt=0, description="default: all cores")


class ReportConfig(Strict):
    accuracy_budget_pt: float = Field(1.0, ge=0.0, description="top-1 loss, in points, a shippable artifact may have")
    latency: LatencyConfig = LatencyConfig()


class RangeSpec(Strict):
    """A range to draw from in a random sweep: uniform in [low, high], or log-uniform with `log`."""
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "RangeSpec":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class RandomSearch(Strict):
    trials: int = Field(..., gt=0, description="how many distinct trials to draw")
    seed: int = 0
    space: dict[str, Union[list[Any], RangeSpec]] = Field(
        default_factory=dict, description="dotted recipe path -> a list of choices or {low, high, log, integer}")


class SweepConfig(Strict):
    """The `sweep:` section, read by `rescompress sweep` (`rescompress run` runs the recipe as written)."""
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted recipe path -> values; all combinations")
    random: Optional[RandomSearch] = Field(None, description="draw this many trials from the grid's values and `space`")
    backend: Literal["local", "ray"] = "local"
    address: Optional[str] = Field(None, description="a Ray cluster's address; default: start Ray on this machine")
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, value: dict) -> dict:
        empty = [k for k, v in value.items() if not v]
        if empty:
            raise ValueError(f"no values for {', '.join(empty)}")
        return value


class StageEntry(Strict):
    """One stage of the recipe's ``stages:`` list, after validation against the stage's config class."""

    kind: str
    config: Any

    def to_yaml(self) -> dict:
        return {self.kind: _dump(self.config)}


class ExportEntry(Strict):
    target: str
    config: Any

    @property
    def name(self) -> str:
        """`target-precision`, plus what sets the entry apart from the default (e.g. `tflite-int8-onnx2tf`)."""
        return f"{self.target}-{self.config.precision}{getattr(self.config, 'name_suffix', '')}"

    def to_yaml(self) -> dict:
        return {self.target: _dump(self.config)}


class Recipe(Strict):
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=80,
                                description="names the run directory; default: the recipe file's stem")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    stages: list[StageEntry] = []
    export: list[ExportEntry] = Field(default_factory=lambda: [ExportEntry(target="onnx", config=_config_for("target", "onnx", {}))])
    devices: list[str] = ["host-cpu"]
    report: ReportConfig = ReportConfig()
    sweep: Optional[SweepConfig] = None

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, value: Any) -> list[StageEntry]:
        return _entries(value, "stage", StageEntry, "kind")

    @field_validator("export", mode="before")
    @classmethod
    def _exports(cls, value: Any) -> list[ExportEntry]:
        entries = _entries(value, "target", ExportEntry, "target")
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise _EntryError((), f"{', '.join(dupes)} listed more than once")
        return entries

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def to_yaml_dict(self) -> dict:
        """The resolved recipe (defaults filled in), as plain YAML-able data."""
        data = self.model_dump(mode="json", exclude={"stages", "export"})
        data["stages"] = [s.to_yaml() for s in self.stages]
        data["export"] = [e.to_yaml() for e in self.export]
        return {"schema_version": SCHEMA_VERSION, **data}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_yaml_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _dump(config: Any) -> Any:
    return config.model_dump(mode="json") if isinstance(config, BaseModel) else config


def _config_class(kind: str, name: str) -> type[BaseModel]:
    """The config class registered for stage or export target `name` (UnknownNameError if none)."""
    if kind == "stage":
        from rescompress.stages import STAGES as registry
    else:
        from rescompress.export import TARGETS as registry
    return registry.get(name).config


def _config_for(kind: str, name: str, options: Any) -> BaseModel:
    return _config_class(kind, name).model_validate(options or {})


class _EntryError(ValueError):
    """Carries a precise location for an error inside a one-key entry list."""

    def __init__(self, loc: tuple, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _entries(value: Any, kind: str, entry_cls: type[BaseModel], key_field: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _EntryError((), f"expected a list of one-key mappings like '- {_example(kind)}', got {_type_name(value)}")
    from rescompress.errors import UnknownNameError

    out = []
    for i, item in enumerate(value):
        if isinstance(item, (StageEntry, ExportEntry)):
            out.append(item)
            continue
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise _EntryError((i,), f"expected a one-key mapping like '{_example(kind)}', got {_type_name(item)}")
        ((name, options),) = item.items()
        if options is not None and not isinstance(options, dict):
            raise _EntryError((i, name), f"expected a mapping of options, got {_type_name(options)}")
        try:
            config = _config_for(kind, str(name), options)
        except UnknownNameError as exc:
            raise _EntryError((i,), str(exc)) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = (i, name, *first["loc"])
            raise _EntryError(loc, _describe(first, _model_at(_config_class(kind, str(name)), first["loc"][:-1]))) from None
        out.append(entry_cls(**{key_field: str(name), "config": config}))
    return out


def _example(kind: str) -> str:
    return "finetune: {epochs: 2}" if kind == "stage" else "onnx: {precision: fp32}"


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(value), type(value).__name__)


def _model_at(root: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (used to suggest key names)."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return None
        cls = _unwrap(fields[part].annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / list[X] -> X, when X is a pydantic model."""
    if isinstance(annotation, type):
        return annotation
    for arg in get_args(annotation):
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return get_origin(annotation)


def _describe(err: dict, holder: type[BaseModel] | None) -> str:
    key = err["loc"][-1] if err["loc"] else None
    if err["type"] == "extra_forbidden":
        valid = list(holder.model_fields) if holder else []
        hint = suggest(str(key), valid)
        listing = f" (valid keys: {', '.join(valid)})" if valid and not hint else ""
        return f"unknown key '{key}'{hint}{listing}"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {_type_name(err.get('input'))}"
    if err["type"] == "list_type":
        return f"expected a list, got {_type_name(err.get('input'))}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if err["type"] not in ("missing",) and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    return msg


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors()[:8]:
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, _EntryError):
            loc = loc + inner.loc
            message = inner.message
        else:
            message = _describe(err, _model_at(Recipe, loc[:-1]))
        lines.append(f"{source}: {_path(loc)}: {message}")
    more = len(exc.errors()) - 8
    if more > 0:
        lines.append(f"{source}: (+{more} more errors)")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty; start from recipes/quickstart.yaml")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of sections (model, data, train, ...), got {_type_name(data)}")
    data = dict(data)
    version = data.pop("schema_version", SCHEMA_VERSION)  # written into resolved recipes
    if version != SCHEMA_VERSION:
        raise RecipeError(f"{source}: schema_version {version!r} is not supported; this rescompress reads {SCHEMA_VERSION}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


def parse_sweep(data: Any, source: str = "sweep") -> SweepConfig:
    """A sweep section (as data) validated on its own, errors phrased like a recipe's."""
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, f"{source}: sweep")) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. The recipe's name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    recipe = parse_recipe(data, str(path))
    if recipe.name is None:
        recipe.name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "run"
    return recipe


def save_resolved(recipe: Recipe, path: str | Path) -> Path:
    from rescompress.fileio import atomic_write_text

    header = "# Resolved recipe: every default filled in. Re-run it with `rescompress run` to reproduce.\n"
    return atomic_write_text(path, header + yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False))
