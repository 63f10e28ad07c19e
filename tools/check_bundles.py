"""Run every bundle of a finished run in a clean environment and compare it with `rescompress predict`.

    python tools/check_bundles.py RUN_DIR [IMAGE_OR_FOLDER] [--images N]

For each `RUN_DIR/bundles/<artifact>/` (written now from report.json where the run has none yet), the bundle's
`predict.py` runs in a virtual environment that holds only numpy, Pillow and the bundle's runtime (symlinked
from this interpreter's site-packages: no torch, no rescompress), on each image; its top-1 class is compared
with `rescompress predict BUNDLE IMAGE --json`. Without IMAGE, the first N test images of the run's dataset are
written as PNG files (in-memory datasets only; give IMAGE for image folders). A TensorRT bundle is checked
only where TensorRT and its engine are present. Prints a table; exits 1 on any mismatch or failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
BASE_MODULES = ("numpy", "PIL")
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "litert": ("ai_edge_litert",), "tensorrt": ("tensorrt", "cupy")}


def _distribution_entries(module: str) -> list[Path]:
    """The top-level site-packages entries of the distribution that provides `module` (its package, its
    bundled shared libraries such as numpy.libs, its dist-info)."""
    site = {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    dists = importlib.metadata.packages_distributions().get(module) or []
    entries: set[Path] = set()
    for name in dists:
        dist = importlib.metadata.distribution(name)
        for f in dist.files or []:
            top = Path(f).parts[0]
            if top == ".." or top.endswith(".pth"):
                continue
            path = Path(dist.locate_file(top))
            if path.exists() and path.parent in site:
                entries.add(path)
    if not entries:
        raise RuntimeError(f"{module} is not installed in {sys.executable}'s site-packages")
    return sorted(entries)


def clean_venv(dest: Path, runtime: str) -> Path:
    """A venv at `dest` (created once) that can import numpy, PIL and `runtime`'s modules and nothing else of
    this environment: `python -m venv --without-pip`, plus a .pth file naming a folder of symlinks to those
    distributions. Returns its python."""
    python = dest / "bin" / "python"
    if python.exists():
        return python
    modules = BASE_MODULES + RUNTIME_MODULES[runtime]
    entries = [e for m in modules for e in _distribution_entries(m)]
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True)
    linked = tmp / "linked"
    linked.mkdir()
    for entry in entries:
        (linked / entry.name).symlink_to(entry)
    purelib = subprocess.run([str(tmp / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the .pth names `linked` by its final path: the venv works once renamed into place
    (Path(purelib) / "rescompress-check.pth").write_text(f"{dest / 'linked'}\n", encoding="utf-8")
    os.replace(tmp, dest)
    return python


def clean_env() -> dict[str, str]:
    """The environment a clean venv's python runs in: nothing that would add this project's paths."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")} | {
        "PYTHONNOUSERSITE": "1"}


def run_example(python: Path, bundle: Path, images: list[Path], timeout: float = 300) -> tuple[Optional[dict], str]:
    """{image path: [(label, score), ...]} printed by a bundle's predict.py for `images`; None when it failed."""
    proc = subprocess.run([str(python), "-s", str(bundle / "predict.py"), *(str(p.resolve()) for p in images)],
                          capture_output=True, text=True, env=clean_env(), cwd=bundle, timeout=timeout)
    if proc.returncode != 0:
        return None, (proc.stdout + proc.stderr)[-2000:]
    return parse_example_output(proc.stdout), proc.stdout


def parse_example_output(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """predict.py prints each image's path, then one indented `label<TAB>score` line per class."""
    out: dict[str, list[tuple[str, float]]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("  ") and current is not None:
            label, score = line.strip().rsplit("\t", 1)
            out[current].append((label, float(score)))
        elif line.strip():
            current = line.strip()
            out[current] = []
    return out


def rescompress_predict(bundle: Path, target: Path, timeout: float = 300) -> tuple[Optional[dict], str]:
    """{image path: [(label, score), ...]} from `rescompress predict BUNDLE TARGET --json` (TARGET: an image
    or a folder of them); None when it failed."""
    proc = subprocess.run([sys.executable, "-m", "rescompress", "predict", str(bundle), str(target.resolve()),
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        return None, (proc.stdout + proc.stderr)[-2000:]
    images = json.loads(proc.stdout)["images"]
    return {r["image"]: [(t["label"], t["score"]) for t in r["top"]] for r in images}, proc.stdout


def ensure_bundles(run_dir: Path) -> list[Path]:
    bundles = sorted(p.parent for p in (run_dir / "bundles").glob("*/preprocess.json"))
    if bundles:
        return bundles
    from rescompress.bundle import write_bundles

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    written = write_bundles(run_dir, report)
    print(f"wrote {len(written)} bundle(s) from {run_dir / 'report.json'}")
    return sorted(run_dir / rel for rel in written.values())


def dataset_images(run_dir: Path, out: Path, count: int) -> list[Path]:
    """The first `count` test images of an in-memory run's dataset, as PNG files at the model's input size."""
    from PIL import Image

    from rescompress.data import ON_DISK, load_dataset
    from rescompress.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    spec = report["dataset"]["input_spec"]
    if recipe.data.name in ON_DISK:
        sys.exit(f"{run_dir}'s dataset {recipe.data.name} is read from disk: give an image file or folder")
    data = load_dataset(recipe.data.name, root=recipe.data.root, image_size=spec["height"],
                        channels=spec["channels"], seed=recipe.seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(count, len(data.test))):
        pixels = data.test.images[i].numpy()
        img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        paths.append(out / f"test{i:03d}-label{int(data.test.labels[i])}.png")
        img.save(paths[-1])
    return paths


def runtime_importable(runtime: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in RUNTIME_MODULES[runtime])


def check(run_dir: Path, target: Path, images: list[Path], work: Path) -> list[dict]:
    """Per bundle: how many of `images` (the files `target` names) get the same top-1 class from predict.py
    in a clean venv as from `rescompress predict`."""
    rows = []
    for bundle in ensure_bundles(run_dir):
        pre = json.loads((bundle / "preprocess.json").read_text(encoding="utf-8"))
        runtime = pre["runtime"]
        row = {"bundle": bundle.name, "runtime": runtime, "images": len(images), "agree": 0, "status": "ok",
               "note": "", "max_score_diff": None}
        if not runtime_importable(runtime) or (runtime == "tensorrt" and not (bundle / pre.get("engine", "")).is_file()):
            row.update(status="skipped", note=f"{runtime} or its engine is not available here")
            rows.append(row)
            continue
        python = clean_venv(work / f"venv-{runtime}", runtime)
        ours, out = run_example(python, bundle, images)
        theirs, out2 = rescompress_predict(bundle, target)
        if ours is None or theirs is None:
            failed = "predict.py" if ours is None else "rescompress predict"
            rows.append({**row, "status": "failed", "note": f"{failed}: " + (out if ours is None else out2).strip()[-300:]})
            continue
        diffs = []
        for image in images:
            key = str(image.resolve())
            a, b = ours.get(key), theirs.get(key)
            if not a or not b:
                row.update(status="failed", note=f"{image.name}: no result")
                break
            if a[0][0] != b[0][0]:
                row.update(status="mismatch", note=f"{image.name}: predict.py {a[0][0]}, rescompress predict {b[0][0]}")
                continue
            row["agree"] += 1
            diffs.append(abs(a[0][1] - b[0][1]))
        row["max_score_diff"] = max(diffs) if diffs else None
        rows.append(row)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("image", type=Path, nargs="?", help="an image file or a folder of them (not recursive)")
    parser.add_argument("--images", type=int, default=8, help="test images to write when IMAGE is not given")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from rescompress.deploy import image_files

    with tempfile.TemporaryDirectory(prefix="check-bundles-") as tmp:
        work = Path(tmp)
        target = args.image or work / "images"
        if args.image is None:
            images = dataset_images(args.run_dir, target, args.images)
        elif args.image.is_dir():
            images = image_files(args.image)
        else:
            images = [args.image]
        if not images:
            sys.exit(f"no images to check with ({args.image})")
        rows = check(args.run_dir, target, images, work)
    table = Table(title=f"bundles of {args.run_dir} on {len(images)} image(s): predict.py in a clean venv vs "
                        f"rescompress predict", title_justify="left")
    for col in ("bundle", "runtime", "top-1 agree", "max |Δscore| (printed to 4 dp)", "status", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        colour = {"ok": "green", "skipped": "yellow"}.get(r["status"], "red")
        diff = "—" if r["max_score_diff"] is None else f"{r['max_score_diff']:.1e}"
        table.add_row(r["bundle"], r["runtime"], f"{r['agree']}/{r['images']}", diff,
                      f"[{colour}]{r['status']}[/{colour}]", r["note"])
    Console(highlight=False).print(table)
    return 1 if any(r["status"] in ("failed", "mismatch") for r in rows) or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
