"""The `report.json` format (schema_version 1), its validation, and the accuracy-vs-latency Pareto front.

A run writes one `report.json` in its run directory; `report.md`, `report.html` and `plots/*.png` are
rendered from it alone (`rescompress report RUN_DIR` re-renders them). Fractions are in [0, 1]; accuracy
differences are in percentage points ("pt"); sizes are bytes; times are seconds unless named `*_ms`.
"Optional" fields may be absent or null. Unknown extra keys are allowed and ignored by the renderers.

Top level (all required):

- `schema_version` (int): 1. A reader rejects versions it does not know.
- `rescompress_version` (str): the package version that wrote the report, e.g. "0.1.0".
- `recipe` (object): `name` (str); `path` (str, optional): the recipe file as given;
  `accuracy_budget_pt` (number, optional): the default accuracy budget, in pt below the baseline.
- `run` (object): `dir` (str): the run directory; `started` (str, ISO-8601);
  `finished` (str, ISO-8601, optional) and `seconds` (number, optional): absent while a run is unfinished;
  `steps` (list, optional): per finished step in order, `step` (str), `seconds` (number) and
  `train_seconds` (number): the part spent in training epochs (0 for export, measure).
- `dataset` (object): `name` (str); `num_classes` (int, optional); `class_names` (list of str, optional);
  `sizes` (object, optional): split name -> number of samples, e.g. {"train": 1257, "val": 180, "test": 360};
  `input_spec` (object, optional): `channels`, `height`, `width` (int), `mean`, `std` (lists of numbers),
  `layout` ("NCHW" | "NHWC"), `resize` (int or null: the shorter side before a center crop; null: resized to
  height x width), `interpolation`, `normalization` ("dataset" | "imagenet" | "recipe"), `dtype`, `transform`
  (str: all of it in words); `source` (str, optional): where the data came from; `eval_transform` (str,
  optional): the evaluation transform in words; `in_memory` (bool, optional); `streaming` (object, optional,
  on-disk sources): `workers`, `files`, `index`, `on_corrupt`, `skipped_files`, `skipped_examples`,
  `train_transform`.
- `model` (object): `name` (str): the registry name, e.g. "resnet20";
  `weights` (str, optional): the weights file loaded; null when the baseline was trained in the run;
  `arch` (object, optional): the architecture record (registry arguments, or a graph spec);
  `import` (object, optional, when the weights are an imported Keras/ONNX model): `path`, `format`, `runtime`,
  `architecture`, `preprocessing` (str), `parity` (object: `max_abs_diff`, `top1_agreement`, `n`, `inputs`
  "real" | "random", `source_runtime`, `tolerance`), `top1`, `val_top1` (fractions or null: the source model's
  own top-1 in its runtime), `top1_status` ("ok" | "failed" | "skipped"), `top1_message`, `notes`.
- `stages` (list): one object per finished pipeline stage, in order; "baseline" is always first.
  - `name` (str), `kind` (str, optional: "train", "eval", "prune", "distill", "qat", "ptq", ...)
  - `top1` (fraction): test-split top-1 of the stage's torch model; `val_top1` (fraction, optional)
  - `params` (number), `macs` (number): per sample; `size_bytes` (number): the checkpoint's size
  - `seconds` (number, optional), `checkpoint` (str, optional): path relative to the run dir
  - `train_seconds` (number, optional): the part of `seconds` spent in training epochs
  - `notes` (list of str, optional): anything the stage wants the reader to know
  - `precision` (str, optional): "fp32" | "int8"; `scheme` (str, optional): the int8 layout (tensorrt |
    onnxruntime | tflite); `calibration` (str, optional): "train" | "random" for ptq;
    `autotune` (object, optional): `tolerable_loss`, `baseline_val_top1`, `trials` [{trial, config, val_top1,
    met}], `chosen` (trial number), `met` (bool: whether any trial met the goal)
- `artifacts` (list): one object per exported artifact; the torch model itself is listed with target "torch".
  - `name` (str, unique): referenced by device results; `target` (str): "torch" | "onnx" | "tensorrt" | "tflite"
  - `precision` (str): "fp32" | "fp16" | "int8" | ...; `from_stage` (str, optional): the stage it was exported from
  - `path` (str, optional): relative to the run dir
  - `bundle` (str, optional): the folder to ship it from, relative to the run dir (`bundles/<name>`: the file,
    preprocess.json, labels.txt, model_card.md and a predict.py example); deployable artifacts only
  - `status` (str): "ok" | "deferred" | "failed" | "skipped"
  - `message` (str, optional): why, when status is not "ok" (e.g. the deferred engine-build command)
  - `size_bytes` (number, optional); `runtime` (str, optional): runtime name and version
  - `top1` (fraction, optional): measured on the artifact's own runtime, test split; null if not measured
  - `val_top1` (fraction, optional): the same on the validation split (what recommendations are chosen on)
  - `top1_source` (str, optional): where `top1` was measured; "proxy: ..." when not in the artifact's own
    runtime (a deferred TensorRT engine's ONNX run unfused in onnxruntime)
  - `top1_status` (str, optional): "ok" | "failed" (the runtime could not run the file; the run exits 1);
    `top1_message` (str, optional): why it failed
  - `parity` (object, optional): `max_abs_diff` (number): largest |logit difference| against
    `reference` (str): the artifact compared with; `top1_agreement` (fraction): share of equal top-1 predictions
  - `accuracy_only` (str, optional): why the artifact's latency is not measured (a reference such as the
    PT2E torch model or an unfused QDQ graph, whose speed is not that of any deployment)
  - `lint` (list, optional): deployability findings, each `target` (str: the runtime linted for, "tensorrt" |
    "onnxruntime" | "tflite"), `rule` (str), `node` (str, optional), `message` (str), `fix` (str, optional),
    `severity` ("error" | "warning" | "info")
  - `lint_checked` (object, optional): lint target -> `passed` (bool), `errors`, `warnings` (int), `checked`
    (str: what was checked), `status` (str, optional): "passed" | "failed" | "crashed" (the lint itself
    failed on the file; it is also an error finding with rule `lint-crashed`)
  - `details` (object, optional): target-specific facts, e.g. `scheme`, `converter`, `build_commands`
    (device -> the command that builds a deferred TensorRT engine there)
- `devices` (list): one object per target device.
  - `name` (str, unique); `description` (str, optional); `accuracy_budget_pt` (number, optional)
  - `results` (list): one object per artifact evaluated for this device:
    - `artifact` (str): an `artifacts[].name`; `runtime` (str, optional)
    - `top1` (fraction, optional); `top1_source` (str, optional): where that top-1 was measured, e.g.
      "onnxruntime 1.31.1 on this host"; `delta_top1_pt` (number, optional): top-1 minus the baseline's
      torch top-1, in percentage points; `val_top1` (fraction, optional) and `delta_val_top1_pt` (number,
      optional): the same on the validation split, against the baseline's `val_top1`; `top1_status`,
      `top1_message` (str, optional) as in artifacts; `size_bytes` (number, optional)
    - `latency` (object, optional; null with `status`/`message` saying why): `source` ("measured" |
      "measured-remote" | "estimated"); `p50_ms`, `p90_ms`, `p99_ms`, `mean_ms` (number, optional);
      `batch`, `warmup`, `runs`, `threads` (int, optional); other keys are kept, e.g. `power_mode`,
      `runtime_version` and `host` (measured-remote), or `group`, `calibrated_on` and
      `check_max_abs_error_pct` (estimated: the largest out-of-sample error on the group's published figures
      of the estimate's own runtime and precision) and `check` (str, estimated: on how many such figures that
      error was measured, or "unchecked: ..." when the group has none, and then no error is given)
    - `remote_status` (str, optional): the device measurement's outcome when one was tried, over ssh or adb
      ("ok" | "unreachable" | "host-key" | "auth-failed" | "runtime-missing" | "out-of-memory" | "timeout" |
      "failed")
    - `device_eval` (object, optional; devices reached over a connection): the artifact run by the device on
      the packed validation and test images: `status` (as `remote_status`), `message`, `method` (str: the
      runtime and how it was fed), `images` (str, e.g. "178 of 178 validation images, 359 of 359 test
      images"), `subset` (bool: a stratified subset, `report.device_eval_images`), `splits` ("top1" /
      "val_top1" -> `images`, `of` (int), `device_top1`, `host_top1`, `agreement` (fraction: the device's and
      the host's predictions agree), `delta_pt` (device minus host, same images)). When it is "ok",
      `top1`/`val_top1` are the device's (`top1_source`: "device"; with a subset, the host's whole-split
      figure moved by `delta_pt`) and the host's are kept as `host_top1`, `host_val_top1`, `host_top1_source`
    - `engine` (object, optional): a TensorRT engine built on the device and copied back: `path` (str,
      relative to the run directory, or null with `message`), `tensorrt_version`, `gpu`, `build_command`,
      `built_on` (str)
    - `status` (str): "ok" | "deferred" | "failed" | "skipped"; `message` (str, optional)
  - `recommendation` (object, optional): `artifact` (str): one of this device's results;
    `reason` (str, optional), e.g. "fastest measured latency ... within 1.0 pt of the baseline's validation
    top-1"; `selected_on` (str, optional): "validation" | "test" (the split whose top-1 the budget was judged
    on; test only when there is no validation split); `latency_source` (str, optional): the source the
    candidates were ranked within (the best one any candidate had); `bundle` (str, optional): the
    recommended artifact's bundle folder
  - `provenance` (object, optional): `latency` (runtime -> "measured" | "measured-remote" | "estimated" |
    "none"); `device` (object, optional): facts the device reported (python, runtime versions, power mode);
    `connection` (str, optional): why the device could not be reached; `power_mode_command` (str, optional);
    `profile` (object, optional): the profile file used: `path` (str), `sha256` (str, of its bytes),
    `builtin` (bool: shipped with rescompress; false for a recipe path or a file in ./devices/);
    `estimates` (object, optional): estimate group -> `parameters` (object) and `figures` (list of
    {device, model, runtime, precision, use: "calibrate" | "holdout", check: "leave-one-out" |
    "holdout", published_ms, estimated_ms, error_pct (out of sample; null when nothing was left to fit on),
    fit_error_pct (calibration figures: the full fit's residual), statistic, source})
- `bundles_message` (str, optional): why the bundles could not be written
- `provenance` (object): versions and host facts, str -> str/number, e.g. `python`, `platform`,
  `processor`, `cpu_count`, `torch`, `onnxruntime`, `onnx`, `numpy`.
- `sweep` (object, optional): only in the merged report of `rescompress sweep`, whose artifacts, stages and
  results are named `<trial>/<name>`: `backend` (str), `trials` (list): `id`, `overrides` (dotted recipe path
  -> value), `status` (pending | running | done | failed), `message`, `seconds`, `run_dir` (relative).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from rescompress.errors import RescompressError

SCHEMA_VERSION = 1
STATUSES = ("ok", "deferred", "failed", "skipped")
LATENCY_SOURCES = ("measured", "measured-remote", "estimated")
LINT_SEVERITIES = ("error", "warning", "info")
TOP1_STATUSES = ("ok", "failed")

REQUIRED_TOP_LEVEL = (
    "schema_version", "rescompress_version", "recipe", "run", "dataset",
    "model", "stages", "artifacts", "devices", "provenance",
)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: type(v) is int, "an integer"),
    "number": (_is_number, "a finite number"),
    "fraction": (lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a fraction in [0, 1]"),
    "object": (lambda v: isinstance(v, Mapping), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = type(value)
    if kind in (str, int, float, bool, list, dict, type(None)):
        return text
    return f"{text} ({kind.__module__}.{kind.__qualname__})"


class _Checker:
    """Collects every problem in a report, each named by its field path."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def field(
        self,
        obj: Mapping[str, Any],
        key: str,
        kind: str,
        path: str,
        *,
        required: bool = True,
        choices: Sequence[str] = (),
    ) -> Any:
        """The value at `obj[key]` if it has the right kind, else None (with the problem recorded)."""
        where = f"{path}.{key}" if path else key
        value = obj.get(key)
        if value is None:
            if required:
                self.problems.append(f"{where} is {'null' if key in obj else 'missing'}")
            return None
        check, expected = _KINDS[kind]
        if not check(value):
            self.problems.append(f"{where} is {_describe(value)}; expected {expected}")
            return None
        if choices and value not in choices:
            self.problems.append(f"{where} is {value!r}; expected one of {', '.join(choices)}")
            return None
        return value

    def items(self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> list[tuple[str, Mapping[str, Any]]]:
        """(path, object) for each element of the list `obj[key]` that is an object."""
        where = f"{path}.{key}" if path else key
        values = self.field(obj, key, "list", path, required=required) or []
        out = []
        for i, value in enumerate(values):
            if isinstance(value, Mapping):
                out.append((f"{where}[{i}]", value))
            else:
                self.problems.append(f"{where}[{i}] is {_describe(value)}; expected an object")
        return out

    def unique(self, entries: list[tuple[str, Mapping[str, Any]]], key: str) -> set[str]:
        """The set of `key` values, recording repeats."""
        seen: dict[str, str] = {}
        for path, obj in entries:
            value = obj.get(key)
            if isinstance(value, str):
                if value in seen:
                    self.problems.append(f"{path}.{key} {value!r} repeats {seen[value]}.{key}")
                seen.setdefault(value, path)
        return set(seen)


def _check_schema_version(report: Mapping[str, Any]) -> None:
    if "schema_version" not in report:
        return  # reported with the other missing keys
    version = report["schema_version"]
    if version != SCHEMA_VERSION or type(version) is not int:
        raise RescompressError(
            f"report.json: schema_version {version!r} is not supported; this rescompress reads "
            f"schema_version {SCHEMA_VERSION}. Re-render it with the rescompress version that wrote it."
        )


def _check_artifact(c: _Checker, path: str, a: Mapping[str, Any]) -> None:
    for key in ("name", "target", "precision"):
        c.field(a, key, "str", path)
    c.field(a, "status", "str", path, choices=STATUSES)
    for key in ("from_stage", "path", "message", "runtime", "accuracy_only"):
        c.field(a, key, "str", path, required=False)
    c.field(a, "size_bytes", "number", path, required=False)
    c.field(a, "top1", "fraction", path, required=False)
    c.field(a, "top1_source", "str", path, required=False)
    c.field(a, "val_top1", "fraction", path, required=False)
    c.field(a, "top1_status", "str", path, required=False, choices=TOP1_STATUSES)
    c.field(a, "top1_message", "str", path, required=False)
    parity = c.field(a, "parity", "object", path, required=False)
    if parity is not None:
        c.field(parity, "max_abs_diff", "number", f"{path}.parity", required=False)
        c.field(parity, "top1_agreement", "fraction", f"{path}.parity", required=False)
        c.field(parity, "reference", "str", f"{path}.parity", required=False)
    for lpath, finding in c.items(a, "lint", path, required=False):
        c.field(finding, "rule", "str", lpath)
        c.field(finding, "message", "str", lpath)
        c.field(finding, "severity", "str", lpath, choices=LINT_SEVERITIES)
        c.field(finding, "node", "str", lpath, required=False)
        c.field(finding, "fix", "str", lpath, required=False)


def _check_result(c: _Checker, path: str, r: Mapping[str, Any], artifacts: set[str]) -> None:
    name = c.field(r, "artifact", "str", path)
    if name is not None and name not in artifacts:
        c.problems.append(f"{path}.artifact {name!r} is not the name of any entry in artifacts")
    c.field(r, "status", "str", path, choices=STATUSES)
    c.field(r, "runtime", "str", path, required=False)
    c.field(r, "message", "str", path, required=False)
    c.field(r, "top1", "fraction", path, required=False)
    c.field(r, "top1_source", "str", path, required=False)
    c.field(r, "remote_status", "str", path, required=False)
    c.field(r, "host_top1", "fraction", path, required=False)
    c.field(r, "host_val_top1", "fraction", path, required=False)
    device_eval = c.field(r, "device_eval", "object", path, required=False)
    if device_eval is not None:
        c.field(device_eval, "status", "str", f"{path}.device_eval")
        for key, split in (device_eval.get("splits") or {}).items():
            for field in ("device_top1", "host_top1", "agreement"):
                c.field(split, field, "fraction", f"{path}.device_eval.splits.{key}", required=False)
    engine = c.field(r, "engine", "object", path, required=False)
    if engine is not None:
        c.field(engine, "path", "str", f"{path}.engine", required=False)
    c.field(r, "delta_top1_pt", "number", path, required=False)
    c.field(r, "val_top1", "fraction", path, required=False)
    c.field(r, "delta_val_top1_pt", "number", path, required=False)
    c.field(r, "top1_status", "str", path, required=False, choices=TOP1_STATUSES)
    c.field(r, "top1_message", "str", path, required=False)
    c.field(r, "size_bytes", "number", path, required=False)
    latency = c.field(r, "latency", "object", path, required=False)
    if latency is not None:
        lpath = f"{path}.latency"
        c.field(latency, "source", "str", lpath, choices=LATENCY_SOURCES)
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"):
            c.field(latency, key, "number", lpath, required=False)
        for key in ("batch", "warmup", "runs", "threads"):
            c.field(latency, key, "int", lpath, required=False)


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise RescompressError naming every missing or mistyped field of a schema-1 report."""
    if not isinstance(report, Mapping):
        raise RescompressError(f"report.json: the top level is {_describe(report)}; expected an object")
    _check_schema_version(report)
    c = _Checker()
    c.field(report, "schema_version", "int", "")
    c.field(report, "rescompress_version", "str", "")
    sections = {key: c.field(report, key, "object", "") or {}
                for key in ("recipe", "run", "dataset", "model", "provenance")}

    recipe, run, dataset, model = (sections[k] for k in ("recipe", "run", "dataset", "model"))
    c.field(recipe, "name", "str", "recipe", required="recipe" in report)
    c.field(recipe, "path", "str", "recipe", required=False)
    c.field(recipe, "accuracy_budget_pt", "number", "recipe", required=False)
    c.field(run, "dir", "str", "run", required="run" in report)
    c.field(run, "started", "str", "run", required="run" in report)
    c.field(run, "finished", "str", "run", required=False)
    c.field(run, "seconds", "number", "run", required=False)
    for path, step in c.items(run, "steps", "run", required=False):
        c.field(step, "step", "str", path)
        c.field(step, "seconds", "number", path)
        c.field(step, "train_seconds", "number", path, required=False)
    c.field(dataset, "name", "str", "dataset", required="dataset" in report)
    c.field(dataset, "num_classes", "int", "dataset", required=False)
    c.field(dataset, "sizes", "object", "dataset", required=False)
    c.field(dataset, "input_spec", "object", "dataset", required=False)
    c.field(dataset, "source", "str", "dataset", required=False)
    c.field(dataset, "eval_transform", "str", "dataset", required=False)
    c.field(dataset, "streaming", "object", "dataset", required=False)
    c.field(model, "name", "str", "model", required="model" in report)
    c.field(model, "weights", "str", "model", required=False)
    source = c.field(model, "import", "object", "model", required=False) or {}
    c.field(source, "top1", "fraction", "model.import", required=False)
    c.field(source, "val_top1", "fraction", "model.import", required=False)
    c.field(source, "parity", "object", "model.import", required=False)

    stages = c.items(report, "stages", "")
    for path, stage in stages:
        c.field(stage, "name", "str", path)
        c.field(stage, "top1", "fraction", path)
        for key in ("params", "macs", "size_bytes"):
            c.field(stage, key, "number", path)
        c.field(stage, "kind", "str", path, required=False)
        c.field(stage, "val_top1", "fraction", path, required=False)
        c.field(stage, "seconds", "number", path, required=False)
        c.field(stage, "train_seconds", "number", path, required=False)
        c.field(stage, "checkpoint", "str", path, required=False)
        notes = c.field(stage, "notes", "list", path, required=False) or []
        for i, note in enumerate(notes):
            if not isinstance(note, str):
                c.problems.append(f"{path}.notes[{i}] is {_describe(note)}; expected a string")
    if stages and stages[0][1].get("name") not in (None, "baseline"):
        c.problems.append(f"stages[0].name is {stages[0][1]['name']!r}; the first stage must be 'baseline'")
    c.unique(stages, "name")

    artifacts = c.items(report, "artifacts", "")
    for path, artifact in artifacts:
        _check_artifact(c, path, artifact)
    artifact_names = c.unique(artifacts, "name")

    devices = c.items(report, "devices", "")
    for path, device in devices:
        c.field(device, "name", "str", path)
        c.field(device, "description", "str", path, required=False)
        c.field(device, "accuracy_budget_pt", "number", path, required=False)
        c.field(device, "provenance", "object", path, required=False)
        results = c.items(device, "results", path)
        for rpath, result in results:
            _check_result(c, rpath, result, artifact_names)
        rec = c.field(device, "recommendation", "object", path, required=False)
        if rec is not None:
            name = c.field(rec, "artifact", "str", f"{path}.recommendation")
            c.field(rec, "reason", "str", f"{path}.recommendation", required=False)
            if name is not None and name not in {r.get("artifact") for _, r in results}:
                c.problems.append(f"{path}.recommendation.artifact {name!r} is not among this device's results")
    c.unique(devices, "name")

    if c.problems:
        raise RescompressError("report.json: " + "; ".join(c.problems))


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report.json; a missing or unreadable file is a RescompressError."""
    path = Path(path)
    if not path.is_file():
        raise RescompressError(
            f"{path} not found: give the run directory of a `rescompress run` (it holds report.json)"
        )
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RescompressError(f"{path} is not valid JSON ({exc}); re-run the recipe to rewrite it") from exc
    validate_report(report)
    return report


def latency_accuracy(result: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(p50 latency in ms, top-1 fraction) of a device result; None where unknown."""
    latency = result.get("latency") or {}
    return latency.get("p50_ms"), result.get("top1")


def pareto_front(rows: Sequence[tuple[float | None, float | None]]) -> set[int]:
    """Indices of the (latency, accuracy) rows no other row dominates; rows with a None are left out.

    Row j dominates row i when it is at least as fast and at least as accurate, and strictly better in
    one of the two. Exact ties dominate nothing, so both stay on the front.
    """
    points = [(i, lat, acc) for i, (lat, acc) in enumerate(rows) if lat is not None and acc is not None]
    return {
        i for i, lat, acc in points
        if not any(l2 <= lat and a2 >= acc and (l2 < lat or a2 > acc) for _, l2, a2 in points)
    }
