#!/usr/bin/env python
"""Pruning efficiency: measured latency speed-up divided by MACs reduction, per runtime.

    .venv/bin/python tools/bench_pruning.py --model resnet18 --size 224 --reductions 1.5,2,3

Builds the model (weights as initialised: latency does not depend on their values), prunes copies of it with
rescompress's structural pruning (torch-pruning DepGraph, l2, uniform, channel counts rounded to --round-to)
to each MACs reduction, exports the dense and pruned models (fp32 ONNX for onnxruntime, fp32 TFLite for
LiteRT), and times them paired, batch 1, rounds alternating between models. Efficiency 1.0 means the
latency fell as much as the MACs did. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rescompress.bench.int8 import bench_model
from rescompress.bench.latency import provenance
from rescompress.bench.paired import time_paired
from rescompress.compress.prune import prune_model
from rescompress.fileio import atomic_write_json
from rescompress.profile import count_macs

RUNTIMES = ("onnxruntime", "tflite")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reductions", default="1.5,2,3", help="comma-separated MACs reductions")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--round-to", type=int, default=8, help="channel counts are multiples of this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=24, help="timed runs per model per round")
    ap.add_argument("--rounds", type=int, default=4, help="an even count balances the order")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/pruning_<model>_<size>.json")
    args = ap.parse_args(argv)
    for runtime in args.runtimes.split(","):
        if runtime not in RUNTIMES:
            ap.error(f"unknown runtime '{runtime}' (one of {', '.join(RUNTIMES)})")
    return args


def pruned_models(args: argparse.Namespace, console: Console) -> dict[str, tuple[object, int]]:
    """'dense' and one pruned copy per reduction, each with its MACs per image."""
    bench = bench_model(args.model, args.size)
    one = bench.example[:1]
    models = {"dense": (bench.model, count_macs(bench.model, one))}
    for reduction in [float(r) for r in args.reductions.split(",")]:
        model = copy.deepcopy(bench.model)
        prune_model(model, one, importance="l2", scope="uniform", macs_reduction=reduction, round_to=args.round_to)
        models[f"{reduction:g}x"] = (model.eval(), count_macs(model, one))
        console.print(f"pruned to {reduction:g}x: {models['dense'][1] / models[f'{reduction:g}x'][1]:.2f}x fewer MACs")
    return models


def export(runtime: str, name: str, model, args: argparse.Namespace, work: Path):
    """The model as a file for `runtime`, and a loader of its runner."""
    import torch

    from rescompress.data import InputSpec

    spec = InputSpec(channels=3, height=args.size, width=args.size, mean=(0.0,) * 3, std=(1.0,) * 3)
    example = torch.zeros(2, 3, args.size, args.size)
    if runtime == "onnxruntime":
        from rescompress.export.onnx import OnnxConfig, export_onnx, ort_runner

        path = export_onnx(model, example, OnnxConfig(), work / f"{name}.onnx", spec=spec, from_stage="").path
        return path, lambda: ort_runner(path, args.threads)
    from rescompress.export.tflite import TFLiteConfig, export_tflite, tflite_runner

    path = export_tflite(model, example, TFLiteConfig(), work / f"{name}.tflite", spec=spec, from_stage="").path
    return path, lambda: tflite_runner(path, args.threads)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out or Path(f"bench/pruning_{args.model}_{args.size}.json")
    console = Console(stderr=True)
    models = pruned_models(args, console)
    work = Path(tempfile.mkdtemp(prefix="rescompress-bench-"))
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    rows = []
    for runtime in args.runtimes.split(","):
        loaders = {}
        for name, (model, _) in models.items():
            console.print(f"exporting {name} for {runtime} ...")
            _, loaders[name] = export(runtime, name, model, args, work)
        paired = time_paired(loaders, x, rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                             on_round=lambda r, n, p50: console.print(f"{runtime} round {r + 1} {n:<6} p50 {p50:.3f} ms"))
        dense_macs = models["dense"][1]
        for name, (_, macs) in models.items():
            reduction = dense_macs / macs
            speedup = paired.ratio("dense", name)
            rows.append({"runtime": runtime, "model": name, "macs": macs, "macs_reduction": reduction,
                         **paired.summary(name), "speedup": speedup,
                         "efficiency": None if name == "dense" else speedup / reduction})
    table = Table(title=f"{args.model} {args.size}x{args.size}, fp32, batch 1, {args.threads} threads, "
                        f"round_to {args.round_to}")
    for col in ("runtime", "model", "MACs", "MACs reduction", "p50 ms", "p90 ms", "speed-up", "efficiency"):
        table.add_column(col, justify="left" if col in ("runtime", "model") else "right")
    for r in rows:
        table.add_row(r["runtime"], r["model"], f"{r['macs'] / 1e6:.0f}M", f"{r['macs_reduction']:.2f}x",
                      f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['speedup']:.2f}x",
                      "—" if r["efficiency"] is None else f"{r['efficiency']:.2f}")
    Console().print(table)
    result = {"model": args.model, "size": args.size, "round_to": args.round_to, "threads": args.threads,
              "runs": args.runs, "rounds": args.rounds, "importance": "l2", "scope": "uniform",
              "results": rows, "provenance": provenance()}
    console.print(f"wrote {atomic_write_json(out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
