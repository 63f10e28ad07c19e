"""The recipe: one YAML file, validated strictly, saved resolved (defaults filled in) in every run dir.

Every section is a pydantic model with ``extra="forbid"``. Stage and export entries are one-key mappings
(``- finetune: {epochs: 2}``) whose options are validated against the config class the stage or target
registered. Errors name the file, the field path and what was expected, and suggest the nearest valid key.
A key given twice in a file is refused with both lines (PyYAML alone keeps the last). `run --set PATH=VALUE`
and `sweep --grid` set dotted paths in the file's data before it is validated (`apply_overrides`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin

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
    import_tolerance: float = Field(1e-4, gt=0.0, description="a Keras/ONNX model in weights: largest max |Δlogit| "
                                                               "against its source runtime (fp32)")


class Normalization(Strict):
    mean: list[float] = Field(..., min_length=1)
    std: list[float] = Field(..., min_length=1)

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if min(value) <= 0:
            raise ValueError("every std value must be positive")
        return value


class DataConfig(Strict):
    name: str = "digits"
    root: Optional[str] = Field(None, description="a folder (image_folder), a manifest file (manifest), or the "
                                                  "dataset's files (fashion_mnist, cifar10)")
    image_size: Optional[int] = Field(None, gt=0, le=4096)
    channels: Optional[Literal[1, 3]] = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    limit_train: Optional[int] = Field(None, gt=0)
    normalize: Union[Literal["auto", "dataset", "imagenet"], Normalization] = Field(
        "auto", description="auto: ImageNet statistics for an ImageNet checkpoint, else the training split's")
    # on-disk sources (image_folder, manifest): streamed through DataLoader workers
    workers: Optional[int] = Field(None, ge=0, le=64, description="loader processes; default: the cores, at most 8")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bilinear"
    crop_fraction: float = Field(0.875, gt=0.0, le=1.0, description="eval: resize to image_size / crop_fraction, "
                                                                     "center crop image_size")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random_resized_crop: area fraction range")
    crop_ratio: tuple[float, float] = Field((0.75, 4 / 3), description="random_resized_crop: aspect ratio range")
    color_jitter: float = Field(0.0, ge=0.0, lt=1.0, description="brightness/contrast/saturation jitter strength")
    stats_images: int = Field(512, gt=0, description="training images sampled for dataset mean/std")
    on_corrupt: Literal["fail", "skip"] = Field("fail", description="an unreadable image: stop, or leave it out "
                                                                    "and count it in the report")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"needs 0 < low <= high, got {list(value)}")
        return value


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
    augment: Union[Literal["auto", "none"], list[Literal["crop", "flip", "random_resized_crop", "color_jitter"]]] = Field(
        "auto", description="auto: the dataset's (random_resized_crop + flip on disk, crop/flip for small images)")
    threads: Optional[int] = Field(None, gt=0, description="torch intra-op threads; default: all cores")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                        description="where training, evaluation and calibration run: auto (CUDA when torch sees "
                                    "one), cpu, cuda or cuda:N; under torchrun each rank uses its LOCAL_RANK GPU")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="float training under autocast (fp16 with a gradient scaler; bf16 needs an Ampere or newer "
                            "GPU, and on CPUs without AMX/avx512_bf16 is slow); QAT always trains in fp32")
    channels_last: bool = Field(False, description="NHWC memory format for training (faster convolutions on CUDA)")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm across ranks under torchrun on CUDA (nccl)")


class LatencyConfig(Strict):
    batch: int = Field(1, gt=0)
    warmup: int = Field(20, ge=0)
    runs: int = Field(200, gt=0)
    threads: Optional[int] = Field(None, gt=0, description="default: all cores")


class ReportConfig(Strict):
    accuracy_budget_pt: float = Field(1.0, ge=0.0, description="top-1 loss, in points, a shippable artifact may have")
    latency: LatencyConfig = LatencyConfig()
    device_eval_images: Optional[int] = Field(
        1000, ge=0, description="images of each of the validation and test splits that a device reached over ssh "
                                "or adb runs through each artifact, for its own top-1: a stratified subset of this "
                                "many (null: every image; 0: no evaluation on devices)")


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
    overrides: list[str] = Field(default_factory=list, exclude=True,
                                 description="the --set options this recipe was resolved with: a record, applied "
                                             "already (not part of the digest)")

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
    if "overrides" in data and "schema_version" not in data:
        raise RecipeError(f"{source}: overrides: is the record of --set options a resolved recipe keeps (they are "
                          f"applied already); set values in their sections, or with `rescompress run --set PATH=VALUE`")
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


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file, with `--set PATH=VALUE` options applied to its data first (so the
    result is validated as a whole) and recorded in `Recipe.overrides`. The name defaults to the file's stem."""
    path = Path(path)
    data = read_recipe_file(path)
    source = str(path)
    if overrides:
        values = parse_overrides(overrides)
        if isinstance(data, dict):  # anything else is refused by parse_recipe, naming the file
            data = apply_overrides(data, values, option="--set")
        source = f"{path} with --set {' '.join(o.strip() for o in overrides)}"
    recipe = parse_recipe(data, source)
    if overrides:
        recipe.overrides = _record(recipe.overrides, overrides)
    if recipe.name is None:
        recipe.name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "run"
    return recipe


def read_recipe_file(path: Path) -> Any:
    """A recipe file's YAML data; a syntax error or a key given twice is a RecipeError naming the line(s)."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None


def save_resolved(recipe: Recipe, path: str | Path) -> Path:
    """The recipe with every default filled in; the --set options it was resolved with are listed under
    `overrides:` (a record: their values are in their sections already, and the digest leaves it out)."""
    from rescompress.fileio import atomic_write_text

    header = "# Resolved recipe: every default filled in. Re-run it with `rescompress run` to reproduce.\n"
    data = recipe.to_yaml_dict()
    if recipe.overrides:
        header += "# overrides: the --set options it was run with; their values are in the sections below.\n"
        data = {"schema_version": data.pop("schema_version"), "overrides": list(recipe.overrides), **data}
    return atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


# --- YAML that refuses a key given twice, and --set PATH=VALUE overrides ------------------------

class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice (PyYAML alone would keep the last one silently)."""

    def __init__(self, loc: tuple, first: yaml.Mark, second: yaml.Mark) -> None:
        where = (f"lines {first.line + 1} and {second.line + 1}" if first.line != second.line
                 else f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}")
        super().__init__(f"{_path(loc)}: the key '{loc[-1]}' appears twice ({where}); YAML would keep only the "
                         f"last one, so remove one of them")
        self.loc, self.lines = loc, (first.line + 1, second.line + 1)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader whose mapping constructor refuses a key given twice, at any depth. Merge keys
    (`<<: *defaults`) are not duplicates: the mapping's own keys override the merged ones, as in YAML."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._locs: dict[int, tuple] = {}  # id(node) -> its path in the document, set by its parent
        self._own: dict[int, list] = {}  # a mapping's entries as written, before its merge keys were flattened

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        self._own.setdefault(id(node), list(node.value))
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            loc, seen = self._locs.get(id(node), ()), {}
            for key_node, value_node in self._own.get(id(node), node.value):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKeyError((*loc, key), seen[key], key_node.start_mark)
                    seen[key] = key_node.start_mark
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    pass
                self._locs.setdefault(id(value_node), (*loc, key))
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node: yaml.Node, deep: bool = False) -> list:
        loc = self._locs.get(id(node), ())
        for i, item in enumerate(getattr(node, "value", ())):
            self._locs.setdefault(id(item), (*loc, i))
        return super().construct_sequence(node, deep=deep)


def parse_value(text: str) -> Any:
    """A value from the command line, read as YAML: 3, 0.1, true, null, [crop, flip]; otherwise the string."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise RecipeError(f"value {text!r}: {exc}") from None
    except yaml.YAMLError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", 3): a dotted recipe path (list items by index) and its value."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip() or not value.strip():
        raise RecipeError(f"--set {text!r}: expected PATH=VALUE, e.g. train.epochs=3 (null clears a value)")
    return path.strip(), parse_value(value.strip())


def parse_overrides(options: Sequence[str]) -> dict[str, Any]:
    """`--set` options as {path: value}, in the order given. A path given twice, or one inside another's value
    (`train={epochs: 1}` and `train.epochs=2`), is refused: which one wins would depend on their order."""
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for text in options:
        path, value = parse_override(text)
        for earlier in values:
            if earlier == path:
                raise RecipeError(f"--set {path} is given twice ({given[earlier]} and {text.strip()}); keep one")
            if _inside(path, earlier) or _inside(earlier, path):
                raise RecipeError(f"--set {given[earlier]} and --set {text.strip()} overlap (both set "
                                  f"{max(path, earlier, key=len)}); keep one")
        values[path], given[path] = value, text.strip()
    return values


def _inside(path: str, section: str) -> bool:
    return path.startswith(section + ".")


def _record(previous: Sequence[str], options: Sequence[str]) -> list[str]:
    """The overrides a resolved recipe records: the earlier ones (when a resolved recipe is run again) that
    the new options leave in place, then the new ones."""
    new = [o.strip() for o in options]
    paths = [o.partition("=")[0].strip() for o in new]

    def replaced(entry: str) -> bool:
        p = entry.partition("=")[0].strip()
        return any(p == q or _inside(p, q) or _inside(q, p) for q in paths)

    return [o for o in previous if not replaced(o)] + new


def apply_overrides(raw: dict, overrides: dict[str, Any], option: str = "sweep path") -> dict:
    """A copy of the recipe's YAML data with each dotted path set; list items by index
    (`stages.2.qat.scheme`). A path that does not exist in the recipe is an error naming it; a key that no
    section has is left to validation, which suggests the nearest valid one."""
    data = copy.deepcopy(raw)
    for path, value in overrides.items():
        parts = path.split(".")
        node: Any = data
        entry = False  # whether `node` is an item of a list (a one-key stage or export entry)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"{option} {path}: {'.'.join(parts[:i]) or 'recipe'} has {len(node)} "
                                      f"entries; {where} is not one of them")
                if last:
                    node[int(part)] = value
                    break
                node, entry = node[int(part)], True
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"{option} {path}: {'.'.join(parts[:i])} is a value, not a section")
            if entry and len(node) == 1 and part not in node:
                # a one-key stage/export entry: the key names the stage, so a wrong one is a wrong stage
                (kind,) = node
                raise RecipeError(f"{option} {path}: {'.'.join(parts[:i])} is a {kind} entry, not {part}")
            entry = False
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # a section the recipe leaves out (a list, if indexed: it has no entries)
                    node[part] = [] if parts[i + 1].isdigit() else {}
                node = node[part]
    return data
