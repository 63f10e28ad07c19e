#!/usr/bin/env python
"""int8 vs fp32 latency in the LiteRT interpreter (XNNPACK), per quantization scheme, for one ResNet at one input size.

    .venv/bin/python tools/bench_int8_litert.py --model resnet18 --size 224 --runs 50

Builds the model (weights as initialised: latency does not depend on their values), converts the fp32
.tflite and one int8 .tflite per scheme (PTQ, calibrated on random tensors, which only sets the ranges), plus
litert-torch's own PT2EQuantizer (symmetric, per-channel, static) over the same tensors as the converter's
reference int8 path, then times each in LiteRT with XNNPACK, one interpreter at a time, batch 1. Rounds
alternate between the models so that machine noise hits all of them alike; the figure to read is the ratio
of medians (p50: the median of the rounds' medians; p90: over every timed call). `all-int` says whether every operator of an int8 model computes on integers (the tflite lint);
one that does not falls back to float kernels. XNNPACK's int8 kernels gain most with AVX-512 VNNI / AVX-VNNI
(x86) or dot-product instructions (ARM); the JSON records the CPU's flags, since on a CPU with AVX2 only
int8 may be no faster than fp32. Prints a table and writes JSON.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from rescompress.bench.int8 import bench_model, int8_bench_args
from rescompress.bench.latency import cpu_int8_flags, provenance
from rescompress.bench.paired import time_paired
from rescompress.compress import pt2e
from rescompress.compress.schemes import ResNetQuantizer
from rescompress.export.lint import lint_file
from rescompress.export.tflite import (
    TFLiteConfig,
    dist_version,
    litert_torch_module,
    quiet_converter,
    export_tflite,
    litert_version,
    tflite_runner,
)
from rescompress.fileio import atomic_write_json

REFERENCE = "int8-litert_torch"


def main(argv: list[str] | None = None) -> int:
    # scheme onnxruntime's uint8 activations have no LiteRT int8 form
    args = int8_bench_args(__doc__.splitlines()[0], "tflite,tensorrt", "bench/int8_litert.json", argv)
    console = Console(stderr=True)

    bench = bench_model(args.model, args.size)
    model, spec, example, calib = bench.model, bench.spec, bench.example, bench.calibration
    work = Path(tempfile.mkdtemp(prefix="rescompress-bench-"))
    console.print("converting fp32 ...")
    paths = {"fp32": export_tflite(model, example, TFLiteConfig(), work / "fp32.tflite", spec=spec,
                                   from_stage="").path}
    for scheme in args.schemes.split(","):
        console.print(f"quantizing ({scheme}) ...")
        prepared = pt2e.prepare(model, example, ResNetQuantizer(scheme, qat=False), qat=False)
        pt2e.calibrate(prepared, calib)
        quantized = pt2e.convert(prepared)
        paths[f"int8-{scheme}"] = export_tflite(quantized, example, TFLiteConfig(precision="int8"),
                                                work / f"int8-{scheme}.tflite", spec=spec, from_stage="").path
    console.print("quantizing (litert-torch PT2EQuantizer) ...")
    paths[REFERENCE] = _litert_torch_reference(model, calib, work / "int8-litert_torch.tflite")

    lint = {name: lint_file(path, "tflite") for name, path in paths.items() if name != "fp32"}
    for name, result in lint.items():
        console.print(f"{name}: {result.summary()}")
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    width = max(map(len, paths))
    # one interpreter alive at a time, so only one holds memory and threads
    paired = time_paired({name: (lambda p=path: tflite_runner(p, args.threads)) for name, path in paths.items()}, x,
                         rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                         on_round=lambda r, n, p50: console.print(f"round {r + 1}/{args.rounds}  {n:<{width}} p50 {p50:8.3f} ms"))
    rows = [{"model": name, **paired.summary(name), "quantization": _how(name),
             "speedup_vs_fp32": paired.ratio("fp32", name), "size_bytes": path.stat().st_size,
             "all_int_lint": lint[name].to_dict() if name in lint else None} for name, path in paths.items()]
    table = Table(title=f"{args.model} {args.size}x{args.size}, LiteRT (XNNPACK), batch 1, {args.threads} threads")
    for col in ("model", "p50 ms", "p90 ms", "speed-up vs fp32", "size MB", "all-int"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        verdict = "-" if row["all_int_lint"] is None else ("pass" if row["all_int_lint"]["passed"] else "FAIL")
        table.add_row(row["model"], f"{row['p50_ms']:.3f}", f"{row['p90_ms']:.3f}",
                      f"{row['speedup_vs_fp32']:.2f}x", f"{row['size_bytes'] / 1e6:.2f}", verdict)
    Console().print(table)
    result = {"model": args.model, "size": args.size, "threads": args.threads, "runs": args.runs,
              "rounds": args.rounds, "results": rows, "cpu_flags": cpu_int8_flags(),
              "provenance": {**provenance(), "ai_edge_litert": litert_version(),
                             "litert_torch": dist_version("litert-torch")}}
    console.print(f"wrote {atomic_write_json(args.out, result)}")
    return 0


def _litert_torch_reference(model: torch.nn.Module, calib: list[torch.Tensor], out: Path) -> Path:
    """litert-torch's documented PT2E flow: its own quantizer, weights left as float -> quantize -> dequantize
    (fold_quantize=False) for the converter to fold."""
    lt = litert_torch_module()
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # a static-shape capture: batch 1 is what the converted model takes, so calibration goes image by image
    x1 = calib[0][:1]
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    with quiet_converter():
        gm = torch.export.export(model.eval(), (x1,), strict=True).module()
        prepared = prepare_pt2e(gm, quantizer)
        with torch.no_grad():
            for batch in calib:
                for image in batch.split(1):
                    prepared(image)
        converted = convert_pt2e(prepared, fold_quantize=False)
        # captured from the eval model, the graph already computes in eval form; only the flag the
        # converter warns on is left set (exported models refuse .eval())
        for m in converted.modules():
            m.training = False
        lt.convert(converted, (x1,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(out))
    return out


def _how(name: str) -> str:
    if name == "fp32":
        return "none"
    if name == REFERENCE:
        return "PTQ, litert_torch PT2EQuantizer (symmetric, per-channel, static)"
    return f"PTQ, rescompress ResNetQuantizer scheme {name.removeprefix('int8-')}"


if __name__ == "__main__":
    sys.exit(main())
