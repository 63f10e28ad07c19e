#!/usr/bin/env python
"""rescompress against the default paths, from one fp32 baseline, on Fashion-MNIST, in onnxruntime.

    .venv/bin/python tools/bench_defaults.py --run bench/runs/fashion_mnist_int8-...   # a finished run

Starts from a finished `rescompress run` of recipes/fashion_mnist_int8.yaml (by default the one
tools/bench_pipeline.py recorded in bench/pipeline_cost.json) and its baseline checkpoint, and builds
what a user gets from each tool's documented default path:

- (a) onnxruntime `quantize_static` of the baseline's fp32 ONNX with its defaults (QDQ, int8 activations
  and weights, per-tensor, MinMax), calibrated on training images; plus the setting onnxruntime's docs
  advise for x86 (uint8 activations, per-channel weights), as a second row;
- (b) torch-pruning's MagnitudePruner (L2 group magnitude, the same round_to) stepped to the recipe's
  MACs reduction, then a plain cross-entropy fine-tune for as many epochs as the recipe's stages train;
- (c) the run's own artifacts: through the recipe's stages (prune, fine-tune or distill, QAT), exported.

Each is measured the same way: top-1 over the whole test split in onnxruntime, latency at batch 1 timed
in alternating rounds against the baseline (median of round medians, p90 over every call), file size, and
MACs per image. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from rescompress.bench.latency import provenance
from rescompress.bench.paired import time_paired
from rescompress.export.onnx import OnnxConfig, export_onnx, ort_runner
from rescompress.fileio import atomic_write_json

CALIBRATION_IMAGES = 512  # training images for onnxruntime's calibration (its docs use a few hundred)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a finished run of the Fashion-MNIST recipe")
    ap.add_argument("--pipeline-json", type=Path, default=Path("bench/pipeline_cost.json"),
                    help="where to find the run when --run is not given")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=170, help="timed runs per model per round")
    ap.add_argument("--rounds", type=int, default=6, help="an even count balances the order")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/defaults_fashion_mnist.json"))
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    run_dir = args.run or _run_from(args.pipeline_json)
    if run_dir is None or not (run_dir / "report.json").is_file():
        console.print("[red]error:[/red] give --run with a finished run of recipes/fashion_mnist_int8.yaml "
                      "(or run tools/bench_pipeline.py first)")
        return 2

    from rescompress.pipeline import prepare_resume
    from rescompress.profile import profile

    torch.set_num_threads(args.threads)
    plan, _, manifest = prepare_resume(run_dir)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    data, recipe, spec = plan.data, plan.recipe, plan.data.input_spec
    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    work = run_dir / "bench-defaults"
    work.mkdir(exist_ok=True)

    baseline = _load(run_dir, manifest, "baseline", plan.arch)
    rows: dict[str, dict] = {}
    paths: dict[str, Path] = {}

    def add(name: str, path: Path, macs: int, how: str, **extra) -> None:
        paths[name] = path
        rows[name] = {"model": name, "how": how, "macs": int(macs), "size_bytes": path.stat().st_size, **extra}

    base_macs = profile(baseline, example)["macs"]
    console.print("exporting the baseline ...")
    add("baseline fp32", export_onnx(baseline, example, OnnxConfig(), work / "baseline-fp32.onnx", spec=spec,
                                     from_stage="baseline").path, base_macs, "the run's baseline, fp32 ONNX")

    calib = _calibration_images(data, spec, recipe.seed)
    console.print(f"onnxruntime quantize_static, {len(calib)} calibration images ...")
    t0 = time.perf_counter()
    add("(a) ort quantize_static defaults", _ort_quantize(paths["baseline fp32"], work / "ort-default.onnx", calib),
        base_macs, "onnxruntime quantize_static(model, out, reader): QDQ, S8S8, per-tensor, MinMax",
        seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    add("(a') ort quantize_static U8S8 per-channel", _ort_quantize(paths["baseline fp32"], work / "ort-u8s8.onnx",
                                                                  calib, x86=True),
        base_macs, "as (a) with activation_type=QUInt8, per_channel=True (onnxruntime's advice for x86)",
        seconds=time.perf_counter() - t0)

    prune_cfg = next(s.config for s in recipe.stages if s.kind == "prune")
    epochs = sum(int(getattr(s.config, "epochs", 0) or 0) for s in recipe.stages)
    t0 = time.perf_counter()
    pruned = _torch_pruning_magnitude(baseline, example, prune_cfg.macs_reduction, prune_cfg.round_to, console)
    from rescompress.train import fit

    console.print(f"torch-pruning model: plain fine-tune, {epochs} epochs ...")
    fit(pruned, data, recipe.train, epochs=epochs, lr=recipe.train.lr / 10, seed=recipe.seed + 77, console=console,
        desc="fine-tune (torch-pruning)")
    tp_seconds = time.perf_counter() - t0
    add("(b) torch-pruning magnitude + fine-tune", export_onnx(pruned, example, OnnxConfig(), work / "tp-fp32.onnx",
                                                                spec=spec, from_stage="").path,
        profile(pruned, example)["macs"],
        f"torch_pruning MagnitudePruner (L2), round_to {prune_cfg.round_to}, to {prune_cfg.macs_reduction}x "
        f"fewer MACs; cross-entropy fine-tune {epochs} epochs at lr {recipe.train.lr / 10:g}", seconds=tp_seconds)

    arts = {a["name"]: a for a in report["artifacts"]}
    last = report["stages"][-1]
    float_stage = next(s for s in reversed(report["stages"]) if s.get("precision", "fp32") == "fp32")
    stage_seconds = sum(s.get("seconds") or 0 for s in report["stages"][1:])
    upto = report["stages"].index(float_stage)
    add("(c) rescompress fp32", run_dir / arts["onnx-fp32"]["path"], float_stage["macs"],
        f"the run's onnx-fp32 (after {', '.join(s['name'] for s in report['stages'][1:upto + 1])})",
        seconds=sum(s.get("seconds") or 0 for s in report["stages"][1:upto + 1]))
    add("(c) rescompress int8", run_dir / arts["onnx-int8"]["path"], last["macs"],
        f"the run's onnx-int8 (stage {last['name']}, scheme {last.get('scheme')})", seconds=stage_seconds)

    x_test = spec.normalize_numpy(data.test.images.numpy())
    y_test = data.test.labels.numpy()
    correct: dict[str, np.ndarray] = {}
    for name, path in paths.items():
        run = ort_runner(path, args.threads)
        pred = np.concatenate([run(x_test[i:i + 256]).argmax(1) for i in range(0, len(x_test), 256)])
        correct[name] = pred == y_test
        rows[name]["top1"] = float(correct[name].mean())
        console.print(f"{name:<42} top-1 {rows[name]['top1'] * 100:6.2f} %")

    x = x_test[:1]
    paired = time_paired({name: (lambda p=path: ort_runner(p, args.threads)) for name, path in paths.items()}, x,
                         rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                         on_round=lambda r, n, p50: console.print(f"round {r + 1}/{args.rounds}  {n:<42} p50 {p50:.3f} ms"))
    base = rows["baseline fp32"]
    for name, row in rows.items():
        row.update(paired.summary(name))
        row["speedup_vs_baseline"] = paired.ratio("baseline fp32", name)
        row["delta_top1_pt"] = (row["top1"] - base["top1"]) * 100
        row["delta_top1_pt_ci95"] = paired_ci(correct[name], correct["baseline fp32"])
        row["macs_reduction"] = base["macs"] / row["macs"]
    int8, ort = rows["(c) rescompress int8"], rows["(a) ort quantize_static defaults"]
    verdict = {"speedup_vs_ort_default": paired.ratio("(a) ort quantize_static defaults", "(c) rescompress int8"),
               "delta_top1_pt_vs_ort_default": (int8["top1"] - ort["top1"]) * 100,
               "delta_top1_pt_vs_ort_default_ci95": paired_ci(correct["(c) rescompress int8"],
                                                              correct["(a) ort quantize_static defaults"]),
               "images_disagreeing": int((correct["(c) rescompress int8"] != correct["(a) ort quantize_static defaults"]).sum())}
    verdict["at_least_as_fast_and_accurate"] = (verdict["speedup_vs_ort_default"] >= 1.0
                                                and verdict["delta_top1_pt_vs_ort_default"] >= 0.0)

    table = Table(title=f"Fashion-MNIST {spec.height}x{spec.width}, onnxruntime, batch 1, {args.threads} threads")
    for col in ("model", "top-1 %", "Δ pt", "p50 ms", "p90 ms", "speed-up", "MACs", "size KB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, row in rows.items():
        table.add_row(name, f"{row['top1'] * 100:.2f}", f"{row['delta_top1_pt']:+.2f}", f"{row['p50_ms']:.3f}",
                      f"{row['p90_ms']:.3f}", f"{row['speedup_vs_baseline']:.2f}x", f"{row['macs'] / 1e6:.1f} M",
                      f"{row['size_bytes'] / 1e3:.0f}")
    Console().print(table)
    result = {"dataset": data.summary(), "model": plan.arch["name"], "input_size": spec.height,
              "run_dir": str(run_dir), "recipe": recipe.name, "threads": args.threads,
              "runs": args.runs, "rounds": args.rounds, "warmup": args.warmup, "calibration_images": len(calib),
              "finetune_epochs": epochs, "results": list(rows.values()), "verdict": verdict,
              "provenance": provenance()}
    console.print(f"wrote {atomic_write_json(args.out, result)}")
    return 0


def paired_ci(a: np.ndarray, b: np.ndarray) -> list[float]:
    """95 % interval of top-1(a) - top-1(b), in points, from the per-image differences on the same images
    (normal approximation of the paired difference; the images both get right or wrong cancel)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return [float((d.mean() - half) * 100), float((d.mean() + half) * 100)]


def _run_from(pipeline_json: Path) -> Path | None:
    if not pipeline_json.is_file():
        return None
    runs = json.loads(pipeline_json.read_text(encoding="utf-8"))["recipes"]
    found = [r["run_dir"] for r in runs if "fashion" in Path(r["recipe"]).stem]
    return Path(found[-1]) if found else None


def _load(run_dir: Path, manifest, step: str, arch: dict):
    from rescompress.rundir import load_checkpoint

    done = manifest.done(step)
    return load_checkpoint(run_dir / done["checkpoint"], done["sha256"], arch)


def _calibration_images(data, spec, seed: int) -> np.ndarray:
    """A fixed random draw of training images, normalised as the model takes them."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.train), size=min(CALIBRATION_IMAGES, len(data.train)), replace=False)
    return spec.normalize_numpy(data.train.images[np.sort(idx)].numpy())


def _ort_quantize(fp32: Path, out: Path, calib: np.ndarray, x86: bool = False) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.batches, None)

    if x86:
        quantize_static(str(fp32), str(out), Reader(), per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    else:
        quantize_static(str(fp32), str(out), Reader())
    return out


def _torch_pruning_magnitude(model, example, macs_reduction: float, round_to: int, console: Console):
    """torch-pruning's documented loop: a MagnitudePruner over the whole model but the classifier, stepped
    until the MACs are at or below the target."""
    import copy

    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    base_macs, _ = tp.utils.count_ops_and_params(model, example[:1])
    steps = 50
    pruner = tp.pruner.MagnitudePruner(model, example[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                       iterative_steps=steps, pruning_ratio=0.9, round_to=round_to,
                                       ignored_layers=[model.fc])
    macs = base_macs
    for _ in range(steps):
        if base_macs / macs >= macs_reduction:
            break
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example[:1])
    console.print(f"torch-pruning: {base_macs / macs:.2f}x fewer MACs")
    return model


if __name__ == "__main__":
    sys.exit(main())
