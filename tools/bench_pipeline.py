#!/usr/bin/env python
"""Pipeline cost: the wall time of whole recipe runs, per step, and the share spent outside training epochs.

    .venv/bin/python tools/bench_pipeline.py recipes/quickstart.yaml recipes/fashion_mnist_int8.yaml

Runs each recipe with `rescompress run --out bench/runs` as a user would (a fresh process, a new run
directory), times the command, and reads the per-step times the run recorded in its report.json: wall
seconds per step and, inside the training steps, the seconds spent in training epochs. What is left is the
pipeline's own cost (pruning analysis, calibration, int8 conversion, export, lint, measurement, report) and
the process start (imports, data loading). Writes JSON with the run directories, which the default-paths
benchmark reads to reuse the Fashion-MNIST run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rescompress.bench.latency import provenance
from rescompress.fileio import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--runs-dir", type=Path, default=Path("bench/runs"), help="where the run directories go")
    ap.add_argument("--out", type=Path, default=Path("bench/pipeline_cost.json"))
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    missing = [str(r) for r in args.recipes if not r.is_file()]
    if missing:
        console.print(f"[red]error:[/red] no such recipe: {', '.join(missing)}")
        return 2

    rows = []
    for recipe in args.recipes:
        console.rule(f"rescompress run {recipe}")
        before = set(args.runs_dir.glob("*")) if args.runs_dir.exists() else set()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rescompress", "run", str(recipe), "--out", str(args.runs_dir)])
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            console.print(f"[red]error:[/red] {recipe} failed (exit {proc.returncode}); no figures for it")
            return 1
        (run_dir,) = set(args.runs_dir.glob("*")) - before
        rows.append(cost(recipe, run_dir, wall))

    table = Table(title="pipeline cost (wall seconds)")
    for col in ("recipe", "command s", "steps s", "training s", "outside training"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for row in rows:
        table.add_row(row["recipe"], f"{row['command_seconds']:.1f}", f"{row['steps_seconds']:.1f}",
                      f"{row['train_seconds']:.1f}", f"{row['outside_training_share'] * 100:.1f} %")
    Console().print(table)
    result = {"recipes": rows, "provenance": provenance()}
    console.print(f"wrote {atomic_write_json(args.out, result)}")
    return 0


def cost(recipe: Path, run_dir: Path, command_seconds: float) -> dict:
    """The figures of one finished run: per step, and the command's time outside training epochs."""
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    steps = report["run"]["steps"]
    train = sum(s["train_seconds"] for s in steps)
    top1 = {a["name"]: a.get("top1") for a in report["artifacts"]}
    return {"recipe": str(recipe), "run_dir": str(run_dir), "command_seconds": round(command_seconds, 2),
            "steps_seconds": round(sum(s["seconds"] for s in steps), 2),
            "train_seconds": round(train, 2),
            # process start, data loading and report writing are outside the steps but inside the command
            "outside_training_share": (command_seconds - train) / command_seconds,
            "steps": steps, "baseline_top1": report["stages"][0]["top1"], "artifact_top1": top1}


if __name__ == "__main__":
    sys.exit(main())
