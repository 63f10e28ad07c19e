"""Host latency: warm-up, then timed single calls; medians and tails, never a single number."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np


@dataclass
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    batch: int
    warmup: int
    runs: int
    threads: int
    source: str = "measured"

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(fn: Callable[[np.ndarray], np.ndarray], example: np.ndarray, *, warmup: int = 20,
                    runs: int = 200, threads: Optional[int] = None, progress: Optional[Callable[[], None]] = None) -> LatencyStats:
    """Time `fn(example)` `runs` times after `warmup` untimed calls, one call per sample."""
    x = np.ascontiguousarray(example, dtype=np.float32)
    for _ in range(warmup):
        fn(x)
    samples = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        fn(x)
        samples[i] = (time.perf_counter_ns() - t0) / 1e6
        if progress is not None:
            progress()
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return LatencyStats(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(samples.mean()),
                        min_ms=float(samples.min()), batch=int(x.shape[0]), warmup=warmup, runs=runs,
                        threads=threads or host_threads())


def host_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """Versions and host facts printed beside every measured number."""
    from importlib import metadata

    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import rescompress

    return {
        "rescompress": rescompress.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": host_threads(),
        **{name: version(dist) for name, dist in [("torch", "torch"), ("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                                                   ("numpy", "numpy"), ("torchao", "torchao"),
                                                   ("torch_pruning", "torch-pruning")]},
    }
