"""Host latency: warm-up, then timed single calls; medians and tails, never a single number.

`time_artifact` is the one way an artifact is timed on this host: `rescompress run` (a device whose latency
is `measured`) and `rescompress bench FILE` on such a device both call it, so the same file gives its figure
from the same code, with the input it was timed on named beside it.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    from rescompress.export.artifact import Artifact

HOST_METHOD = "in-process on this host: warm-up calls, then one timed call per run"
TEST_IMAGES = "test images"
RANDOM_SEED = 0
RANDOM_INPUT = f"random: seeded standard normal (seed {RANDOM_SEED})"


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


def time_artifact(art: "Artifact", x: np.ndarray, *, input_kind: str, warmup: int = 20, runs: int = 200,
                  threads: Optional[int] = None, progress: Optional[Callable[[], None]] = None) -> dict:
    """Latency of `art` on this host in its own runtime (`art.runner(threads)`), called on `x` (a batch as
    the artifact takes it); `input_kind` says what `x` is (`TEST_IMAGES`, `RANDOM_INPUT`, a file). The
    session is released afterwards: one session at a time."""
    try:
        stats = measure_latency(art.runner(threads), x, warmup=warmup, runs=runs, threads=threads, progress=progress)
    finally:
        art.release()
    return {**stats.to_dict(), "runtime": art.runtime, "input": input_kind, "method": HOST_METHOD}


def random_input(shape: tuple[int, ...]) -> np.ndarray:
    """The seeded standard-normal float32 batch that `RANDOM_INPUT` names."""
    return np.random.default_rng(RANDOM_SEED).standard_normal(shape).astype(np.float32)


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


def cpu_int8_flags() -> Optional[list[str]]:
    """This host's SIMD extensions that int8 kernels dispatch on (AVX2/AVX-512/VNNI/AMX on x86, dot-product
    and i8mm on Arm); None where /proc/cpuinfo cannot be read."""
    from rescompress.devices import host_cpu

    flags = host_cpu().isa
    if flags is None:
        return None
    return sorted(f for f in flags if f in ("avx2", "fma", "avx_vnni", "amx_int8", "asimddp", "i8mm")
                  or f.startswith("avx512"))


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def provenance() -> dict:
    """Versions and host facts printed beside every measured number, and when they were taken."""
    from datetime import datetime, timezone

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
        "cpu_flags": " ".join(flags) if (flags := cpu_int8_flags()) is not None else None,
        "memory_bytes": _memory_bytes(),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{name: version(dist) for name, dist in [("torch", "torch"), ("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                                                   ("numpy", "numpy"), ("torchao", "torchao"),
                                                   ("torch_pruning", "torch-pruning")]},
    }
