"""The `rescompress` command: a thin typer app over the pipeline and the registries."""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from rescompress import __version__, distributed
from rescompress.console import TeeConsole
from rescompress.errors import RescompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, distill, quantize and export ResNet classifiers; measure every artifact per device.")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

USER_ERROR = 2
FAILED = 1  # the run finished and wrote its report, but an export, a lint or a device measurement failed


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a RescompressError as one short message and exit 2, without a traceback."""
    try:
        yield
    except RescompressError as exc:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, soft_wrap=True)
        raise typer.Exit(USER_ERROR) from None


@app.command()
def run(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML (optional with --resume)"),
    out: Path = typer.Option(Path("runs"), "--out", help="where new run directories are created"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate everything and print the plan; train nothing"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue this run directory after its last finished step"),
    overrides: list[str] = typer.Option([], "--set", help="PATH=VALUE: set a recipe field before validation, "
                                                          "e.g. train.epochs=3 (dotted path as in sweep --grid, list "
                                                          "items by index; the value is read as YAML); repeat for more"),
) -> None:
    """Run a recipe: baseline, stages, exports, per-device measurement, report."""
    from rescompress import pipeline

    with user_errors():
        if recipe is None and resume is None:
            raise RescompressError("give a recipe file, or --resume RUN_DIR")
        if overrides and resume is not None:
            raise RescompressError(f"--set cannot change a resumed run: it goes on with the recipe it started with "
                                   f"({resume / pipeline.RESOLVED}); drop --set, or start a new run with it")
        if dry_run:
            if resume is not None:
                plan, _, _ = pipeline.prepare_resume(resume, recipe)
            else:
                plan = pipeline.make_plan(pipeline.load_recipe(recipe, overrides), source=recipe)
                if overrides:
                    console.print(f"--set    {', '.join(plan.recipe.overrides)}", soft_wrap=True, markup=False)
            for warning in plan.warnings:
                console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
            console.print(plan.describe())
            console.print("[green]plan is valid[/green] (dry run: nothing was trained or written)")
            return
        world = distributed.init_from_env()  # several processes under torchrun; rank 0 writes
        try:
            _run(recipe, out, resume, world, overrides)
        finally:
            distributed.shutdown()


def _run(recipe: Optional[Path], out: Path, resume: Optional[Path], world: "distributed.World",
         overrides: list[str]) -> None:
    from rich.markup import escape

    from rescompress import pipeline

    if resume is not None:
        plan, run_dir, manifest = pipeline.prepare_resume(resume, recipe)
        done = [s for s in plan.steps if manifest.done(s)]
        opening = (f"resuming [bold]{run_dir}[/bold] (finished: {', '.join(done) or 'nothing yet'}); "
                   f"{pipeline.RESUME_REDOES}")
    else:
        plan, run_dir, manifest = pipeline.prepare_new(recipe, out, overrides)
        opening = f"run directory: [bold]{run_dir}[/bold]"
    if not world.main:  # the other ranks train in step with rank 0 and stay silent
        pipeline.execute(plan, run_dir, manifest, Console(quiet=True))
        return
    run_console = TeeConsole(run_dir / "logs" / "run.log", highlight=False)
    run_console.print(f"rescompress {__version__} · {' '.join(sys.argv)}")
    run_console.print(opening)
    if world.size > 1:
        run_console.print(f"torchrun: {world.size} processes train together (DistributedDataParallel); "
                          f"rank 0 writes, exports and measures")
    for warning in plan.warnings:
        run_console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    run_console.print(plan.describe())
    try:
        report = pipeline.execute(plan, run_dir, manifest, run_console)
        _summary(report, run_dir, run_console)
        failed = pipeline.failures(report)
        if failed:
            run_console.print(f"[bold red]{len(failed)} failure(s)[/bold red] (the report is complete; "
                              f"see {run_dir / 'report.md'}):")
            for line in failed:
                run_console.print(f"  [red]✗[/red] {escape(line)}", soft_wrap=True)
            raise typer.Exit(FAILED)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        run_console.print(f"interrupted; continue with: rescompress run --resume {run_dir}")
        raise typer.Exit(130) from None
    except RescompressError as exc:
        run_console.log_only(f"error: {exc}")  # the terminal gets it from user_errors
        raise
    except Exception:
        run_console.log_exception()  # a bug, not a user error: traceback to the log, and to the terminal below
        raise
    finally:
        run_console.close()


def _summary(report: dict, run_dir: Path, console: Console) -> None:
    for device in report["devices"]:
        table = Table(title=f"{device['name']} — {device['description']}", title_justify="left")
        for col in ("artifact", "top-1 %", "Δ pt", "p50 ms", "p90 ms", "size", "latency source"):
            table.add_column(col, justify="left" if col in ("artifact", "latency source") else "right")
        for r in device["results"]:
            lat = r.get("latency") or {}
            table.add_row(r["artifact"], _fmt(r.get("top1"), 100, ".2f"), _fmt(r.get("delta_top1_pt"), 1, "+.2f"),
                          _fmt(lat.get("p50_ms"), 1, ".3f"), _fmt(lat.get("p90_ms"), 1, ".3f"),
                          f"{(r.get('size_bytes') or 0) / 1e6:.2f} MB", lat.get("source") or _untimed(r))
        console.print(table)
        if device.get("recommendation"):
            console.print(f"ship [bold]{device['recommendation']['artifact']}[/bold]: {device['recommendation']['reason']}")
    console.print(f"report: {run_dir / 'report.md'}  {run_dir / 'report.html'}")


def _untimed(result: dict) -> str:
    """What stands in the latency-source column when there is no latency (the reason is in the report)."""
    return "not timed" if result.get("status") == "ok" else result.get("status", "")


def _fmt(value: Optional[float], scale: float, spec: str) -> str:
    return "—" if value is None else format(value * scale, spec)


class Listable(str, Enum):
    models = "models"
    datasets = "datasets"
    stages = "stages"
    targets = "targets"
    devices = "devices"


@app.command("list")
def list_(what: Listable = typer.Argument(..., help="what to list")) -> None:
    """List the registered models, datasets, stages, export targets or device profiles."""
    from rich.markup import escape

    with user_errors():
        table = Table(show_header=True)
        table.add_column(what.value[:-1])
        table.add_column("details")
        for name, details in _listing(what):
            table.add_row(escape(name), escape(details))
        console.print(table)


def _first_line(obj: object) -> str:
    return ((obj.__doc__ or "").strip().splitlines() or [""])[0]


def _listing(what: Listable) -> list[tuple[str, str]]:
    if what is Listable.models:
        from rescompress.models import MODELS

        return [(n, _first_line(fn)) for n, fn in MODELS.items()]
    if what is Listable.datasets:
        from rescompress.data import DATASETS, default_root

        return [(n, _first_line(fn) + (f" (default root: {default_root(n)})" if default_root(n) else ""))
                for n, fn in DATASETS.items()]
    if what is Listable.stages:
        from rescompress.stages import STAGES

        return [(n, STAGES.get(n).summary) for n in STAGES]
    if what is Listable.targets:
        from rescompress.export import TARGETS

        return [(n, f"{t.summary}; precisions: {', '.join(t.precisions)}" + (f"; extra: rescompress[{t.extra}]" if t.extra else ""))
                for n, t in TARGETS.items()]
    from rescompress.devices import available_devices, load_device

    return [(n, f"{load_device(n).description} ({p})") for n, p in available_devices().items()]


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory holding report.json")) -> None:
    """Re-render report.md, report.html and the plots from a run's report.json."""
    from rescompress.report import render_all

    with user_errors():
        paths = render_all(run_dir)
        for kind, path in paths.items():
            console.print(f"{kind:<5} {path}")


class BenchRuntime(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tflite = "tflite"
    tensorrt = "tensorrt"


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="an exported model: .onnx, .tflite, or a TensorRT .engine/.plan"),
    device: str = typer.Option("host-cpu", "--device", "-d", help="device profile name or YAML path"),
    host: Optional[str] = typer.Option(None, "--host", help="user@addr: measure on this host over ssh (overrides the "
                                                            "profile's connection; its host key must be known)"),
    runtime: BenchRuntime = typer.Option(BenchRuntime.auto, "--runtime", help="default: from the file and the device"),
    batch: int = typer.Option(1, "--batch", min=1),
    warmup: int = typer.Option(20, "--warmup", min=0),
    runs: int = typer.Option(200, "--runs", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="default: the profile's, else the runtime's"),
    images: Optional[Path] = typer.Option(None, "--input", help="a .npy batch of preprocessed images (N, C, H, W) "
                                                                "to time on here; default: seeded random input"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Measure one artifact's latency on a device: here (timed as `rescompress run` times it), or on the
    device over ssh (p50/p90/p99, versions, power mode, the input it ran on). Exit 1 when the measurement
    failed (the status says why)."""
    import json

    from rich.markup import escape

    from rescompress.bench.device_latency import bench_file

    with user_errors():
        result = bench_file(artifact, device, host=host, runtime=None if runtime is BenchRuntime.auto else runtime.value,
                            batch=batch, warmup=warmup, runs=runs, threads=threads, images=images)
    if as_json:
        console.print_json(json.dumps(result))
    elif result["status"] == "ok":
        lat = result["latency"]
        table = Table(title=f"{artifact.name} on {result['device']} ({result['runtime']}, {result['precision']})",
                      title_justify="left")
        for col in ("p50 ms", "p90 ms", "p99 ms", "source", "setup", "input"):
            table.add_column(col, justify="right" if col.endswith("ms") else "left")
        setup = f"batch {lat['batch']} · {lat.get('threads') or 'default'} threads · {lat['warmup']} warm-up + {lat['runs']} runs"
        table.add_row(f"{lat['p50_ms']:.3f}", f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}",
                      lat["source"] + (f" ({lat['host']})" if lat.get("host") else ""), setup,
                      escape(lat.get("input") or "?"))
        console.print(table)
        for key in ("method", "note"):
            if lat.get(key):
                console.print(f"{key:<16} {escape(str(lat[key]))}", soft_wrap=True)
        for key, value in (result.get("device_facts") or {}).items():
            console.print(f"{key:<16} {escape(str(value))}", soft_wrap=True)
    else:
        err_console.print(f"[bold red]{result['status']}:[/bold red] {escape(result['message'])}", soft_wrap=True)
    if result["status"] != "ok":
        raise typer.Exit(1)


class SweepBackend(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def sweep(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML (optional with --resume)"),
    grid: list[str] = typer.Option([], "--grid", "-g", help="PATH=V1,V2,...: a dotted recipe path and its values "
                                                           "(repeat for more); all combinations are run"),
    random_trials: Optional[int] = typer.Option(None, "--random", min=1, help="draw this many trials at random "
                                                                             "from the grid (and sweep.random.space)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random search seed"),
    backend: Optional[SweepBackend] = typer.Option(None, "--backend", help="local: trials in turn (default); ray: "
                                                                          "in parallel, one Ray task per trial"),
    address: Optional[str] = typer.Option(None, "--address", help="a Ray cluster to join (default: start Ray here)"),
    cpus_per_trial: Optional[float] = typer.Option(None, "--cpus-per-trial", min=0.01, help="Ray: CPUs each trial declares"),
    gpus_per_trial: Optional[float] = typer.Option(None, "--gpus-per-trial", min=0.0, help="Ray: GPUs each trial declares"),
    out: Path = typer.Option(Path("runs"), "--out", help="where the sweep directory is created"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue this sweep directory: finished trials are kept"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate every trial's recipe and list the trials; run nothing"),
) -> None:
    """Run many variants of a recipe (grid or random search), locally or on Ray, and merge them into one
    per-device report: the Pareto front over all trials and the fastest artifact within the accuracy budget."""
    from rich.markup import escape

    from rescompress import sweep as sw

    with user_errors():
        if resume is not None:
            if any(v is not None for v in (recipe, random_trials, seed, backend, address, cpus_per_trial,
                                           gpus_per_trial)) or grid:
                raise RescompressError("--resume continues a sweep as it was created; give only the sweep directory")
            job = sw.Sweep.load(resume)
            if dry_run:
                console.print(escape(sw.describe(job)))
                return
        elif recipe is None:
            raise RescompressError("give a recipe file, or --resume SWEEP_DIR")
        elif dry_run:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                job = sw.Sweep.create(recipe, Path(tmp), grid, random_trials, seed,
                                      backend.value if backend else None, address, cpus_per_trial, gpus_per_trial)
                console.print(escape(sw.describe(job)))
            console.print("[green]every trial's recipe is valid[/green] (dry run: nothing was trained or written)")
            return
        else:
            job = sw.Sweep.create(recipe, out, grid, random_trials, seed, backend.value if backend else None,
                                  address, cpus_per_trial, gpus_per_trial)
        console.print(f"sweep directory: [bold]{job.dir}[/bold]")
        console.print(escape(sw.describe(job)))
        try:
            report = sw.run_sweep(job, console)
        except KeyboardInterrupt:
            console.print(f"interrupted; continue with: rescompress sweep --resume {job.dir}")
            raise typer.Exit(130) from None
    _summary(report, job.dir, console)
    failed = sw.failed_trials(job)
    for trial in failed:
        err_console.print(f"[bold red]trial {trial.id} failed:[/bold red] {escape(trial.message)}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


class LintTarget(str, Enum):
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"
    tflite = "tflite"


@app.command()
def lint(
    artifact: Path = typer.Argument(..., help="an exported model: .onnx (tensorrt, onnxruntime) or .tflite"),
    target: LintTarget = typer.Option(..., "--target", "-t", help="the runtime the file must suit"),
    device: list[str] = typer.Option(
        [], "--device", "-d", help="onnxruntime: a device profile (name or YAML path) whose CPU will run the file; "
                                   "repeat for several. Without one, CPU-dependent verdicts are reported as unknown "
                                   "(host-cpu judges this machine)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Check that an exported model runs the way its target runtime runs fast; exit 1 on any error."""
    import json

    from rich.markup import escape

    from rescompress.devices import load_device
    from rescompress.export.lint import lint_file

    with user_errors():
        if device and target.value != "onnxruntime":
            raise RescompressError(f"--device names the CPU that runs an onnxruntime model; the {target.value} "
                                   f"lint does not depend on it (drop --device, or use --target onnxruntime)")
        profiles = [load_device(name) for name in device]
        for p in profiles:
            if "onnxruntime" not in p.runtimes:
                raise RescompressError(f"device {p.name} does not run onnxruntime (its runtimes: "
                                       f"{', '.join(p.runtimes)})")
        result = lint_file(artifact, target.value, profiles)
    if as_json:
        console.print_json(json.dumps({"path": str(artifact), "devices": [p.name for p in profiles],
                                       **result.to_dict()}))
    else:
        for finding in result.findings:
            colour = {"error": "red", "warning": "yellow"}.get(finding.severity, "dim")
            console.print(f"[{colour}]{escape(finding.line())}[/{colour}]", soft_wrap=True)
        colour = "green" if result.passed else "red"
        console.print(f"[{colour}]{escape(result.summary())}[/{colour}]", soft_wrap=True)
    if not result.passed:
        raise typer.Exit(1)


@app.command("import")
def import_(
    model_file: Path = typer.Argument(..., help="a Keras model (.keras, .h5, or a SavedModel directory) or an ONNX file"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="the checkpoint to write (default: beside FILE, "
                                                                 "named FILE.pth, or FILE-imported.pth for a .pth)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, max=4096,
                                             help="input height and width, for a model whose input size is dynamic"),
    samples: int = typer.Option(32, "--samples", min=1, max=4096, help="seeded random inputs parity is measured on"),
    tolerance: float = typer.Option(1e-4, "--tolerance", min=0.0, help="largest max |Δlogit| accepted (fp32)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out file"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (max_abs_diff, top1_agreement, ...)"),
) -> None:
    """Import a Keras or ONNX ResNet as a rescompress model; parity with the source runtime is measured."""
    from rescompress import imports

    with user_errors():
        stem = model_file.name.rsplit(".", 1)[0] if model_file.suffix else model_file.name
        target = out or model_file.with_name(stem + ".pth")
        if out is None and target.resolve() == model_file.resolve():
            target = model_file.with_name(stem + "-imported.pth")
        if target.exists() and not force:
            raise RescompressError(f"{target} exists; choose another --out, or pass --force to overwrite it")
        imported, source = imports.read_source(model_file, image_size=image_size)
        if source is None:
            parity = imports.unmeasured(imported)
        else:
            parity = imports.measure_parity(imported, source, imports.random_inputs(imported, samples),
                                            tolerance=tolerance, inputs="random")
        imports.save_imported(target, imported, parity)
    if as_json:
        print(imports.to_json(imported, parity, target))
        return
    console.print(f"{imported.source['architecture']} → {imported.arch['name']} "
                  f"({imported.num_classes} classes, input {imported.channels}x{imported.height}x{imported.width})",
                  soft_wrap=True, markup=False)
    console.print(f"preprocessing: {imported.preprocessing}", soft_wrap=True, markup=False)
    for note in imported.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
    if parity["max_abs_diff"] is None:
        console.print(f"parity: {parity['status']}", soft_wrap=True, markup=False)
    else:
        console.print(f"parity: max |Δlogit| {parity['max_abs_diff']:.3g} (tolerance {tolerance:g}) on "
                      f"{parity['n']} seeded random inputs, source run by {parity['source_runtime']}; top-1 "
                      f"agreement: n/a (no labels: use model.weights in a recipe to measure it on real images)",
                      soft_wrap=True, markup=False)
    console.print(f"[green]wrote[/green] {target} (+ {target.name}.json); use it as model.weights in a recipe",
                  soft_wrap=True)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="a bundle folder (runs/<run>/bundles/<artifact>) or an artifact file "
                                           "(.onnx, .tflite, .engine, .pt, .pt2) in its run directory"),
    images: Path = typer.Argument(..., help="an image file, or a folder: every image file directly in it "
                                            "(not in its subfolders), in name order"),
    top: int = typer.Option(5, "--top", "-k", min=1, help="classes to print per image"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: model, runtime, and per image "
                                                       "its top classes (index, label, score)"),
) -> None:
    """Classify images with an artifact or bundle, preprocessed as the run evaluated it; prints the top classes."""
    import json

    from rescompress import deploy
    from rescompress.errors import DataError

    with user_errors():
        if images.is_dir():
            paths = deploy.image_files(images)
            if not paths:
                raise DataError(f"no image files ({', '.join(deploy.IMAGE_SUFFIXES)}) directly in {images} "
                                f"(subfolders are not searched)")
        elif images.exists():
            paths = [images]
        else:
            raise DataError(f"image {images} does not exist")
        predictor = deploy.load(model)
        results = deploy.predict_paths(predictor, paths, top)
    if as_json:
        print(json.dumps({"model": str(predictor.path), "runtime": predictor.runtime,
                          "preprocessing": predictor.source, "images": results}, indent=2))
        return
    where = f" (images in {images})" if images.is_dir() else ""
    table = Table(title=f"{predictor.path.name} on {predictor.runtime}{where}", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    for result in results:
        for rank, row in enumerate(result["top"], 1):
            image = Path(result["image"]).name if images.is_dir() else result["image"]
            table.add_row(image if rank == 1 else "", str(rank), row["label"], f"{row['score']:.4f}",
                          end_section=rank == len(result["top"]))
    console.print(table)


def main() -> None:
    try:
        app()
    except RescompressError as exc:  # raised outside a command body (e.g. while parsing)
        err_console.print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(USER_ERROR)
