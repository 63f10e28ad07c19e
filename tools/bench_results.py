#!/usr/bin/env python
"""Collect the benchmark JSON files under bench/ into bench/results.json and bench/results.md.

    .venv/bin/python tools/bench_results.py          # after the benchmark scripts (`make bench` runs them all)

Reads what the scripts wrote (a part whose file is missing is listed as not run), adds the machine the
figures were taken on, and writes one JSON and one Markdown table per part. Every figure is a ratio or a
comparison timed in alternating rounds within one process: p50 is the median of the rounds' medians, p90
is over every timed call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from rescompress.fileio import atomic_write, atomic_write_json

# part -> the files it reads, relative to the bench directory
PARTS = {
    "int8": ["int8_onnxruntime_resnet18.json", "int8_onnxruntime_resnet20.json", "int8_litert_resnet18.json",
             "int8_litert_resnet20.json"],
    "pruning": ["pruning_resnet18_224.json", "pruning_resnet20_32.json"],
    "defaults": ["defaults_fashion_mnist.json"],
    "roofline": ["roofline_resnet18_224.json", "roofline_resnet20_32.json"],
    "pipeline": ["pipeline_cost.json"],
}
EFFICIENCY_GOAL = 0.8  # pruning: speed-up per MACs reduction at 2x, in onnxruntime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("bench"))
    args = ap.parse_args(argv)
    parts = {part: {name: _load(args.dir / name) for name in names} for part, names in PARTS.items()}
    results = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "command": "make bench", "checks": checks(parts), "parts": parts}
    atomic_write_json(args.dir / "results.json", results)
    text = render(results)
    atomic_write(args.dir / "results.md", lambda p: p.write_text(text, encoding="utf-8"))
    print(f"wrote {args.dir / 'results.json'} and {args.dir / 'results.md'}")
    return 0


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --- the machine --------------------------------------------------------------------------------------

def machine() -> dict:
    """What the figures depend on: CPU model, cores, the SIMD extensions int8 kernels dispatch on, memory."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith(("model name", "Model"))), platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    simd = sorted(f for f in set(flags) if f in ("avx2", "fma", "avx_vnni", "asimddp", "i8mm", "amx_int8")
                  or f.startswith("avx512"))
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), None)
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd, "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="ignore")
    except OSError:
        return ""


# --- the headline checks ----------------------------------------------------------------------------

def checks(parts: dict) -> list[dict]:
    """The claims the tables back, each with the figures it rests on and whether they hold."""
    out = []
    defaults = parts["defaults"]["defaults_fashion_mnist.json"]
    if defaults:
        v = defaults["verdict"]
        out.append({"claim": "rescompress int8 is at least as fast as onnxruntime's default quantize_static "
                             "path and at least as accurate (Fashion-MNIST, onnxruntime)",
                    "holds": bool(v["at_least_as_fast_and_accurate"]),
                    "figures": f"{v['speedup_vs_ort_default']:.2f}x the speed, "
                               f"{v['delta_top1_pt_vs_ort_default']:+.2f} pt top-1" + _ci(v)})
    for name in PARTS["pruning"]:
        data = parts["pruning"][name]
        if not data:
            continue
        row = next((r for r in data["results"] if r["runtime"] == "onnxruntime" and r["model"] == "2x"), None)
        if row:
            out.append({"claim": f"pruning efficiency at 2x fewer MACs ≥ {EFFICIENCY_GOAL} in onnxruntime "
                                 f"({data['model']} {data['size']}²)",
                        "holds": row["efficiency"] >= EFFICIENCY_GOAL,
                        "figures": f"{row['speedup']:.2f}x faster for {row['macs_reduction']:.2f}x fewer MACs: "
                                   f"efficiency {row['efficiency']:.2f}"})
    return out


def _ci(v: dict) -> str:
    ci = v.get("delta_top1_pt_vs_ort_default_ci95")
    if not ci:
        return ""
    return (f" (95 % interval {ci[0]:+.2f} to {ci[1]:+.2f} pt over the same test images; "
            f"{v.get('images_disagreeing', '?')} images scored differently)")


# --- Markdown -----------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[Any]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def ms(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.3f}"


def x(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}×"


def mb(v: Optional[float]) -> str:
    return "–" if v is None else f"{v / 1e6:.2f}"


def not_run(names: list[str]) -> list[str]:
    return [f"Not run: {', '.join(names)} missing.", ""]


def each(files: dict, render) -> list[str]:
    """`render(name, data)` for each part file that was written, a "not run" line for each that was not."""
    out: list[str] = []
    for name, data in files.items():
        out += render(name, data) if data else not_run([name])
    return out


def render(results: dict) -> str:
    m = results["machine"]
    mem = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""
    lines = ["# rescompress benchmarks", "",
             f"Measured with `{results['command']}` on {results['generated'][:10]}.", "",
             f"**Machine:** {m['cpu']}, {m['cores']} cores{mem}; SIMD {', '.join(m['simd']) or 'none listed'}; "
             f"{m['platform']}, Python {m['python']}.", "",
             "Every latency is batch 1 on all of the machine's cores unless stated, timed in alternating rounds "
             "in one process so that noise from a shared machine hits every model alike, the order reversing "
             "every other round: p50 is the median of the rounds' medians, p90 is over every timed call. Read "
             "the ratios; absolute milliseconds move with the machine's load.", ""]
    lines += ["## Checks", ""]
    lines += table(["Claim", "Holds", "Figures"],
                   [[c["claim"], "yes" if c["holds"] else "**no**", c["figures"]] for c in results["checks"]], 3)
    parts = results["parts"]
    lines += _int8(parts["int8"]) + _pruning(parts["pruning"]) + _defaults(parts["defaults"])
    lines += _roofline(parts["roofline"]) + _pipeline(parts["pipeline"]) + _versions(parts)
    return "\n".join(lines).rstrip() + "\n"


def _int8(files: dict) -> list[str]:
    lines = ["## 1. int8 against fp32, per runtime", "",
             "Weights as initialised (latency does not depend on their values), PTQ ranges from random tensors. "
             "One row per int8 layout: rescompress's schemes (`int8-<scheme>`) and each runtime's own tool "
             "(onnxruntime `quantize_static` U8S8 per-channel; litert-torch's PT2EQuantizer).", ""]
    def one(name: str, data: dict) -> list[str]:
        runtime = "onnxruntime" if "onnxruntime" in name else "LiteRT (XNNPACK)"
        rows = [[r["model"], ms(r.get("p50_ms")), ms(r.get("p90_ms")), x(r["speedup_vs_fp32"]), mb(r["size_bytes"])]
                for r in data["results"]]
        return ([f"**{data['model']} {data['size']}×{data['size']}, {runtime}**, {data['threads']} threads, "
                 f"{data['rounds']} rounds × {data['runs']} runs", ""]
                + table(["Model", "p50 ms", "p90 ms", "Speed-up vs fp32", "Size MB"], rows))

    lines += each(files, one)
    lines += ["In onnxruntime the `tensorrt` and `tflite` layouts run unfused (their Q/DQ pairs are computed as "
              "written), so they are slower than fp32 there; they are the files for those runtimes, not for this "
              "one. LiteRT's int8 kernels gain most with VNNI (x86) or dot-product instructions (ARM); on a CPU "
              "without them int8 can be no faster than fp32.", ""]
    return lines


def _pruning(files: dict) -> list[str]:
    lines = ["## 2. Pruning efficiency", "",
             "Structural pruning (L2 group magnitude, uniform, channel counts multiples of 8) to 1.5×, 2× and 3× "
             "fewer MACs, fp32. Efficiency = measured speed-up ÷ MACs reduction (1.0: latency falls as fast as "
             "the MACs).", ""]
    def one(name: str, data: dict) -> list[str]:
        rows = [[r["runtime"], r["model"], f"{r['macs'] / 1e6:.0f} M", x(r["macs_reduction"]), ms(r["p50_ms"]),
                 ms(r["p90_ms"]), x(r["speedup"]), "–" if r["efficiency"] is None else f"{r['efficiency']:.2f}"]
                for r in data["results"]]
        return ([f"**{data['model']} {data['size']}×{data['size']}**, {data['threads']} threads, "
                 f"{data['rounds']} rounds × {data['runs']} runs", ""]
                + table(["Runtime", "Target", "MACs", "MACs reduction", "p50 ms", "p90 ms", "Speed-up",
                         "Efficiency"], rows, 2))

    lines += each(files, one)
    lines += ["At 32² a ResNet-20 layer is so small that each operator's fixed cost is a large share of it, so "
              "latency falls more slowly than the MACs.", ""]
    return lines


def _defaults(files: dict) -> list[str]:
    data = files["defaults_fashion_mnist.json"]
    if not data:
        return ["## 3. Against the default paths, from one fp32 baseline", ""] + not_run(list(files))
    ds = data["dataset"]
    lines = [f"## 3. Against the default paths ({ds.get('name')}, one fp32 baseline)", ""]
    lines += [f"{data.get('model', 'The model')} at {data.get('input_size', '?')}² trained by the `{data['recipe']}` "
              f"recipe, its baseline the start of every path (test split "
              f"{(ds.get('sizes') or {}).get('test', '?')} images). Top-1 over the whole test split in onnxruntime; "
              f"latency in onnxruntime, {data['threads']} threads, {data['rounds']} rounds × {data['runs']} runs, "
              f"all models in the same rounds. onnxruntime calibrated on {data['calibration_images']} training "
              f"images; the torch-pruning model fine-tuned {data['finetune_epochs']} epochs, as many as the "
              f"recipe's stages train.", ""]
    rows = [[r["model"], f"{r['top1'] * 100:.2f}", f"{r['delta_top1_pt']:+.2f}" + _interval(r), ms(r["p50_ms"]), ms(r["p90_ms"]),
             x(r["speedup_vs_baseline"]), f"{r['macs'] / 1e6:.2f} M", f"{r['size_bytes'] / 1e3:.0f}",
             "–" if r.get("seconds") is None else f"{r['seconds']:.0f}"]
            for r in data["results"]]
    lines += table(["Path", "Top-1 %", "Δ pt [95 % interval]", "p50 ms", "p90 ms", "Speed-up", "MACs", "Size KB",
                    "Build s (after the baseline)"], rows)
    lines += [f"- {r['model']}: {r['how']}" for r in data["results"]] + [""]
    return lines


def _interval(row: dict) -> str:
    ci = row.get("delta_top1_pt_ci95")
    if not ci or row["model"] == "baseline fp32":
        return ""
    return f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _roofline(files: dict) -> list[str]:
    lines = ["## 4. Roofline", "",
             "Peak measured on the same cores and threads with onnxruntime's own kernels: a large fp32 MatMul "
             "and a large uint8 × int8 MatMulInteger. Achieved = 2 × MACs ÷ p50 of the model (fp32 ONNX; int8 "
             "QDQ ONNX in onnxruntime's fused U8S8 layout), batch 1.", ""]
    def one(name: str, data: dict) -> list[str]:
        rows = [[r["precision"], f"{r['macs'] / 1e6:.0f} M", ms(r["p50_ms"]), ms(r["p90_ms"]),
                 f"{r['achieved_gops']:.1f}", f"{r['peak_gops']:.1f}", f"{r['share_of_peak'] * 100:.0f} %"]
                for r in data["results"]]
        return ([f"**{data['model']} {data['size']}×{data['size']}**, {data['threads']} threads", ""]
                + table(["Precision", "MACs", "p50 ms", "p90 ms", "Achieved GOP/s", "Peak GOP/s", "Share of peak"],
                        rows))

    lines += each(files, one)
    return lines


def _pipeline(files: dict) -> list[str]:
    data = files["pipeline_cost.json"]
    lines = ["## 5. Pipeline cost", ""]
    if not data:
        return lines + not_run(list(files))
    lines += ["Wall time of `rescompress run RECIPE` in a fresh process, and per step as the run recorded it. "
              "\"Training\" is the time in training epochs (with their per-epoch validation); the rest is the "
              "pipeline's own work: pruning analysis, int8 preparation and conversion, export, lint, accuracy "
              "and latency measurement, report, process start and data loading.", ""]
    rows = [[r["recipe"], f"{r['command_seconds']:.1f}", f"{r['train_seconds']:.1f}",
             f"{r['command_seconds'] - r['train_seconds']:.1f}", f"{r['outside_training_share'] * 100:.1f} %"]
            for r in data["recipes"]]
    lines += table(["Recipe", "Command s", "Training s", "Outside training s", "Outside training share"], rows)
    for r in data["recipes"]:
        lines += [f"**{r['recipe']}** per step", ""]
        total = r["command_seconds"]
        rows = [[s["step"], f"{s['seconds']:.1f}", f"{s['train_seconds']:.1f}",
                 f"{s['seconds'] - s['train_seconds']:.1f}", f"{100 * s['seconds'] / total:.1f} %"] for s in r["steps"]]
        rest = total - r["steps_seconds"]
        rows.append(["process start, data, report", f"{rest:.1f}", "0.0", f"{rest:.1f}", f"{100 * rest / total:.1f} %"])
        lines += table(["Step", "Seconds", "Training s", "Outside training s", "Share of command"], rows)
    return lines


def _versions(parts: dict) -> list[str]:
    seen: dict[str, str] = {}
    for files in parts.values():
        for data in files.values():
            for k, v in ((data or {}).get("provenance") or {}).items():
                if k not in ("platform", "processor", "cpu_count", "python") and v:
                    seen.setdefault(k, str(v))
    return ["## Software", ""] + [f"- {k}: {v}" for k, v in sorted(seen.items())] + [""]


if __name__ == "__main__":
    sys.exit(main())
