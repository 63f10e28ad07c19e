#!/usr/bin/env python
"""int8 vs fp32 latency in onnxruntime, per quantization scheme, for one ResNet at one input size.

    .venv/bin/python tools/bench_int8_onnxruntime.py --model resnet18 --size 224 --runs 50

Builds the model (weights as initialised: latency does not depend on their values), exports the fp32 ONNX
and one int8 QDQ ONNX per scheme (PTQ, calibrated on random tensors, which only sets the ranges), plus
onnxruntime's own `quantize_static` of the fp32 ONNX (QDQ, U8S8, per-channel) as the runtime's reference
int8 path, then times each in onnxruntime, one session at a time, batch 1. Rounds alternate between the
models so that machine noise hits all of them alike; the figure to read is the ratio of medians (p50: the
median of the rounds' medians; p90: over every timed call). Prints a table and writes JSON.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rescompress.bench.int8 import bench_model, int8_bench_args
from rescompress.bench.latency import provenance
from rescompress.bench.paired import time_paired
from rescompress.compress import pt2e
from rescompress.compress.schemes import SCHEMES, ResNetQuantizer
from rescompress.export.onnx import OnnxConfig, export_onnx, ort_runner
from rescompress.fileio import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    args = int8_bench_args(__doc__.splitlines()[0], ",".join(SCHEMES), "bench/int8_onnxruntime.json", argv)
    console = Console(stderr=True)

    bench = bench_model(args.model, args.size)
    model, spec, example, calib = bench.model, bench.spec, bench.example, bench.calibration
    work = Path(tempfile.mkdtemp(prefix="rescompress-bench-"))
    paths = {"fp32": export_onnx(model, example, OnnxConfig(), work / "fp32.onnx", spec=spec, from_stage="").path}
    for scheme in args.schemes.split(","):
        console.print(f"quantizing ({scheme}) ...")
        prepared = pt2e.prepare(model, example, ResNetQuantizer(scheme, qat=False), qat=False)
        pt2e.calibrate(prepared, calib)
        quantized = pt2e.convert(prepared)
        paths[f"int8-{scheme}"] = export_onnx(quantized, example, OnnxConfig(precision="int8"),
                                              work / f"int8-{scheme}.onnx", spec=spec, from_stage="").path

    paths["int8-ort-quantize_static"] = _ort_quantize_static(paths["fp32"], work / "int8-ort.onnx", calib)
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    width = max(map(len, paths))
    paired = time_paired({name: (lambda p=path: ort_runner(p, args.threads)) for name, path in paths.items()}, x,
                         rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                         on_round=lambda r, n, p50: console.print(f"round {r + 1}/{args.rounds}  {n:<{width}} p50 {p50:8.3f} ms"))
    rows = [{"model": name, **paired.summary(name), "speedup_vs_fp32": paired.ratio("fp32", name),
             "size_bytes": path.stat().st_size} for name, path in paths.items()]
    table = Table(title=f"{args.model} {args.size}x{args.size}, onnxruntime, batch 1, {args.threads} threads")
    for col in ("model", "p50 ms", "p90 ms", "speed-up vs fp32", "size MB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(row["model"], f"{row['p50_ms']:.3f}", f"{row['p90_ms']:.3f}", f"{row['speedup_vs_fp32']:.2f}x",
                      f"{row['size_bytes'] / 1e6:.2f}")
    Console().print(table)
    result = {"model": args.model, "size": args.size, "threads": args.threads, "runs": args.runs,
              "rounds": args.rounds, "results": rows, "provenance": provenance()}
    console.print(f"wrote {atomic_write_json(args.out, result)}")
    return 0


def _ort_quantize_static(fp32: Path, out: Path, calib: list) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": b[:1].numpy()} for b in calib])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


if __name__ == "__main__":
    sys.exit(main())
