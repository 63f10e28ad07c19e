"""Plan and run a recipe: baseline -> stages -> exports -> per-device measurement -> report.

`make_plan` checks everything that can be checked without training (files, weights, stage order, targets,
devices). `run` executes the plan in a run directory; every finished step is recorded in `manifest.json`
with its checkpoint and content hash, so `resume` continues after the last finished training step (and
mid-step from the per-epoch training state), keeps the exports whose files still match their hash, and
measures and reports again.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from rich.console import Console

from rescompress import distributed
from rescompress.devices import DeviceProfile, estimate_pool, load_device
from rescompress.errors import PlanError, RescompressError, ResumeError, WeightsError
from rescompress.recipe import Recipe, load_recipe, parse_recipe, save_resolved
from rescompress.rundir import Manifest, load_checkpoint, new_run_dir, now, save_checkpoint, sha256
from rescompress.stages import STAGES

RESOLVED = "recipe.yaml"
# what --resume does with each kind of step
RESUME_REDOES = ("finished training steps are loaded from their hash-checked checkpoints and finished exports are "
                 "kept when their files' hashes match (a failed or changed one is exported again); measure and "
                 "report always run again")


@dataclass
class Plan:
    recipe: Recipe
    data: Any  # DatasetBundle
    arch: dict  # build_model arguments: name, num_classes, in_channels, small_input
    devices: list[DeviceProfile]
    weights_note: str = ""
    source: Optional[Path] = None
    warnings: list[str] = field(default_factory=list)  # printed before the plan (e.g. a shadowed device profile)
    prune_reach: Optional[tuple[int, Any]] = None  # (index, TargetReach) of the first prune stage: what it reaches
    start: Any = None  # imports.start.StartModel when model.weights is a Keras/ONNX file or an imported checkpoint

    @property
    def steps(self) -> list[str]:
        return ["baseline"] + [stage_step(i, s.kind) for i, s in enumerate(self.recipe.stages)] + ["export", "measure", "report"]

    def describe(self) -> str:
        from rescompress.models.arch import describe_arch

        r, d = self.recipe, self.data
        lines = [
            f"recipe   {r.name}" + (f"  ({self.source})" if self.source else ""),
            f"data     {d.name}: train {len(d.train)} / val {len(d.val)} / test {len(d.test)}, {d.num_classes} classes, "
            f"input {d.input_spec.channels}x{d.input_spec.height}x{d.input_spec.width}"
            + (f", streamed from disk by {d.streaming['workers']} worker(s) ({d.streaming['index']})"
               if d.streaming else ", in memory"),
            f"         eval transform: {d.input_spec.describe()}",
            f"model    {describe_arch(self.arch)} ({self.arch['num_classes']} classes, {self.arch['in_channels']} "
            f"input channels)",
        ]
        if r.model.weights:
            lines.append(f"weights  {r.model.weights}: {self.weights_note}")
        if self.start is not None:
            lines.append(f"import   {self.start.describe()}")
            lines += [f"         {note}" for note in self.start.notes]
        base = f"train {r.train.epochs} epochs" if r.train.epochs else "evaluate only (train.epochs: 0)"
        lines.append("steps")
        lines.append(f"  baseline          {base}, freeze {r.model.freeze}")
        prune_target = self.prune_reach
        for i, s in enumerate(r.stages):
            lines.append(f"  {stage_step(i, s.kind):<17} {json.dumps(s.config.model_dump(mode='json'))}")
            if prune_target is not None and prune_target[0] == i:
                lines.append(f"  {'':<17} {prune_target[1].describe()}")
            if STAGES.get(s.kind).quantizes and getattr(s.config, "scheme", "") is None:
                from rescompress.compress.quantize import default_scheme

                scheme, why = default_scheme(self.devices)
                lines.append(f"  {'':<17} int8 scheme: {scheme} ({why})")
        lines.append(f"  export            {', '.join(e.name for e in r.export)}  (+ the torch model as reference)")
        lines.append(f"  measure           top-1 in each runtime; latency batch {r.report.latency.batch}, "
                     f"{r.report.latency.warmup} warm-up, {r.report.latency.runs} runs, on")
        for dev in self.devices:
            how = ", ".join(f"{rt} {dev.latency_plan(rt)}" for rt in dev.runtimes)
            where = f" via ssh {dev.ssh.destination}:{dev.ssh.port}" if dev.ssh else ""
            lines.append(f"  {'':<17} {dev.name}: {how}{where}")
        lines.append(f"  report            report.json, report.md, report.html, plots/ (accuracy budget {r.report.accuracy_budget_pt} pt)")
        if r.sweep is not None:
            lines.append("  (the recipe's sweep: section is read by `rescompress sweep`; this run is the recipe as written)")
        return "\n".join(lines)


def stage_step(index: int, kind: str) -> str:
    return f"{index + 1:02d}-{kind}"


def make_plan(recipe: Recipe, source: Optional[Path] = None, cache_dir: Optional[Path] = None) -> Plan:
    """Validate everything that can be checked before training; raise a RescompressError otherwise.
    `cache_dir` holds the file index of an on-disk dataset (a run directory, or a sweep's): read from there
    when present, written there when not."""
    from rescompress.accel import check_train
    from rescompress.models import MODELS, build_arch, load_weights
    from rescompress.stages import check_order

    start = open_start_model(recipe)
    if start is None:
        MODELS.get(recipe.model.name)  # unknown model: fails before the data loads
    check_order([s.kind for s in recipe.stages], [s.config for s in recipe.stages])
    check_train(recipe.train)  # the training device and precision exist here (accel.DeviceError otherwise)
    devices, shadowed = load_devices(recipe.devices)
    check_exports(recipe, devices)
    data = load_data(recipe, cache_dir, start)
    if start is not None:
        measure_start_parity(recipe, start, data)
        arch = start.arch_for(recipe.model.num_classes or data.num_classes)
        check_graph_model(recipe, arch)
    else:
        arch = resolve_arch(recipe, data)
    if arch["in_channels"] != data.input_spec.channels:
        raise WeightsError(f"model.in_channels is {arch['in_channels']} but the data has {data.input_spec.channels} "
                           f"channels; set data.channels: {arch['in_channels']} or drop model.in_channels")
    prune_reach = _check_prune_target(recipe, arch, data.input_spec)
    note = ""
    if start is not None:
        note = start.load_into(build_arch(arch))
    elif recipe.model.weights:
        report = load_weights(build_arch(arch), recipe.model.weights, model_name=arch["name"])
        note = report.note or f"{report.loaded} tensors fit"
    warnings = shadowed + (start_warnings(recipe, start) if start is not None else [])
    return Plan(recipe=recipe, data=data, arch=arch, devices=devices, weights_note=note, source=source,
                warnings=warnings, prune_reach=prune_reach, start=start)


def open_start_model(recipe: Recipe) -> Any:
    """The imported model `model.weights` names (a Keras or ONNX file, imported now, or a checkpoint written by
    `rescompress import`), or None for a PyTorch state_dict or no weights."""
    if not recipe.model.weights:
        return None
    from rescompress.imports.start import open_start

    start = open_start(recipe.model.weights, image_size=recipe.data.image_size, channels=recipe.data.channels)
    if start is not None and "name" in recipe.model.model_fields_set and recipe.model.name != start.arch["name"]:
        raise PlanError(f"model.name is {recipe.model.name}, but {recipe.model.weights} imports as "
                        f"{start.arch['name']}; drop model.name (an imported model brings its architecture)")
    if start is not None and recipe.model.stem != "auto":
        raise PlanError(f"model.stem: {recipe.model.stem} cannot change an imported model's architecture; drop it")
    return start


def check_graph_model(recipe: Recipe, arch: dict) -> None:
    """What needs a ResNet's stage modules (layer1, layer2, ...) is refused for a graph model up front."""
    from rescompress.models import GRAPH_ARCH

    if arch["name"] != GRAPH_ARCH:
        return
    if recipe.model.freeze == "stages_1_2":
        raise PlanError("model.freeze: stages_1_2 needs a ResNet with stages (layer1, layer2, ...); the imported graph "
                        "model has none: use backbone or none")
    for i, s in enumerate(recipe.stages):
        if s.kind == "distill" and getattr(s.config, "feature_weight", 0.0) > 0:
            raise PlanError(f"stages[{i}].distill: feature_weight needs a ResNet with stages (layer1, layer2, ...) "
                            "to match; the imported graph model has none: set feature_weight: 0")


def measure_start_parity(recipe: Recipe, start: Any, data: Any) -> None:
    """A model imported in this process is compared with its source on the recipe's own images (the validation
    split, else the test split); a difference above the tolerance fails the plan."""
    if start.imported is None:
        return
    import numpy as np

    from rescompress.data import batches
    from rescompress.imports.start import PARITY_IMAGES, measure_on_images

    split = data.val if len(data.val) else data.test
    part = split.subset(np.arange(min(PARITY_IMAGES, len(split))))
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in batches(part, data.input_spec, PARITY_IMAGES)])
    labels = np.concatenate(ys)
    if start.num_classes != data.num_classes:
        labels = None  # the source predicts other classes: agreement is still measured, accuracy is not
    measure_on_images(start, np.concatenate(xs), labels, recipe.model.import_tolerance)


def start_warnings(recipe: Recipe, start: Any) -> list[str]:
    out = []
    if start.normalization is None and recipe.data.normalize == "auto":
        out.append(f"{recipe.model.weights} records no input normalisation; the data is normalised with the training "
                   "split's own statistics (data.normalize: dataset). Set data.normalize to what the model was "
                   "trained with")
    elif start.normalization is not None and recipe.data.normalize != "auto":
        out.append(f"data.normalize is set, so it replaces the normalisation {recipe.model.weights} was trained "
                   f"with (mean {start.normalization['mean']}, std {start.normalization['std']})")
    return out


INDEX_FILE = "data-index-{key}.json"


def index_path(recipe: Recipe, cache_dir: Path) -> Path:
    """Where an on-disk dataset's file index is cached: one file per (source, root)."""
    import hashlib

    key = hashlib.sha256(f"{recipe.data.name}\0{Path(recipe.data.root or '').resolve()}".encode()).hexdigest()[:12]
    return cache_dir / INDEX_FILE.format(key=key)


def resolve_normalize(recipe: Recipe, start: Any = None) -> Any:
    """`data.normalize` made concrete: `auto` is the imported model's own normalisation when it records one,
    ImageNet statistics when the weights are an ImageNet checkpoint (a 1000-class head), the training split's
    own statistics otherwise."""
    n = recipe.data.normalize
    if n != "auto":
        return n if isinstance(n, str) else {"mean": list(n.mean), "std": list(n.std)}
    if start is not None:
        return "dataset" if start.normalization is None else {**start.normalization, "origin": "model"}
    if recipe.model.weights:
        from rescompress.models import read_state_dict

        fc = read_state_dict(recipe.model.weights).get("fc.weight")
        if fc is not None and fc.ndim == 2 and fc.shape[0] == 1000 and (recipe.data.channels or 3) == 3:
            return "imagenet"
    return "dataset"


def load_data(recipe: Recipe, cache_dir: Optional[Path] = None, start: Any = None) -> Any:
    """The recipe's dataset: in memory for the small built-in sources, streamed from disk for image folders and
    manifests (refused up front when a training batch would not fit in memory). An imported model's input size
    and channels apply where the recipe leaves them unset."""
    from rescompress.data import ON_DISK, StreamOptions, load_dataset
    from rescompress.data.files import check_stream_memory, default_workers

    d = recipe.data
    image_size = d.image_size or (start.height if start is not None else None)
    channels = d.channels or (start.channels if start is not None else None)
    if start is not None and start.height != start.width:
        raise PlanError(f"{recipe.model.weights} takes {start.height}x{start.width} inputs; rescompress feeds square "
                        "images (data.image_size)")
    options = None
    if d.name in ON_DISK:
        workers = default_workers() if d.workers is None else d.workers
        check_stream_memory(image_size or 224, channels or 3, max(recipe.train.batch_size,
                                                                      recipe.train.eval_batch_size), workers)
        options = StreamOptions(workers=workers, interpolation=d.interpolation, crop_fraction=d.crop_fraction,
                                crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio),
                                color_jitter=d.color_jitter, stats_images=d.stats_images, on_corrupt=d.on_corrupt,
                                index_cache=index_path(recipe, cache_dir) if cache_dir is not None else None)
    return load_dataset(d.name, root=d.root, image_size=image_size, channels=channels,
                        val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=recipe.seed,
                        limit_train=d.limit_train, normalize=resolve_normalize(recipe, start), options=options)


def load_devices(names: list[str]) -> tuple[list[DeviceProfile], list[str]]:
    """The recipe's device profiles, and a warning for each local profile that shadows a built-in one (a
    profile carries commands that are run: the user must see which file is used)."""
    import warnings

    from rescompress.devices import ProfileShadowWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProfileShadowWarning)
        devices = [load_device(name) for name in names]
    for w in caught:
        if not issubclass(w.category, ProfileShadowWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return devices, [str(w.message) for w in caught if issubclass(w.category, ProfileShadowWarning)]


def _check_prune_target(recipe: Recipe, arch: dict, spec: Any) -> Optional[tuple[int, Any]]:
    """The first prune stage's target must be reachable on this architecture (later ones depend on it).
    Returns (that stage's index, the TargetReach it will reach), or None without a prune stage."""
    first = next((i for i, s in enumerate(recipe.stages) if s.kind == "prune"), None)
    if first is None:
        return None
    import torch

    from rescompress.compress.prune import check_target
    from rescompress.models import build_arch

    try:
        reach = check_target(recipe.stages[first].config, build_arch(arch),
                             torch.zeros(1, spec.channels, spec.height, spec.width))
    except PlanError as exc:
        raise PlanError(f"stages[{first}].prune: {exc}") from None
    return first, reach


def check_exports(recipe: Recipe, devices: list[DeviceProfile] = ()) -> None:
    """An int8 export needs an int8 model (a qat or ptq stage must produce it) in a layout its runtime can
    run, and every export's backend must be installed."""
    import importlib.util

    from rescompress.errors import BackendMissingError
    from rescompress.export import TARGETS

    quantizing = [s.kind for s in recipe.stages if STAGES.get(s.kind).quantizes]
    for i, entry in enumerate(recipe.export):
        target = TARGETS.get(entry.target)
        if target.source(entry.config) == "int8" and not quantizing:
            int8 = ", ".join(n for n, spec in STAGES.items() if spec.quantizes)
            raise PlanError(f"export[{i}] {entry.name} needs an int8 model, but no stage quantizes: add one of "
                            f"{int8} to stages (qat keeps the most accuracy, ptq is quicker)")
        if target.source(entry.config) == "int8":
            stage = next(s for s in recipe.stages if STAGES.get(s.kind).quantizes)
            scheme = getattr(stage.config, "scheme", None)
            if scheme is None:
                from rescompress.compress.quantize import default_scheme

                scheme = default_scheme(list(devices))[0]
            if scheme not in target.schemes:
                also = " (tensorrt's symmetric int8 also suits onnx and tflite)" if "tensorrt" in target.schemes else ""
                raise PlanError(f"export[{i}] {entry.name} cannot ship the {stage.kind} stage's {scheme} int8 "
                                f"layout; set {stage.kind}.scheme to {' or '.join(target.schemes)}{also}")
        needed = target.requires(entry.config)
        if needed and importlib.util.find_spec(needed[0]) is None:
            raise BackendMissingError(f"export[{i}] {entry.name} needs {needed[0]}, which is not installed: "
                                      f"pip install 'rescompress[{needed[1]}]'")


def resolve_arch(recipe: Recipe, data: Any) -> dict:
    """The build_model arguments. `stem: auto` follows the weights file when one is given (a torchvision
    file has the 7x7 ImageNet stem), else picks the small-input stem for images under 96 pixels."""
    spec = data.input_spec
    small = {"small": True, "imagenet": False}.get(recipe.model.stem)
    if small is None and recipe.model.weights:
        from rescompress.models import read_state_dict

        conv1 = read_state_dict(recipe.model.weights).get("conv1.weight")
        small = None if conv1 is None or conv1.ndim != 4 else conv1.shape[-1] == 3
    if small is None:
        small = min(spec.height, spec.width) < 96
    return {
        "name": recipe.model.name,
        "num_classes": recipe.model.num_classes or data.num_classes,
        "in_channels": recipe.model.in_channels or spec.channels,
        "small_input": small,
    }


# ----------------------------------------------------------------------------------------------- running


class Runner:
    """Executes a Plan in a run directory, step by step, recording each finished step."""

    def __init__(self, plan: Plan, run_dir: Path, manifest: Manifest, console: Console) -> None:
        self.plan, self.run_dir, self.manifest, self.console = plan, run_dir, manifest, console
        self.recipe = plan.recipe
        self.data = plan.data
        self.eval_set: Any = None  # the images devices evaluate on (bench.device_eval.EvalSet), once written

    # -- helpers
    def _example(self, batch: int = 1):
        import torch

        spec = self.data.input_spec
        return torch.zeros(batch, spec.channels, spec.height, spec.width)

    def _stage_record(self, name: str, kind: str, model: Any, seconds: float, train_seconds: float,
                      notes: list[str], history: Optional[list] = None, extra: Optional[dict] = None) -> dict:
        from rescompress.accel import train_device
        from rescompress.profile import profile
        from rescompress.rundir import checkpoint_suffix
        from rescompress.train import evaluate

        bs = self.recipe.train.eval_batch_size
        spec = self.data.input_spec
        device = train_device(self.recipe.train)
        val = evaluate(model, self.data.val, spec, bs, device=device) if len(self.data.val) else None
        ckpt = Path("checkpoints") / f"{'00-' if name == 'baseline' else ''}{name}{checkpoint_suffix(model)}"
        return {"name": name, "kind": kind, "top1": evaluate(model, self.data.test, spec, bs, device=device), "val_top1": val,
                "precision": "fp32", **(extra or {}), **profile(model, self._example()), "seconds": round(seconds, 2),
                "train_seconds": round(train_seconds, 2),
                "checkpoint": str(ckpt), "notes": notes, "history": history or []}

    def _load_step(self, step: str) -> Any:
        done = self.manifest.done(step)
        return load_checkpoint(self.run_dir / done["checkpoint"], done["sha256"], self.plan.arch)

    def _finish_step(self, step: str, model: Any, record: dict) -> None:
        ckpt = self.run_dir / record["checkpoint"]
        if distributed.is_main():
            save_checkpoint(ckpt, model, self.plan.arch, self.data.input_spec.to_dict(), step,
                            {k: record[k] for k in ("top1", "val_top1")})
        distributed.barrier()  # the other ranks read what rank 0 wrote (a later stage loads the baseline)
        digest = sha256(ckpt)
        self.manifest.mark(step, record=record, checkpoint=record["checkpoint"], sha256=digest, seconds=record["seconds"])
        if distributed.is_main():
            (self.run_dir / "checkpoints" / f"{step}.state.pt").unlink(missing_ok=True)
        self.console.print(f"[green]✓[/green] {step}: test top-1 {record['top1'] * 100:.2f}%  "
                           f"params {record['params']:,}  MACs {record['macs']:,}  ({record['seconds']:.1f}s)")

    # -- steps
    def baseline(self) -> Any:
        import torch

        from rescompress.models import apply_freeze, build_arch, load_weights
        from rescompress.train import fit, training_clock

        step = "baseline"
        if (done := self.manifest.done(step)):
            self.console.print(f"[dim]baseline: done earlier, loading {done['checkpoint']}[/dim]")
            return self._load_step(step)
        t0 = time.time()
        torch.manual_seed(self.recipe.seed)
        model = build_arch(self.plan.arch)
        notes = []
        if self.plan.start is not None:
            notes.append(f"weights from {self.recipe.model.weights}: {self.plan.start.load_into(model)}")
        elif self.recipe.model.weights:
            rep = load_weights(model, self.recipe.model.weights, model_name=self.plan.arch["name"])
            notes.append(f"weights from {self.recipe.model.weights}" + (f" ({rep.note})" if rep.note else ""))
        frozen = apply_freeze(model, self.recipe.model.freeze)
        if frozen:
            notes.append(f"freeze {self.recipe.model.freeze}: {frozen:,} parameters frozen")
        history = []
        with training_clock() as spent:
            if self.recipe.train.epochs:
                history = fit(model, self.data, self.recipe.train, seed=self.recipe.seed, console=self.console,
                              state_path=self.run_dir / "checkpoints" / f"{step}.state.pt", desc="baseline")
        for p in model.parameters():
            p.requires_grad_(True)
        record = self._stage_record(step, "train", model.eval(), time.time() - t0, spent[0], notes, history)
        self._finish_step(step, model, record)
        return model

    def stage(self, index: int, model: Any) -> Any:
        from rescompress.stages import StageContext
        from rescompress.train import training_clock

        entry = self.recipe.stages[index]
        step = stage_step(index, entry.kind)
        if (done := self.manifest.done(step)):
            self.console.print(f"[dim]{step}: done earlier, loading {done['checkpoint']}[/dim]")
            return self._load_step(step)
        spec = STAGES.get(entry.kind)
        ctx = StageContext(recipe=self.recipe, data=self.data, work_dir=self.run_dir / "checkpoints" / step,
                           console=self.console, seed=self.recipe.seed, index=index, arch=self.plan.arch,
                           example=self._example(2), devices=self.plan.devices, teacher=copy.deepcopy(model).eval(),
                           baseline=lambda: self._load_step("baseline"))
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        self.console.rule(f"{step}: {spec.summary}")
        with training_clock() as spent:
            model = spec.run(model, entry.config, ctx).eval()
        record = self._stage_record(step, entry.kind, model, time.time() - t0, spent[0], ctx.notes,
                                    extra=ctx.record)
        self._finish_step(step, model, record)
        if distributed.is_main():
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
        return model

    def export_sources(self, model: Any) -> dict[str, tuple[str, Any]]:
        """Which model each precision is exported from: int8 from the quantized model the stages left,
        everything else from the last float model (the step before the int8 stage)."""
        from rescompress.compress.qgraph import is_quantized

        steps = self.plan.steps[:-3]
        if not is_quantized(model):
            return {"fp32": (steps[-1], model)}
        first_int8 = next(i for i, s in enumerate(self.recipe.stages) if STAGES.get(s.kind).quantizes)
        float_step = steps[first_int8]  # steps[0] is the baseline, so this is the step before that stage
        return {"fp32": (float_step, self._load_step(float_step)), "int8": (steps[-1], model)}

    def export(self, model: Any) -> list:
        from rescompress.export import TARGETS
        from rescompress.export.torch_eager import torch_artifact

        sources = self.export_sources(model)
        artifacts = []
        for precision, (step, source) in sources.items():
            done = self.manifest.done(step)
            art = torch_artifact(source, self.data.input_spec, name=f"torch-{precision}", precision=precision,
                                 from_stage=step, checkpoint=self.run_dir / done["checkpoint"])
            if precision == "int8":
                art.accuracy_only = "PT2E model: torch eager simulates its quantize/dequantize in float"
            artifacts.append(art)
        out_dir = self.run_dir / "artifacts"
        out_dir.mkdir(exist_ok=True)
        kept = self.kept_exports()
        for entry in self.recipe.export:
            target = TARGETS.get(entry.target)
            family = target.source(entry.config)
            step, source = sources[family]
            if entry.name in kept:
                artifacts.append(kept[entry.name])
                self.console.print(f"[dim]{entry.name}: exported earlier, kept ({kept[entry.name].path.name}, "
                                   f"hash checked)[/dim]")
                continue
            self.console.print(f"exporting {entry.name} from {step} ...")
            t0 = time.time()
            path = out_dir / f"{entry.name}{target.suffix}"
            try:
                art = target.export(source, self._example(2), entry.config, path, spec=self.data.input_spec,
                                    from_stage=step, devices=self.plan.devices, calibration=self._calibration)
            except RescompressError:
                raise
            except Exception as exc:  # the exporter broke on this model: keep the run, record why
                art = self._failed_export(entry, path, step, exc)
            art.name, art.reference = entry.name, f"torch-{family}"
            self.console.print(f"[green]✓[/green] {entry.name}: {art.status}, {art.size_bytes or 0:,} bytes ({time.time() - t0:.1f}s)")
            self._lint(art)
            artifacts.append(art)
        return artifacts

    def layer_table(self, model: Any) -> list:
        """Per-layer MACs and bytes of the float model the exports come from (int8 keeps its structure),
        at the latency batch: what latency estimates are computed from."""
        from rescompress.bench.estimate import layer_table

        _, source = self.export_sources(model)["fp32"]
        return layer_table(source, self._example(self.recipe.report.latency.batch))

    def _calibration(self, n: int):
        """`n` shuffled training images, normalised NCHW float32: what post-training converters calibrate on."""
        import numpy as np

        from rescompress.data import batches

        split = self.data.train
        pick = np.sort(np.random.default_rng(self.recipe.seed).permutation(len(split))[:n])
        xs = [x.numpy() for x, _ in batches(split.subset(pick), self.data.input_spec, 64)]
        return np.concatenate(xs)

    def _lint(self, art: Any) -> None:
        """Lint the file in every runtime it is meant for; the findings go into the report."""
        from rich.markup import escape

        from rescompress.export.lint import lint_file

        if art.path is None or not art.path.exists():
            return
        cpus = [d for d in self.plan.devices if "onnxruntime" in d.runtimes]  # whose CPUs the onnxruntime lint judges
        for target in lint_targets(art, self.plan.devices):
            if target in art.lint_checked:
                continue
            try:
                art.add_lint(lint_file(art.path, target, cpus if target == "onnxruntime" else ()))
            except Exception as exc:  # a lint crash must not cost the run its artifacts: it is an error finding
                art.add_lint_crash(target, exc)
        for target, checked in art.lint_checked.items():  # the exporter's own lint included
            colour = "green" if checked["passed"] else "red"
            verdict = "passes" if checked["passed"] else "FAILS"
            self.console.print(f"  [{colour}]lint {target} {verdict}[/{colour}]: {checked['errors']} error(s), "
                               f"{checked['warnings']} warning(s) ({escape(checked['checked'])})")
            for f in [f for f in art.lint if f["target"] == target and f["severity"] == "error"][:5]:
                fix = f"  fix: {f['fix']}" if f.get("fix") else ""
                self.console.print("    " + escape(f"{f['rule']} [{f['node']}]: {f['message']}{fix}"), soft_wrap=True)

    def index(self, artifacts: list) -> dict:
        """Path, hash and status of every artifact, for the manifest, with the record a resumed run rebuilds an
        export from (`kept_exports`)."""
        return {a.name: {"path": str(a.path.relative_to(self.run_dir)) if a.path else None,
                         "sha256": sha256(a.path) if a.path and a.path.exists() else None,
                         "status": a.status,
                         **({} if a.target == "torch" else {"record": {**a.to_report(), "reference": a.reference}})}
                for a in artifacts}

    def kept_exports(self) -> dict:
        """On resume, the exports a finished export step wrote (ok or deferred) whose file still has the hash
        it was written with, by name; a failed, missing or changed one is exported again."""
        from rescompress.export import TARGETS, Artifact

        done = self.manifest.done("export")
        kept = {}
        for name, entry in ((done or {}).get("artifacts") or {}).items():
            record, path = entry.get("record"), self.run_dir / entry["path"] if entry.get("path") else None
            if record is None or entry["status"] not in ("ok", "deferred") or path is None:
                continue
            if not path.is_file() or sha256(path) != entry["sha256"]:
                self.console.print(f"[yellow]{name}: {entry['path']} is not the file exported earlier; "
                                   f"exporting it again[/yellow]")
                continue
            reload = TARGETS.get(record["target"]).reload(record.get("details") or {})
            kept[name] = Artifact.from_record(record, path, reload if entry["status"] == "ok" else None)
        return kept

    def _failed_export(self, entry: Any, path: Path, from_stage: str, exc: Exception) -> Any:
        import traceback

        from rescompress.export import Artifact

        log = self.run_dir / "logs" / f"export-{entry.name}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return Artifact(name=entry.name, target=entry.target, precision=entry.config.precision, path=None,
                        input_spec=self.data.input_spec, runtime="", status="failed", from_stage=from_stage,
                        message=f"{type(exc).__name__}: {first} (traceback: {log.relative_to(self.run_dir)})")

    def measure(self, artifacts: list, baseline: dict, layers: Callable[[], Any]) -> tuple[list[dict], list[dict]]:
        """Accuracy and parity of every artifact in its own runtime (validation and test splits), then
        latency per device (measured here, on the device over ssh, or estimated from `layers`, the float
        model's layer table). `baseline` is the baseline step's record (its `top1` and `val_top1`)."""
        from rich.markup import escape

        from rescompress.bench.device_latency import DeviceLatency, latency_input
        from rescompress.train import progress_bar

        from rescompress.data import batches

        spec = self.data.input_spec
        splits = {"top1": self.data.test}
        if len(self.data.val):
            splits["val_top1"] = self.data.val
        self._reference_logits: dict = {}
        self._host_logits: dict = {}  # artifact -> split key -> logits, what device top-1 is compared with
        by_name = {a.name: a for a in artifacts}
        art_rows = []
        for art in artifacts:
            row = art.to_report()
            row["path"] = str(art.path.relative_to(self.run_dir)) if art.path else None
            if art.status == "ok":
                row.update(self._accuracy(art, art, splits, by_name.get(art.reference),
                                          f"{art.runtime} on this host"))
                art.release()
            elif art.status == "deferred" and art.path is not None and art.path.suffix == ".onnx":
                row.update(self._proxy_accuracy(art, splits, by_name.get(art.reference)))
            art_rows.append(row)
            acc = f"top-1 {row['top1'] * 100:.2f}%" if row.get("top1") is not None else art.status
            par = f", max |Δlogit| {row['parity']['max_abs_diff']:.2e}" if row.get("parity") else ""
            self.console.print(f"  {art.name:<12} {acc} on {art.runtime}{par}")
            if row.get("top1_status") == "failed":
                self.console.print(f"  [red]{art.name}: no top-1: {escape(row['top1_message'])}[/red]", soft_wrap=True)

        lat = self.recipe.report.latency
        x_lat = latency_input(next(iter(batches(self.data.test, spec, lat.batch)))[0].numpy(), lat.batch)
        pool = estimate_pool(self.plan.devices)
        pack = self._device_eval_packer(splits)
        devices = []
        for device in self.plan.devices:
            threads = device.threads or lat.threads
            results = []
            with progress_bar(self.console) as progress:

                def measure_here(art: Any) -> dict:
                    from rescompress.bench.latency import TEST_IMAGES, time_artifact

                    task = progress.add_task(f"{device.name}: {art.name}", total=lat.runs, info="")
                    try:  # as `rescompress bench FILE` times it on this host
                        return time_artifact(art, x_lat, input_kind=TEST_IMAGES, warmup=lat.warmup, runs=lat.runs,
                                             threads=threads, progress=lambda: progress.advance(task))
                    finally:
                        progress.remove_task(task)

                source = DeviceLatency(device, batch=lat.batch, warmup=lat.warmup, runs=lat.runs, threads=threads,
                                       layers=layers, measure_here=measure_here, pool=pool, pack=pack,
                                       engine_dir=self.run_dir / "artifacts" / "engines" / device.name)
                for art, row in zip(artifacts, art_rows):
                    if runs_on(art, device):
                        results.append(self._device_result(device, art, row, source, baseline))
            devices.append({"name": device.name, "description": device.description,
                            "accuracy_budget_pt": self.recipe.report.accuracy_budget_pt, "results": results,
                            "recommendation": recommend(results, self.recipe.report.accuracy_budget_pt),
                            "provenance": {**source.provenance(), **device.provenance()}})
        return art_rows, devices

    def _device_eval_packer(self, splits: dict) -> Optional[Callable[[Any], Any]]:
        """What a device evaluates each artifact on: the validation and test images (a stratified subset of each
        of `report.device_eval_images`), written once into `device_eval/` of the run, then packed per artifact
        as its input takes them. None when no device is reached over a connection or the recipe turns it off."""
        from rescompress.bench.device_eval import build_eval_set, pack_for

        n = self.recipe.report.device_eval_images
        remote = [d for d in self.plan.devices if any(d.latency_plan(rt) == "measured-remote" for rt in d.runtimes)]
        if n == 0 or not remote:
            return None
        out_dir = self.run_dir / "device_eval"
        state: dict = {}

        def pack(art: Any) -> Any:
            if "set" not in state:
                ordered = {k: splits[k] for k in ("val_top1", "top1") if k in splits}
                state["set"] = build_eval_set(ordered, self.data.input_spec, n, out_dir, seed=self.recipe.seed)
                self.eval_set = state["set"]
                self.console.print(f"device evaluation images: {state['set'].describe()} ({out_dir.name}/)")
            if art.name not in state:
                state[art.name] = pack_for(art, state["set"], out_dir)
            return state[art.name]

        return pack

    def _logits(self, run: Callable, split: Any) -> tuple[Any, Any]:
        """(logits, labels) of `run` over a split, batch by batch (an on-disk split is decoded as it goes)."""
        import numpy as np

        from rescompress.data import batches

        outs, labels = [], []
        for x, y in batches(split, self.data.input_spec, 64):
            outs.append(np.asarray(run(x.numpy()), dtype=np.float32))
            labels.append(y.numpy())
        return np.concatenate(outs), np.concatenate(labels)

    def _accuracy(self, art: Any, run: Callable, splits: dict, reference: Any, where: str) -> dict:
        """Top-1 of `run` on each split, and its parity with `reference` on the test split (every artifact's
        test logits are kept, so a reference's are computed once). A runtime that fails on the file is recorded
        (`top1_status: failed` and the message), not raised: the report is still written and the run ends
        with exit 1."""
        from rescompress.export.artifact import parity_of_logits

        try:
            row, test_logits = {}, None
            for key, split in splits.items():
                logits, labels = self._logits(run, split)
                row[key] = float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")
                test_logits = logits if key == "top1" else test_logits
                self._host_logits.setdefault(art.name, {})[key] = logits
            if run is art:  # kept: when a later export's reference is this artifact, its pass is not repeated
                self._reference_logits.setdefault(art.name, test_logits)
            if reference is not None:
                if reference.name not in self._reference_logits:
                    self._reference_logits[reference.name] = self._logits(reference, splits["top1"])[0]
                    reference.release()
                row["parity"] = {**parity_of_logits(test_logits, self._reference_logits[reference.name]),
                                 "reference": reference.name}
        except Exception as exc:  # the runtime cannot run this file: a failure in the report, not a crash
            return {"top1": None, "top1_status": "failed", "top1_message": f"{where}: {type(exc).__name__}: {exc}"}
        return {**row, "top1_source": where, "top1_status": "ok"}

    def _proxy_accuracy(self, art: Any, splits: dict, reference: Any) -> dict:
        """Top-1 of a deferred TensorRT export, from the ONNX file its engine is built from, run in
        onnxruntime here with its Q/DQ computed as written (no fusion: onnxruntime's fused int8 kernels
        saturate int16 sums on CPUs without VNNI, and a TensorRT layout is not theirs). A proxy, labelled
        as one: TensorRT's own kernels round differently."""
        from rescompress.export.onnx import ort_runner, ort_version

        how = "unfused (Q/DQ as written)" if art.precision == "int8" else "graph optimisations off"
        where = (f"proxy: onnxruntime {ort_version()} on this host, {how}, on the ONNX the engine is built from "
                 f"(TensorRT not run)")
        try:
            run = ort_runner(art.path, None, optimize=False)
        except Exception as exc:
            return {"top1": None, "top1_status": "failed", "top1_message": f"{where}: {type(exc).__name__}: {exc}"}
        return self._accuracy(art, run, splits, reference, where)

    def _device_result(self, device: DeviceProfile, art: Any, row: dict, source: Any, baseline: dict) -> dict:
        """One artifact on one device: test and validation top-1 (with where they were measured) and their
        difference from the baseline's, size, and latency with its source."""
        from rich.markup import escape

        res = {"artifact": art.name, "runtime": source.runtime_of(art), "top1": row.get("top1"),
               "val_top1": row.get("val_top1"), "top1_source": row.get("top1_source"),
               "delta_top1_pt": delta_pt(row.get("top1"), baseline.get("top1")),
               "delta_val_top1_pt": delta_pt(row.get("val_top1"), baseline.get("val_top1")),
               "size_bytes": row["size_bytes"], "latency": None, "status": art.status, "message": art.message}
        if row.get("top1_status") == "failed":
            res["top1_status"], res["top1_message"] = "failed", row["top1_message"]
        if art.status in ("failed", "skipped"):
            return res
        taken = source.take(art)
        res["latency"] = taken.latency
        if taken.remote_status is not None:
            res["remote_status"] = taken.remote_status
        if source.pack is not None and taken.remote_status is not None:
            res.update(self._device_top1(art, res, taken, baseline))
        if taken.engine is not None:
            engine = dict(taken.engine)
            if engine.get("path"):
                engine["path"] = str(Path(engine["path"]).relative_to(self.run_dir))
            res["engine"] = engine
        notes = [taken.message] if taken.message else []
        if art.status == "deferred" and (taken.engine or {}).get("path"):
            notes.append(f"engine built on {device.name} with the command the report prints")
        elif art.status == "deferred":
            command = art.details.get("build_commands", {}).get(device.name)
            notes.append(f"engine build deferred: on {device.name} run: {command}" if command else art.message)
        res["message"] = "; ".join(n for n in notes if n)
        lat = taken.latency
        if lat is not None:
            self.console.print(f"  {device.name}: {art.name:<14} p50 {lat['p50_ms']:.3f} ms"
                               + (f"  p90 {lat['p90_ms']:.3f} ms" if lat.get("p90_ms") is not None else "")
                               + f"  ({lat['source']})")
        elif taken.remote_status not in (None, "ok"):
            self.console.print(f"  [yellow]{device.name}: {art.name}: {escape(taken.message)}[/yellow]", soft_wrap=True)
        return res

    def _device_top1(self, art: Any, res: dict, taken: Any, baseline: dict) -> dict:
        """The device's own top-1 of an artifact, beside the host's: `device_eval` (status, per split the
        device's and the host's top-1 on the images sent, their difference and agreement), and, when it worked,
        `top1`/`val_top1` become the device's (`top1_source: device`), the host's kept as `host_top1`/
        `host_val_top1`. With a subset, the device figure is the host's whole-split top-1 moved by the
        difference measured on the same images, so that the subset's sampling error does not enter it."""
        from rescompress.bench.device_eval import score

        evaluation = taken.evaluation
        if evaluation is None:
            return {"device_eval": {"status": taken.remote_status if taken.remote_status != "ok" else "failed",
                                    "message": res.get("message") or "the device ran no evaluation"}}
        record: dict = {"status": evaluation.status, "message": evaluation.message, "method": evaluation.method}
        if evaluation.status != "ok":
            return {"device_eval": record}
        eval_set = self.eval_set
        try:
            splits = score(evaluation.logits, eval_set, self._host_logits.get(art.name, {}))
        except ValueError as exc:
            return {"device_eval": {**record, "status": "failed", "message": str(exc)}}
        record.update(images=eval_set.describe(), subset=eval_set.subset, splits=splits)
        out: dict = {"device_eval": record, "host_top1": res["top1"], "host_val_top1": res["val_top1"],
                     "host_top1_source": res["top1_source"], "top1_source": "device"}
        for key in ("top1", "val_top1"):
            entry = splits.get(key)
            if entry is None or entry["device_top1"] is None:
                out[key] = None
                continue
            host = res.get(key)
            shifted = host is not None and entry.get("delta_pt") is not None
            out[key] = min(1.0, max(0.0, host + entry["delta_pt"] / 100)) if shifted else entry["device_top1"]
            out[f"delta_{key}_pt"] = delta_pt(out[key], baseline.get(key))
        self.console.print(f"  {res['artifact']}: device top-1 {splits['top1']['device_top1'] * 100:.2f}% "
                           f"(host {splits['top1'].get('host_top1', float('nan')) * 100:.2f}% on the same "
                           f"{splits['top1']['images']} images, agreement "
                           f"{splits['top1'].get('agreement', float('nan')) * 100:.1f}%)")
        return out

    def source_accuracy(self) -> dict:
        """The imported model's source, its parity with the import, and its own top-1 on the test and validation
        splits, measured in its own runtime (TensorFlow for Keras, onnxruntime for ONNX)."""
        start = self.plan.start
        src = start.meta.get("source", {})
        record = {"path": src.get("path"), "format": src.get("format"), "runtime": src.get("runtime"),
                  "architecture": src.get("architecture"), "preprocessing": start.meta.get("preprocessing"),
                  "parity": start.parity, "notes": list(start.notes), "top1": None, "val_top1": None}
        if record["format"] == "torch":
            return {**record, "top1_status": "skipped",
                    "top1_message": "the source is a PyTorch state_dict: the baseline's torch top-1 is its top-1"}
        if start.num_classes != self.data.num_classes:
            return {**record, "top1_status": "skipped",
                    "top1_message": f"the source model predicts {start.num_classes} classes, the data has "
                                    f"{self.data.num_classes}"}
        try:
            run = start.source_runner()
            splits = {"top1": self.data.test, **({"val_top1": self.data.val} if len(self.data.val) else {})}
            for key, split in splits.items():
                logits, labels = self._logits(run, split)
                record[key] = float((logits.argmax(1) == labels).mean()) if len(labels) else None
        except Exception as exc:  # the source runtime is gone or fails: a status in the report, not a crash
            return {**record, "top1_status": "failed", "top1_message": f"{type(exc).__name__}: {exc}"}
        self.console.print(f"source model ({record['runtime']}): test top-1 {record['top1'] * 100:.2f}%")
        return {**record, "top1_status": "ok", "top1_source": f"{record['runtime']} on this host"}

    def report(self, art_rows: list[dict], devices: list[dict]) -> dict:
        from rescompress.bench.latency import provenance
        from rescompress.report import SCHEMA_VERSION, write_report
        import rescompress

        stages = [{k: v for k, v in self.manifest.done(s)["record"].items() if k != "history"}
                  for s in self.plan.steps[:-3]]
        started = self.manifest.data["created"]
        report = {
            "schema_version": SCHEMA_VERSION,
            "rescompress_version": rescompress.__version__,
            "recipe": {"name": self.recipe.name, "path": str(self.plan.source) if self.plan.source else None,
                       "accuracy_budget_pt": self.recipe.report.accuracy_budget_pt},
            "run": {"dir": str(self.run_dir), "started": started, "finished": now(),
                    "seconds": round(sum(float(e.get("seconds", 0)) for e in self.manifest.data["steps"].values()), 1),
                    "steps": step_times(self.manifest.data["steps"])},
            "dataset": self.data.summary(),
            "model": {"name": self.plan.arch["name"], "weights": self.recipe.model.weights, "arch": self.plan.arch,
                      **({"import": self.source_accuracy()} if self.plan.start is not None else {})},
            "stages": stages,
            "artifacts": art_rows,
            "devices": devices,
            "provenance": provenance(),
        }
        self._bundle(report)
        write_report(report, self.run_dir)
        return report

    def _bundle(self, report: dict) -> None:
        """A bundle to ship per deployable artifact (`bundles/<artifact>/`), linked from its artifact row and
        from each recommendation of it. A bundle that cannot be written is a message in the report."""
        from rescompress.bundle import write_bundles

        try:
            bundles = write_bundles(self.run_dir, report)
        except Exception as exc:  # the report matters more than its bundles: say why, keep going
            report["bundles_message"] = f"bundles not written: {type(exc).__name__}: {exc}"
            self.console.print(f"[red]{report['bundles_message']}[/red]")
            return
        for row in report["artifacts"]:
            if row["name"] in bundles:
                row["bundle"] = bundles[row["name"]]
        for device in report["devices"]:
            rec = device.get("recommendation")
            if rec and rec["artifact"] in bundles:
                rec["bundle"] = bundles[rec["artifact"]]
        if bundles:
            self.console.print(f"bundles: {', '.join(bundles.values())}")


def step_times(steps: dict) -> list[dict]:
    """Per finished step of the manifest: its wall seconds and, for training steps, the seconds in epochs."""
    rows = []
    for name, entry in steps.items():
        if entry.get("seconds") is None:
            continue
        row = {"step": name, "seconds": float(entry["seconds"])}
        train = (entry.get("record") or {}).get("train_seconds")
        row["train_seconds"] = float(train) if train is not None and not entry.get("reused_from") else 0.0
        rows.append(row)
    return rows


def lint_targets(art: Any, devices: list[DeviceProfile]) -> list[str]:
    """The runtimes an artifact's file is checked for: the ones that will run it. Its own (unless it is only an
    accuracy reference), and TensorRT for an int8 ONNX in TensorRT's layout (the graph an engine is built
    from). An ONNX in another int8 layout is not for TensorRT, even when a device of the recipe runs TensorRT:
    it runs there in onnxruntime, and a TensorRT export of it is refused when the run is planned."""
    if art.target == "tflite":
        return ["tflite"]
    if art.target != "onnx":
        return []
    targets = [] if art.accuracy_only else ["onnxruntime"]
    if art.precision == "int8" and art.details.get("scheme") == "tensorrt":
        targets.append("tensorrt")
    return targets


def runs_on(art: Any, device: DeviceProfile) -> bool:
    """Whether the device runs the artifact's runtime at its precision (the torch references are listed
    everywhere, as accuracy references)."""
    from rescompress.export import TARGETS

    if art.target == "torch":
        return True
    runtime = TARGETS.get(art.target).runtime
    return runtime in device.runtimes and art.precision in device.precisions(runtime)


def delta_pt(top1: Optional[float], reference: Optional[float]) -> Optional[float]:
    """`top1 - reference` in percentage points (None when either is missing)."""
    return None if top1 is None or reference is None else round((top1 - reference) * 100, 3)


# the latency sources, most trustworthy first: a recommendation ranks within the best one it has
SOURCE_RANK = ("measured-remote", "measured", "estimated")


def recommend(results: list[dict], budget_pt: float) -> Optional[dict]:
    """The fastest artifact within the accuracy budget of the baseline.

    The budget is judged on validation top-1 (measured in each artifact's own runtime, against the
    baseline's validation top-1), so that the test top-1 reported beside the choice is not the figure it
    was selected on; without a validation split, test top-1 decides and the reason says so. Latencies are
    ranked within the best source among the candidates (measured-remote, then measured, then estimated):
    an estimate carries tens of percent of error and never beats a measurement."""
    timed = [r for r in results if r.get("latency") and r["latency"].get("p50_ms") is not None]
    on_val = any(r.get("delta_val_top1_pt") is not None for r in timed)
    key, split = ("delta_val_top1_pt", "validation") if on_val else ("delta_top1_pt", "test")
    ok = [r for r in timed if r.get(key) is not None and r[key] >= -budget_pt]
    if not ok:
        return None
    sources = {r["latency"]["source"] for r in ok}
    best_source = min(sources, key=lambda src: SOURCE_RANK.index(src) if src in SOURCE_RANK else len(SOURCE_RANK))
    best = min((r for r in ok if r["latency"]["source"] == best_source), key=lambda r: r["latency"]["p50_ms"])
    reason = (f"fastest {best_source} latency (p50 {best['latency']['p50_ms']:.3f} ms) within {budget_pt} pt of the "
              f"baseline's {split} top-1 ({best[key]:+.2f} pt)")
    if on_val and best.get("delta_top1_pt") is not None:
        reason += f"; test top-1 {best['top1'] * 100:.2f} % ({best['delta_top1_pt']:+.2f} pt), not used to choose"
    elif not on_val:
        reason += "; no validation split, so the choice was made on the test top-1 it reports"
    others = sorted(sources - {best_source}, key=lambda src: SOURCE_RANK.index(src) if src in SOURCE_RANK else 9)
    if others:
        left = sum(1 for r in ok if r["latency"]["source"] != best_source)
        reason += (f"; sources were mixed: {left} candidate(s) with only {'/'.join(others)} latency were not ranked "
                   f"against {best_source} figures")
    if best.get("top1_source") == "device":
        reason += f"; top-1 measured on the device ({(best.get('device_eval') or {}).get('images') or 'its images'})"
    elif (best.get("top1_source") or "").startswith("proxy"):
        reason += " (top-1 from a proxy: see its source)"
    return {"artifact": best["artifact"], "reason": reason, "selected_on": split, "latency_source": best_source}


def failures(report: dict) -> list[str]:
    """What went wrong in a finished run, one line each: a requested export that failed, a top-1 that could
    not be measured, a lint error (a crashed lint included), a device measurement that failed. A deferred
    TensorRT engine is not a failure: its build command is in the report."""
    lines = [report["bundles_message"]] if report.get("bundles_message") else []
    for a in report["artifacts"]:
        if a["status"] == "failed":
            lines.append(f"{a['name']}: export failed: {a.get('message') or 'no message'}")
        if a.get("top1_status") == "failed":
            lines.append(f"{a['name']}: top-1 not measured: {a.get('top1_message') or 'no message'}")
        for target, checked in (a.get("lint_checked") or {}).items():
            errors = [f for f in a.get("lint") or [] if f.get("target") == target and f["severity"] == "error"]
            if errors or not checked.get("passed", True):
                rules = ", ".join(sorted({f["rule"] for f in errors})) or "see the report"
                lines.append(f"{a['name']}: {target} lint: {len(errors)} error(s) ({rules})")
    for d in report["devices"]:
        for r in d["results"]:
            if r.get("remote_status") not in (None, "ok"):
                lines.append(f"{d['name']}: {r['artifact']}: measurement on the device failed "
                             f"({r['remote_status']}): {r.get('message') or 'no message'}")
            elif (r.get("device_eval") or {}).get("status") not in (None, "ok"):
                lines.append(f"{d['name']}: {r['artifact']}: top-1 on the device not measured "
                             f"({r['device_eval']['status']}): {r['device_eval'].get('message') or 'no message'}")
    return lines


def execute(plan: Plan, run_dir: Path, manifest: Manifest, console: Console) -> Optional[dict]:
    """Run every unfinished step; returns the report (None on the ranks other than 0 under torchrun, which
    end after the last training step)."""
    if plan.recipe.train.threads:
        import torch

        torch.set_num_threads(plan.recipe.train.threads)
    runner = Runner(plan, run_dir, manifest, console)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    model = runner.baseline()
    for i in range(len(plan.recipe.stages)):
        model = runner.stage(i, model)
    if not distributed.is_main():
        return None
    t0 = time.time()
    artifacts = runner.export(model)
    manifest.mark("export", seconds=round(time.time() - t0, 2), artifacts=runner.index(artifacts))
    t0 = time.time()
    art_rows, devices = runner.measure(artifacts, manifest.done("baseline")["record"],
                                       layers=functools.cache(lambda: runner.layer_table(model)))
    manifest.mark("measure", seconds=round(time.time() - t0, 2))
    report = runner.report(art_rows, devices)
    manifest.mark("report")
    return report


def prepare_new(recipe_path: Path, out_root: Path, overrides: Sequence[str] = ()) -> tuple[Plan, Path, Manifest]:
    """Validate the recipe and create a fresh run directory holding the resolved recipe. Under torchrun,
    rank 0 creates it and the other ranks plan the same recipe into that directory."""
    if distributed.world().size <= 1:
        return _prepare_new(recipe_path, out_root, overrides)
    made: Any = None
    if distributed.is_main():
        try:
            plan, run_dir, manifest = _prepare_new(recipe_path, out_root, overrides)
            made = str(run_dir)
        except RescompressError as exc:
            made = exc
    made = distributed.broadcast(made)
    if isinstance(made, Exception):
        raise made
    if distributed.is_main():
        return plan, run_dir, manifest
    return (make_plan(load_recipe(recipe_path, overrides), source=recipe_path, cache_dir=Path(made)), Path(made),
            Manifest.load(Path(made)))


def _prepare_new(recipe_path: Path, out_root: Path, overrides: Sequence[str]) -> tuple[Plan, Path, Manifest]:
    recipe = load_recipe(recipe_path, overrides)
    plan = make_plan(recipe, source=recipe_path)
    run_dir = new_run_dir(out_root, recipe.name or "run")
    if plan.data.file_index is not None:  # a resumed run reads it instead of scanning the dataset again
        plan.data.file_index.save(index_path(recipe, run_dir))
    shutil.copyfile(recipe_path, run_dir / "recipe.original.yaml")
    save_resolved(recipe, run_dir / RESOLVED)
    return plan, run_dir, Manifest.create(run_dir, recipe)


def prepare_resume(run_dir: Path, recipe_path: Optional[Path] = None) -> tuple[Plan, Path, Manifest]:
    """Re-plan an existing run from the recipe it was started with."""
    import yaml

    manifest = Manifest.load(run_dir)
    resolved = run_dir / RESOLVED
    if not resolved.is_file():
        raise ResumeError(f"{resolved} is missing; the run cannot be resumed")
    recipe = parse_recipe(yaml.safe_load(resolved.read_text(encoding="utf-8")), str(resolved))
    if recipe_path is not None and load_recipe(recipe_path).digest() != recipe.digest():
        raise ResumeError(f"{recipe_path} differs from the recipe {run_dir} was started with; resume without "
                          f"naming a recipe, or start a new run")
    source = run_dir / "recipe.original.yaml"
    plan = make_plan(recipe, source=source if source.exists() else resolved, cache_dir=run_dir)
    return plan, run_dir, manifest
