#!/usr/bin/env python
"""Collect the benchmark JSON files under bench/ into bench/results.json and bench/results.md.

    .venv/bin/python tools/bench_results.py          # after the benchmark scripts (`make bench` runs them all)

Reads what the scripts wrote (a part whose file is missing is listed as not run) and writes one JSON and one
Markdown table per part. The machine, the versions and the date come from each file's own record (its
`provenance`: `processor`, `cpu_count`, `platform`, `python`, the package versions, and, where the script
records them, `measured` (an ISO timestamp), `cpu_flags` and `memory_bytes`; a top-level `cpu_flags` counts
too), never from the host that runs this collector: one "Machine" line when every file agrees, one per table
when they differ. Latency ratios are paired (the models a table compares are timed in alternating rounds in
one process: p50 is the median of the rounds' medians, p90 is over every timed call); the roofline's peak GEMMs
and the pipeline's wall times are not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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
# the rows of defaults_fashion_mnist.json the checks compare
RESCOMPRESS_INT8 = "(c) rescompress int8"
ORT_DEFAULT = "(a) ort quantize_static defaults"
ORT_X86 = "(a') ort quantize_static U8S8 per-channel"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("bench"))
    args = ap.parse_args(argv)
    parts = {part: {name: _load(args.dir / name) for name in names} for part, names in PARTS.items()}
    results = {"command": "make bench", "provenance": provenance(parts), "checks": checks(parts), "parts": parts}
    atomic_write_json(args.dir / "results.json", results)
    text = render(results)
    atomic_write(args.dir / "results.md", lambda p: p.write_text(text, encoding="utf-8"))
    print(f"wrote {args.dir / 'results.json'} and {args.dir / 'results.md'}")
    return 0


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --- where and when each part was measured ---------------------------------------------------------------

MACHINE = ("cpu", "cores", "memory_bytes", "simd", "platform", "python")
_NOT_SOFTWARE = {"processor", "cpu_count", "platform", "python", "measured", "cpu_flags", "memory_bytes"}


def file_provenance(data: dict) -> dict:
    """Where and when one part file was measured, as its script recorded it (None: not recorded)."""
    p = data.get("provenance") or {}
    flags = p.get("cpu_flags", data.get("cpu_flags"))
    measured = p.get("measured")
    return {"date": str(measured)[:10] if measured else None, "cpu": p.get("processor"), "cores": p.get("cpu_count"),
            "memory_bytes": p.get("memory_bytes"),
            "simd": None if flags is None else sorted(flags.split() if isinstance(flags, str) else flags),
            "platform": p.get("platform"), "python": p.get("python"),
            "software": {k: str(v) for k, v in p.items() if k not in _NOT_SOFTWARE and v}}


def provenance(parts: dict) -> dict:
    """Each written file's provenance, and the date and machine they share (None where two files differ)."""
    files = {name: file_provenance(data) for part in parts.values() for name, data in part.items() if data}
    date, machine = _shared(files.values(), ("date",)), _shared(files.values(), MACHINE)
    return {"same_date": date is not None, "date": (date or {}).get("date"),
            "same_machine": machine is not None, "machine": machine, "files": files}


def _shared(provs, keys: Sequence[str]) -> Optional[dict]:
    """The value of each key that every file recording it agrees on; None when two files disagree."""
    out: dict[str, Any] = {}
    for key in keys:
        seen = {json.dumps(p[key]) for p in provs if p[key] is not None}
        if len(seen) > 1:
            return None
        out[key] = json.loads(seen.pop()) if seen else None
    return out


def describe_machine(m: dict, simd_source: str = "") -> str:
    mem = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""
    cores = f", {m['cores']} cores" if m.get("cores") else ""
    simd = "not recorded" if m.get("simd") is None else (", ".join(m["simd"]) or "none listed") + simd_source
    return (f"{m.get('cpu') or 'CPU not recorded'}{cores}{mem}; SIMD {simd}; "
            f"{m.get('platform') or 'platform not recorded'}, Python {m.get('python') or 'not recorded'}")


def _header(prov: dict, command: str) -> list[str]:
    files = prov["files"]
    if not prov["same_date"]:
        when = "; the files were measured on different dates, each table gives its own"
    elif prov["date"]:
        dated = sum(1 for p in files.values() if p["date"])
        when = f" on {prov['date']}" + (f" ({dated} of {len(files)} files record the date)"
                                        if dated < len(files) else "")
    else:
        when = "; the files record no measurement date"
    lines = [f"Measured with `{command}`{when}.", ""]
    if prov["same_machine"] and files:
        flagged = [name for name, p in files.items() if p["simd"] is not None]
        source = f" (as {', '.join(flagged)} record it)" if 0 < len(flagged) < len(files) else ""
        lines += [f"**Machine:** {describe_machine(prov['machine'], source)}.", ""]
    elif files:
        lines += ["**Machine:** the files were measured on different machines; each table names its own.", ""]
    return lines


def stamp(prov: dict, name: str) -> list[str]:
    """The line a file's table starts with when the files differ in date or machine ([] when they agree)."""
    p = prov["files"].get(name)
    if p is None or (prov["same_date"] and prov["same_machine"]):
        return []
    said = [] if prov["same_date"] else [f"Measured on {p['date'] or 'a date not recorded'}."]
    said += [] if prov["same_machine"] else [f"**Machine:** {describe_machine(p)}."]
    return [" ".join(said), ""]


# --- the headline checks ----------------------------------------------------------------------------

def interval_verdict(point: float, ci: Sequence[float]) -> str:
    """What a 95 % interval of a difference (new minus reference) supports: "better" when it lies above 0,
    "worse" when it lies below, otherwise "no worse within noise" (point estimate ≥ 0) or "within noise"."""
    lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no worse within noise" if point >= 0 else "within noise"


def checks(parts: dict) -> list[dict]:
    """The claims the tables back, each with the figures it rests on and the verdict they support."""
    out = []
    defaults = parts["defaults"]["defaults_fashion_mnist.json"]
    if defaults:
        out += _defaults_checks(defaults)
    for name in PARTS["pruning"]:
        data = parts["pruning"][name]
        if not data:
            continue
        row = next((r for r in data["results"] if r["runtime"] == "onnxruntime" and r["model"] == "2x"), None)
        if row:
            out.append({"claim": f"pruning efficiency at 2x fewer MACs ≥ {EFFICIENCY_GOAL} in onnxruntime "
                                 f"({data['model']} {data['size']}²)",
                        "verdict": "yes" if row["efficiency"] >= EFFICIENCY_GOAL else "no",
                        "figures": f"{x(row['speedup'])} faster for {x(row['macs_reduction'])} fewer MACs: "
                                   f"efficiency {row['efficiency']:.2f}"})
    return out


def _defaults_checks(data: dict) -> list[dict]:
    """rescompress int8 against onnxruntime's quantize_static: speed against its default and against its x86
    advice (ratios of p50s timed in the same rounds), accuracy as far as the paired interval goes."""
    out = []
    rows = {r["model"]: r for r in data["results"]}
    int8, default, x86 = rows.get(RESCOMPRESS_INT8), rows.get(ORT_DEFAULT), rows.get(ORT_X86)
    if int8 and default:
        ratios = [default["p50_ms"] / int8["p50_ms"]]
        figures = (f"{x(ratios[0])} the speed of its defaults (S8S8 per-tensor: "
                   f"{x(default['speedup_vs_baseline'])} of fp32 here)")
        claim = "rescompress int8 is at least as fast as onnxruntime's quantize_static with its defaults"
        if x86:
            ratios.append(x86["p50_ms"] / int8["p50_ms"])
            figures += (f"; {x(ratios[1])} the speed of U8S8 per-channel, onnxruntime's advice for x86 (row (a'): "
                        f"{x(x86['speedup_vs_baseline'])} of fp32)")
            claim += " and with its x86 advice"
        out.append({"claim": claim + " (Fashion-MNIST, onnxruntime)",
                    "verdict": "yes" if min(ratios) >= 1.0 else "no", "figures": figures})
    v = data["verdict"]
    ci = v.get("delta_top1_pt_vs_ort_default_ci95")
    out.append({"claim": "rescompress int8 is at least as accurate as onnxruntime's quantize_static with its "
                         "defaults (Fashion-MNIST, onnxruntime)",
                "verdict": interval_verdict(v["delta_top1_pt_vs_ort_default"], ci) if ci else "no interval recorded",
                "figures": f"{v['delta_top1_pt_vs_ort_default']:+.2f} pt top-1" + _ci(v)})
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


def each(files: dict, render: Callable[[str, dict], list[str]], prov: dict) -> list[str]:
    """`render(name, data)` for each part file that was written, below its date and machine where the files
    differ in those; a "not run" line for each file that was not written."""
    out: list[str] = []
    for name, data in files.items():
        if data:
            heading, *rest = render(name, data)
            out += [heading, "", *stamp(prov, name), *rest[1:]]
        else:
            out += not_run([name])
    return out


NEGATIVE = ("no", "worse")  # verdicts shown in bold


def render(results: dict) -> str:
    prov = results["provenance"]
    lines = ["# rescompress benchmarks", "", *_header(prov, results["command"]),
             "Latencies are batch 1 on all of the machine's cores unless stated. The models each table of sections "
             "1 to 3 compares, and section 4's fp32 and int8 models, are timed in alternating rounds in one "
             "process so that noise from a shared machine hits them alike, the order reversing every other round: "
             "p50 is the median of the rounds' medians, p90 is over every timed call. Section 4's peak GEMMs are "
             "each timed on their own, and section 5 (like the build times in section 3) is the wall time of one "
             "run: those figures are not paired. Read the ratios; absolute milliseconds move with the machine's "
             "load.", ""]
    lines += ["## Checks", "",
              "Accuracy differences are judged by their 95 % interval over the same test images: better or worse "
              "only when the whole interval lies on one side of zero, otherwise within noise.", ""]
    lines += table(["Claim", "Verdict", "Figures"],
                   [[c["claim"], f"**{c['verdict']}**" if c["verdict"] in NEGATIVE else c["verdict"], c["figures"]]
                    for c in results["checks"]], 3)
    parts = results["parts"]
    lines += _int8(parts["int8"], prov) + _pruning(parts["pruning"], prov) + _defaults(parts["defaults"], prov)
    lines += _roofline(parts["roofline"], prov) + _pipeline(parts["pipeline"], prov) + _versions(prov)
    return "\n".join(lines).rstrip() + "\n"


def _int8(files: dict, prov: dict) -> list[str]:
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

    lines += each(files, one, prov)
    lines += ["In onnxruntime the `tensorrt` and `tflite` layouts run unfused (their Q/DQ pairs are computed as "
              "written), so they are slower than fp32 there; they are the files for those runtimes, not for this "
              "one. LiteRT's int8 kernels gain most with VNNI (x86) or dot-product instructions (ARM); on a CPU "
              "without them int8 can be no faster than fp32.", ""]
    return lines


def _pruning(files: dict, prov: dict) -> list[str]:
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

    lines += each(files, one, prov)
    lines += ["At 32² a ResNet-20 layer is so small that each operator's fixed cost is a large share of it, so "
              "latency falls more slowly than the MACs.", ""]
    return lines


def _defaults(files: dict, prov: dict) -> list[str]:
    data = files["defaults_fashion_mnist.json"]
    if not data:
        return ["## 3. Against the default paths, from one fp32 baseline", ""] + not_run(list(files))
    ds = data["dataset"]
    lines = [f"## 3. Against the default paths ({ds.get('name')}, one fp32 baseline)", "",
             *stamp(prov, "defaults_fashion_mnist.json")]
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


def _roofline(files: dict, prov: dict) -> list[str]:
    lines = ["## 4. Roofline", "",
             "Peak measured on the same cores and threads with onnxruntime's own kernels: a large fp32 MatMul "
             "and a large uint8 × int8 MatMulInteger, each timed on its own before the models. Achieved = 2 × MACs "
             "÷ p50 of the model (fp32 ONNX; int8 QDQ ONNX in onnxruntime's fused U8S8 layout), batch 1; the two "
             "models are timed in the same rounds, the peaks are not, so the share of peak is not a paired ratio.",
             ""]
    def one(name: str, data: dict) -> list[str]:
        rows = [[r["precision"], f"{r['macs'] / 1e6:.0f} M", ms(r["p50_ms"]), ms(r["p90_ms"]),
                 f"{r['achieved_gops']:.1f}", f"{r['peak_gops']:.1f}", f"{r['share_of_peak'] * 100:.0f} %"]
                for r in data["results"]]
        return ([f"**{data['model']} {data['size']}×{data['size']}**, {data['threads']} threads", ""]
                + table(["Precision", "MACs", "p50 ms", "p90 ms", "Achieved GOP/s", "Peak GOP/s", "Share of peak"],
                        rows))

    lines += each(files, one, prov)
    return lines


def _pipeline(files: dict, prov: dict) -> list[str]:
    data = files["pipeline_cost.json"]
    lines = ["## 5. Pipeline cost", ""]
    if not data:
        return lines + not_run(list(files))
    lines += stamp(prov, "pipeline_cost.json")
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


def _versions(prov: dict) -> list[str]:
    """Each package's version as the files recorded it; where files differ, which file ran which version."""
    seen: dict[str, dict[str, list[str]]] = {}
    for name, p in prov["files"].items():
        for package, version in p["software"].items():
            seen.setdefault(package, {}).setdefault(version, []).append(name)
    lines = []
    for package, versions in sorted(seen.items()):
        if len(versions) == 1:
            lines.append(f"- {package}: {next(iter(versions))}")
        else:
            lines.append(f"- {package}: " + "; ".join(f"{v} ({', '.join(names)})" for v, names in versions.items()))
    return ["## Software", ""] + lines + [""]


if __name__ == "__main__":
    sys.exit(main())
