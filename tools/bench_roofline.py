#!/usr/bin/env python
"""Roofline: achieved operations per second of fp32 and int8 inference against this host's measured peak.

    .venv/bin/python tools/bench_roofline.py --model resnet18 --size 224 --threads 2

The peak is measured, not quoted: a large fp32 GEMM (MatMul) and a large uint8 x int8 GEMM (MatMulInteger)
run in onnxruntime on the same cores and threads as the models, so both sides use the same kernel library
(MLAS). The model side is the fp32 ONNX and the int8 QDQ ONNX in onnxruntime's fused layout (U8S8), batch 1;
achieved = 2 x MACs / p50. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rescompress.bench.int8 import bench_model
from rescompress.bench.latency import provenance
from rescompress.bench.paired import time_paired
from rescompress.fileio import atomic_write_json


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--gemm", type=int, default=1024, help="M = N = K of the peak GEMMs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=4, help="an even count balances the order")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/roofline_<model>_<size>.json")
    return ap.parse_args(argv)


def gemm_onnx(path: Path, n: int, integer: bool) -> Path:
    """An n x n x n GEMM as an ONNX model: MatMul in fp32, or MatMulInteger (uint8 activations, int8 weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if integer:
        weight = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "w")
        node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        weight = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def session(path: Path, threads: int, feed: np.ndarray | None = None):
    """A runner of the model's one input; with `feed`, it runs on `feed` whatever it is given (the timing
    helper hands over float32, and the integer GEMM takes uint8)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x if feed is None else feed})[0]


def models(args: argparse.Namespace, work: Path, console: Console) -> tuple[Path, Path, int]:
    """The fp32 ONNX, the int8 ONNX in onnxruntime's layout (PTQ on random data: ranges only), and the MACs."""
    from rescompress.compress import pt2e
    from rescompress.compress.schemes import ResNetQuantizer
    from rescompress.export.onnx import OnnxConfig, export_onnx
    from rescompress.profile import count_macs

    bench = bench_model(args.model, args.size)
    fp32 = export_onnx(bench.model, bench.example, OnnxConfig(), work / "fp32.onnx", spec=bench.spec, from_stage="")
    console.print("quantizing (onnxruntime scheme) ...")
    prepared = pt2e.prepare(bench.model, bench.example, ResNetQuantizer("onnxruntime", qat=False), qat=False)
    pt2e.calibrate(prepared, bench.calibration)
    int8 = export_onnx(pt2e.convert(prepared), bench.example, OnnxConfig(precision="int8"), work / "int8.onnx",
                       spec=bench.spec, from_stage="")
    return fp32.path, int8.path, count_macs(bench.model, bench.example[:1])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out or Path(f"bench/roofline_{args.model}_{args.size}.json")
    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="rescompress-bench-"))
    fp32, int8, macs = models(args, work, console)
    n = args.gemm
    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((n, n)).astype(np.float32)
    a8 = rng.integers(0, 256, (n, n), dtype=np.uint8)
    gemm32, gemm8 = gemm_onnx(work / "sgemm.onnx", n, False), gemm_onnx(work / "igemm.onnx", n, True)
    peaks = {}
    for name, path, a in (("fp32", gemm32, a32), ("int8", gemm8, a8)):
        p = time_paired({name: lambda path=path, a=a: session(path, args.threads, a)}, a32, rounds=args.rounds,
                        runs=max(5, args.runs // 3), warmup=2, threads=args.threads)
        peaks[name] = {"gemm_n": n, "p50_ms": p.p50(name), "gops": 2 * n ** 3 / (p.p50(name) * 1e-3) / 1e9}
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    paired = time_paired({"fp32": lambda: session(fp32, args.threads), "int8": lambda: session(int8, args.threads)},
                         x, rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=args.threads)
    rows = []
    for name in ("fp32", "int8"):
        achieved = 2 * macs / (paired.p50(name) * 1e-3) / 1e9
        rows.append({"precision": name, "macs": macs, **paired.summary(name), "achieved_gops": achieved,
                     "peak_gops": peaks[name]["gops"], "share_of_peak": achieved / peaks[name]["gops"]})
    table = Table(title=f"{args.model} {args.size}x{args.size} in onnxruntime, batch 1, {args.threads} threads; "
                        f"peak: {n}x{n}x{n} GEMM, same runtime and threads")
    for col in ("precision", "p50 ms", "achieved GOP/s", "peak GOP/s", "share of peak"):
        table.add_column(col, justify="left" if col == "precision" else "right")
    for r in rows:
        table.add_row(r["precision"], f"{r['p50_ms']:.3f}", f"{r['achieved_gops']:.1f}", f"{r['peak_gops']:.1f}",
                      f"{r['share_of_peak']:.0%}")
    Console().print(table)
    result = {"model": args.model, "size": args.size, "threads": args.threads, "peaks": peaks, "results": rows,
              "provenance": provenance()}
    console.print(f"wrote {atomic_write_json(out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
