"""Sweeps: many variants of one recipe, each an ordinary run, merged into one per-device report.

A sweep directory holds:

    sweep.json            the trials: id, overrides, status (pending | running | done | failed), message
    recipe.original.yaml  the recipe as given
    trials/t000/ …        one ordinary run directory per trial (`rescompress run --resume` works on each)
    cache/<key>/          finished baseline/stage checkpoints, keyed by everything that decides them
    report.json .md .html plots/   the merged report: every trial's artifacts, each measured against its own
                                   trial's baseline, per device the Pareto front over all of them and the
                                   fastest within the accuracy budget

Trials that share a prefix of steps (same model, data, training, seed and the same first stages) reuse its
checkpoints: before a trial runs, the longest prefix found in the cache is copied into its run directory
and marked finished, so the pipeline goes on from there exactly as a resumed run would. With parallel
trials (Ray), a trial waits while another one is computing a step it could reuse. A cache entry whose
checkpoint path leads out of it or out of the trial's checkpoints/ is refused: the trial fails, naming the
entry to delete.

An interrupted sweep resumes with `rescompress sweep --resume DIR`: finished trials are kept as they are,
unfinished ones resume from their last finished step.

Devices under Ray: each trial declares `gpus_per_trial` GPUs and Ray makes those (and only those) visible
to it, so the trial's `train.device` follows what it was given (`trial_device`): `auto` trains on `cuda` in a
trial with a GPU share and on the `cpu` in a trial without one, even on a node with GPUs; a recipe asking
for `cuda` with no GPU per trial is refused when the sweep is created, and `cpu` stays `cpu`. The trial's
resolved recipe (and its cache keys) name the device it trained on. The local backend runs every trial
with the recipe's own device.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from rescompress.errors import RecipeError, RescompressError, ResumeError
from rescompress.fileio import atomic_write_json
from rescompress.recipe import Recipe, RangeSpec, SweepConfig, apply_overrides, parse_recipe, parse_sweep, parse_value

SWEEP_FILE = "sweep.json"
TRIALS = "trials"
CACHE = "cache"


class CacheEntryError(RescompressError):
    """A sweep cache entry cannot be reused as it is."""


# --- what the trials are -------------------------------------------------------------------------

def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """`stages.0.prune.macs_reduction=1.5,2,3` -> ("stages.0.prune.macs_reduction", [1.5, 2, 3]); values are
    read as YAML scalars (numbers, true/false, null, strings), as `run --set` reads its value."""
    path, sep, values = text.partition("=")
    if not sep or not path.strip() or not values.strip():
        raise RecipeError(f"--grid {text!r}: expected PATH=VALUE[,VALUE...], e.g. stages.0.prune.macs_reduction=1.5,2")
    return path.strip(), [parse_value(raw.strip()) if raw.strip() else raw for raw in values.split(",")]


def expand(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The trials' overrides: the grid's cartesian product, or `random.trials` draws from the grid's
    values and `random.space` (lists are choices, {low, high, log, integer} are ranges)."""
    if cfg.random is None:
        if not cfg.grid:
            raise RecipeError("the sweep has nothing to vary: give --grid PATH=V1,V2 (or a sweep: grid in the recipe)")
        keys = list(cfg.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(cfg.grid[k] for k in keys))]
    space: dict[str, Any] = {**cfg.grid, **cfg.random.space}
    if not space:
        raise RecipeError("sweep.random has no space to draw from: give sweep.random.space or a grid")
    rng = random.Random(cfg.random.seed)
    trials, seen = [], set()
    for _ in range(cfg.random.trials * 50):  # distinct draws; a small discrete space may hold fewer
        draw = {k: _draw(rng, v) for k, v in space.items()}
        key = json.dumps(draw, sort_keys=True)
        if key not in seen:
            seen.add(key)
            trials.append(draw)
        if len(trials) == cfg.random.trials:
            break
    return trials


def _draw(rng: random.Random, spec: Any) -> Any:
    if isinstance(spec, RangeSpec):
        if spec.log:
            value = math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
        else:
            value = rng.uniform(spec.low, spec.high)
        return int(round(value)) if spec.integer else float(f"{value:.6g}")
    return rng.choice(spec)


@dataclass
class Trial:
    id: str
    overrides: dict[str, Any]
    status: str = "pending"
    message: str = ""
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items()) or "(the recipe as is)"

    def to_dict(self) -> dict:
        return {"id": self.id, "overrides": self.overrides, "status": self.status, "message": self.message,
                "seconds": round(self.seconds, 2), "run_dir": f"{TRIALS}/{self.id}"}


def trial_recipe(raw: dict, trial: Trial, name: str) -> Recipe:
    data = apply_overrides({k: v for k, v in raw.items() if k != "sweep"}, trial.overrides)
    data["name"] = f"{name}-{trial.id}"
    return parse_recipe(data, f"sweep trial {trial.id} ({trial.label})")


def trial_device(cfg: SweepConfig, device: str) -> str:
    """The `train.device` of a trial: under Ray, what the trial's GPU share allows (the local backend keeps
    the recipe's). Raises RecipeError for a CUDA device in a trial that is given no GPU."""
    if cfg.backend != "ray" or device == "cpu":
        return device
    if cfg.gpus_per_trial > 0:
        return "cuda"  # Ray shows the trial its own GPU(s), numbered from 0
    if device != "auto":
        raise RecipeError(f"train.device is {device!r}, but the ray backend gives each trial no GPU "
                          f"(gpus_per_trial 0): pass --gpus-per-trial 1 (or a share such as 0.5), or set "
                          f"train.device: auto or cpu")
    return "cpu"


def step_keys(recipe: Recipe) -> list[str]:
    """One key per training step (baseline, then each stage): a hash of everything that decides the
    step's checkpoint. Steps from the first quantizing stage on also depend on the devices (the int8 scheme
    follows the first device when the stage does not name one)."""
    from rescompress.stages import STAGES

    full = recipe.to_yaml_dict()
    common = {k: full[k] for k in ("seed", "model", "data", "train")}
    keys, stages, quantized = [], [], False
    for i in range(len(recipe.stages) + 1):
        if i:
            stages.append(full["stages"][i - 1])
            quantized = quantized or STAGES.get(recipe.stages[i - 1].kind).quantizes
        what = {**common, "stages": stages, "devices": full["devices"] if quantized else None}
        keys.append(hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20])
    return keys


# --- the sweep directory -------------------------------------------------------------------------

@dataclass
class Sweep:
    dir: Path
    name: str
    raw: dict  # the recipe's YAML data
    trials: list[Trial]
    config: SweepConfig
    created: str

    @classmethod
    def create(cls, recipe_path: Path, out_root: Path, grid: list[str], random_trials: Optional[int],
               seed: Optional[int], backend: Optional[str], address: Optional[str],
               cpus_per_trial: Optional[float], gpus_per_trial: Optional[float]) -> "Sweep":
        from rescompress.recipe import load_recipe
        from rescompress.rundir import new_run_dir, now

        recipe = load_recipe(recipe_path)  # the base recipe must be valid on its own
        raw = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        data = (recipe.sweep or SweepConfig()).model_dump()
        given = [parse_grid_option(g) for g in grid]
        paths = [path for path, _ in given]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise RecipeError(f"--grid {', '.join(twice)} is given more than once; list all its values in one "
                              f"--grid PATH=V1,V2")
        data["grid"] = {**data["grid"], **dict(given)}
        if random_trials is not None or seed is not None:
            rnd = data.get("random") or {"trials": random_trials or 1}
            rnd.update({k: v for k, v in (("trials", random_trials), ("seed", seed)) if v is not None})
            data["random"] = rnd
        for key, value in (("backend", backend), ("address", address), ("cpus_per_trial", cpus_per_trial),
                           ("gpus_per_trial", gpus_per_trial)):
            if value is not None:
                data[key] = value
        cfg = parse_sweep(data, str(recipe_path))
        trials = [Trial(f"t{i:03d}", o) for i, o in enumerate(expand(cfg))]
        for t in trials:  # every trial's recipe is valid before anything is trained
            trial_device(cfg, trial_recipe(raw, t, recipe.name).train.device)
        sweep_dir = new_run_dir(out_root, f"{recipe.name}-sweep")
        shutil.copyfile(recipe_path, sweep_dir / "recipe.original.yaml")
        sweep = cls(sweep_dir, recipe.name, raw, trials, cfg, now())
        sweep.save()
        return sweep

    @classmethod
    def load(cls, sweep_dir: Path) -> "Sweep":
        path = sweep_dir / SWEEP_FILE
        if not path.is_file():
            raise ResumeError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ResumeError(f"{path} is damaged ({exc}); the sweep cannot be resumed") from None
        trials = [Trial(t["id"], t["overrides"], t["status"], t.get("message", ""), t.get("seconds", 0.0))
                  for t in data["trials"]]
        return cls(sweep_dir, data["name"], data["recipe"], trials, SweepConfig.model_validate(data["config"]),
                   data["created"])

    def save(self) -> None:
        atomic_write_json(self.dir / SWEEP_FILE, {
            "schema_version": 1, "name": self.name, "created": self.created, "recipe": self.raw,
            "config": self.config.model_dump(mode="json"), "trials": [t.to_dict() for t in self.trials]})

    def recipe(self, trial: Trial) -> Recipe:
        """The trial's recipe, with the device its GPU share allows under Ray (`trial_device`)."""
        recipe = trial_recipe(self.raw, trial, self.name)
        recipe.train.device = trial_device(self.config, recipe.train.device)
        return recipe

    def keys(self, trial: Trial) -> list[str]:
        return step_keys(self.recipe(trial))


# --- one trial -----------------------------------------------------------------------------------

def run_trial(sweep_dir: Path, trial_id: str, threads: Optional[int] = None, quiet: bool = False) -> dict:
    """Run (or resume) one trial in this process; returns {"id", "status", "message", "seconds"}.
    Used directly by the local backend and inside a Ray task by the ray backend."""
    from rich.console import Console

    from rescompress.console import TeeConsole
    from rescompress.pipeline import RESOLVED, execute, make_plan, prepare_resume
    from rescompress.recipe import save_resolved
    from rescompress.rundir import MANIFEST, Manifest

    t0 = time.time()
    sweep = Sweep.load(sweep_dir)
    trial = next(t for t in sweep.trials if t.id == trial_id)
    run_dir = sweep_dir / TRIALS / trial_id
    if threads:
        import torch

        torch.set_num_threads(threads)
    console: Console = TeeConsole(run_dir / "logs" / "run.log", highlight=False, quiet=quiet)
    try:
        recipe = sweep.recipe(trial)
        keys = step_keys(recipe)
        if (run_dir / MANIFEST).is_file():
            plan, run_dir, manifest = prepare_resume(run_dir)
        else:
            plan = make_plan(recipe, source=sweep_dir / "recipe.original.yaml", cache_dir=sweep_dir)
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_resolved(recipe, run_dir / RESOLVED)
            manifest = Manifest.create(run_dir, recipe)
        reused = _reuse_prefix(sweep_dir, plan, manifest, keys)
        console.print(f"sweep trial {trial.id}: {trial.label}"
                      + (f"; reusing {', '.join(reused)} from the sweep's cache" if reused else ""))
        execute(plan, run_dir, manifest, console)
        _publish(sweep_dir, run_dir, plan, manifest, keys)
        return {"id": trial_id, "status": "done", "message": "", "seconds": time.time() - t0}
    except RescompressError as exc:
        return {"id": trial_id, "status": "failed", "message": str(exc), "seconds": time.time() - t0}
    except Exception as exc:  # a bug in one trial must not end the sweep; the log has the traceback
        console.log_exception()
        return {"id": trial_id, "status": "failed", "seconds": time.time() - t0,
                "message": f"{type(exc).__name__}: {exc} (traceback in {run_dir / 'logs' / 'run.log'})"}
    finally:
        console.close()


def _training_steps(plan: Any) -> list[str]:
    return plan.steps[: len(plan.recipe.stages) + 1]


def _reuse_prefix(sweep_dir: Path, plan: Any, manifest: Any, keys: list[str]) -> list[str]:
    """Copy the longest prefix of cached steps this run has not finished itself; returns the steps reused."""
    reused = []
    for step, key in zip(_training_steps(plan), keys):
        if manifest.done(step):
            continue
        if not (sweep_dir / CACHE / key / "entry.json").is_file():
            break
        entry, source, target = _cache_entry(sweep_dir / CACHE / key, manifest.path.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        record = {**entry["record"], "checkpoint": entry["checkpoint"], "notes": [
            *entry["record"].get("notes", []), f"reused from the sweep's cache (computed by {entry['trial']})"]}
        manifest.mark(step, record=record, checkpoint=entry["checkpoint"], sha256=entry["sha256"], seconds=0.0,
                      reused_from=entry["trial"])
        reused.append(step)
    return reused


def _cache_entry(entry_dir: Path, run_dir: Path) -> tuple[dict, Path, Path]:
    """A cache entry's data, the checkpoint file in it and where that goes in the run directory; refuses an
    entry whose paths lead out of the entry or out of the run's checkpoints (the cache may be shared)."""
    entry_file, keys = entry_dir / "entry.json", ("step", "trial", "checkpoint", "sha256", "record")
    fix = f"delete {entry_dir} to have the step computed again"
    try:
        entry = json.loads(entry_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        entry = None
    if not (isinstance(entry, dict) and set(keys) <= set(entry) and isinstance(entry["checkpoint"], str)
            and isinstance(entry["record"], dict)):
        raise CacheEntryError(f"sweep cache entry {entry_file} is damaged (expected JSON with {', '.join(keys)}); {fix}")
    rel = Path(entry["checkpoint"])
    source, target = entry_dir / rel.name, run_dir / rel
    if (rel.is_absolute() or ".." in rel.parts or not source.is_file()
            or not source.resolve().is_relative_to(entry_dir.resolve())
            or not target.resolve().is_relative_to((run_dir / "checkpoints").resolve())):
        raise CacheEntryError(f"sweep cache entry {entry_file}: checkpoint {entry['checkpoint']!r} is not a file of the "
                              f"entry or leads outside the run's checkpoints/; {fix}")
    return entry, source, target


def _publish(sweep_dir: Path, run_dir: Path, plan: Any, manifest: Any, keys: list[str]) -> None:
    """Add this trial's finished training steps to the cache (first writer wins; written then renamed)."""
    for step, key in zip(_training_steps(plan), keys):
        done = manifest.done(step)
        final = sweep_dir / CACHE / key
        if not done or final.exists():
            continue
        tmp = sweep_dir / CACHE / f".{key}.{run_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(run_dir / done["checkpoint"], tmp / Path(done["checkpoint"]).name)
        origin = done.get("reused_from") or run_dir.name
        atomic_write_json(tmp / "entry.json", {"step": step, "trial": origin, "checkpoint": done["checkpoint"],
                                               "sha256": done["sha256"], "record": done["record"]})
        try:
            tmp.rename(final)
        except OSError:  # another trial published it first
            shutil.rmtree(tmp, ignore_errors=True)


# --- running all trials --------------------------------------------------------------------------

def run_sweep(sweep: Sweep, console: Any, on_result: Optional[Callable[[Trial], None]] = None) -> dict:
    """Run every trial that is not done, with the sweep's backend, then write the merged report."""
    todo = [t for t in sweep.trials if t.status != "done"]
    if sweep.config.backend == "ray":
        _run_ray(sweep, todo, console, on_result)
    else:
        for trial in todo:
            _start(sweep, trial)
            console.rule(f"trial {trial.id}: {trial.label}")
            _finish(sweep, trial, run_trial(sweep.dir, trial.id), on_result)
    return merge(sweep)


def _start(sweep: Sweep, trial: Trial) -> None:
    trial.status, trial.message = "running", ""
    sweep.save()


def _finish(sweep: Sweep, trial: Trial, result: dict, on_result: Optional[Callable[[Trial], None]]) -> None:
    trial.status, trial.message, trial.seconds = result["status"], result["message"], result["seconds"]
    sweep.save()
    if on_result is not None:
        on_result(trial)


def _run_ray(sweep: Sweep, todo: list[Trial], console: Any, on_result: Optional[Callable[[Trial], None]]) -> None:
    """One Ray task per trial, declaring its CPUs and GPUs; a trial waits while another in flight computes a
    step it would reuse (the baseline, a shared stage prefix)."""
    try:
        import ray
    except ImportError:
        raise RescompressError("the ray backend needs Ray: pip install 'rescompress[ray]'") from None
    cfg = sweep.config
    started_here = not ray.is_initialized()
    if started_here:
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            ray.init(log_to_driver=False, include_dashboard=False)
    threads = max(1, int(cfg.cpus_per_trial))
    task = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial, max_retries=0)(_ray_trial)
    keys = {t.id: sweep.keys(t) for t in todo}
    cached = lambda k: (sweep.dir / CACHE / k).exists()  # noqa: E731
    pending, in_flight = list(todo), {}
    try:
        while pending or in_flight:
            busy = {k for tid in in_flight.values() for k in keys[tid] if not cached(k)}
            for trial in list(pending):
                needs = [k for k in keys[trial.id] if not cached(k)]
                if needs and needs[0] in busy:
                    continue  # its next step is being computed by a trial in flight
                _start(sweep, trial)
                console.print(f"trial {trial.id} started: {trial.label}")
                in_flight[task.remote(str(sweep.dir.resolve()), trial.id, threads, os.getcwd())] = trial.id
                busy.update(needs)
                pending.remove(trial)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                tid = in_flight.pop(ref)
                trial = next(t for t in todo if t.id == tid)
                _finish(sweep, trial, ray.get(ref), on_result)
                console.print(f"trial {trial.id} {trial.status} ({trial.seconds:.0f} s)"
                              + (f": {trial.message}" if trial.message else ""))
    finally:
        if started_here:
            ray.shutdown()


def _ray_trial(sweep_dir: str, trial_id: str, threads: int, cwd: str) -> dict:
    if Path(cwd).is_dir():  # relative paths in the recipe (weights, data.root) mean what they meant to the driver
        os.chdir(cwd)
    return run_trial(Path(sweep_dir), trial_id, threads=threads, quiet=True)


# --- the merged report ---------------------------------------------------------------------------

def merge(sweep: Sweep) -> dict:
    """One report over every finished trial (artifacts named `<trial>/<artifact>`), per device the Pareto
    front over all of them and the fastest within the accuracy budget; written to the sweep directory.
    Each artifact's Δ top-1 (test and val) is against its own trial's baseline; every distinct baseline is a
    stage (`baseline`, then `t001/baseline`, ...), shared by the trials that reused it from the cache."""
    from rescompress.pipeline import delta_pt, recommend
    from rescompress.report import SCHEMA_VERSION, load_report, write_report
    from rescompress.rundir import now

    reports = {t.id: load_report(sweep.dir / TRIALS / t.id / "report.json") for t in sweep.trials
               if t.status == "done" and (sweep.dir / TRIALS / t.id / "report.json").is_file()}
    if not reports:
        raise RescompressError(f"no trial of {sweep.dir} finished; nothing to merge (see {SWEEP_FILE})")
    first = next(iter(reports.values()))
    budget = first["recipe"].get("accuracy_budget_pt")
    baselines: dict[str, dict] = {}  # one stage per distinct baseline checkpoint (by hash); trials reusing it share it
    users: dict[str, list[Trial]] = {}
    stages, artifacts, devices = [], [], {}
    for tid, rep in reports.items():
        trial = next(t for t in sweep.trials if t.id == tid)
        base, sha = rep["stages"][0], _baseline_sha(sweep.dir, tid) or tid
        if sha not in baselines:
            baselines[sha] = {**base, "name": f"{tid}/baseline" if baselines else "baseline",
                              "checkpoint": _under(tid, base.get("checkpoint"))}
            stages.append(baselines[sha])
        users.setdefault(sha, []).append(trial)
        stages += [{**s, "name": f"{tid}/{s['name']}", "checkpoint": _under(tid, s.get("checkpoint")),
                    "notes": [trial.label, *s.get("notes", [])]} for s in rep["stages"][1:]]
        for a in rep["artifacts"]:
            art = {**a, "name": f"{tid}/{a['name']}", "path": _under(tid, a.get("path"))}
            if (a.get("parity") or {}).get("reference"):
                art["parity"] = {**a["parity"], "reference": f"{tid}/{a['parity']['reference']}"}
            artifacts.append(art)
        for d in rep["devices"]:
            merged = devices.setdefault(d["name"], {k: v for k, v in d.items() if k not in ("results", "recommendation")}
                                        | {"results": []})
            for r in d["results"]:  # each artifact against its own trial's baseline
                merged["results"].append({**r, "artifact": f"{tid}/{r['artifact']}",
                                          "delta_top1_pt": delta_pt(r.get("top1"), base["top1"]),
                                          "delta_val_top1_pt": delta_pt(r.get("val_top1"), base.get("val_top1"))})
    for sha, b in baselines.items():
        b["notes"] = [f"the baseline of {'; '.join(f'{t.id} ({t.label})' for t in users[sha])}", *b.get("notes", [])]
    for d in devices.values():
        d["recommendation"] = recommend(d["results"], d.get("accuracy_budget_pt", budget) or 0.0)
    report = {
        "schema_version": SCHEMA_VERSION, "rescompress_version": first["rescompress_version"],
        "recipe": {**first["recipe"], "name": f"{sweep.name} (sweep of {len(sweep.trials)} trials)"},
        "run": {"dir": str(sweep.dir), "started": sweep.created, "finished": now(),
                "seconds": round(sum(t.seconds for t in sweep.trials), 1)},
        "dataset": first["dataset"], "model": first["model"], "stages": stages, "artifacts": artifacts,
        "devices": list(devices.values()), "provenance": first["provenance"],
        "sweep": {"backend": sweep.config.backend, "trials": [t.to_dict() for t in sweep.trials]},
    }
    write_report(report, sweep.dir)
    return report


def _baseline_sha(sweep_dir: Path, tid: str) -> Optional[str]:
    """The hash of a trial's baseline checkpoint (trials that reused one from the cache share it)."""
    from rescompress.rundir import Manifest

    try:
        done = Manifest.load(sweep_dir / TRIALS / tid).done("baseline")
    except ResumeError:
        return None
    return (done or {}).get("sha256")


def _under(tid: str, path: Optional[str]) -> Optional[str]:
    return None if path is None else f"{TRIALS}/{tid}/{path}"


def failed_trials(sweep: Sweep) -> list[Trial]:
    return [t for t in sweep.trials if t.status == "failed"]


def describe(sweep: Sweep) -> str:
    lines = [f"sweep    {sweep.name}: {len(sweep.trials)} trials, backend {sweep.config.backend}"
             + (f" at {sweep.config.address}" if sweep.config.address else "")
             + (f", {sweep.config.cpus_per_trial:g} CPU / {sweep.config.gpus_per_trial:g} GPU per trial"
                if sweep.config.backend == "ray" else "")]
    for t in sweep.trials:
        lines.append(f"  {t.id}  {t.status:<8} {t.label}")
    return "\n".join(lines)


__all__ = ["Sweep", "Trial", "apply_overrides", "describe", "expand", "merge", "parse_grid_option", "run_sweep",
           "run_trial", "step_keys", "trial_device"]
