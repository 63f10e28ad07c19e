"""Latency of an artifact on one device, from the source the device's profile gives.

- `measured`: on this host, in the artifact's own runtime;
- `measured-remote`: on the device, over ssh, by `tools/remote_runner.py` (see `bench.remote`);
- `estimated`: a layer-wise roofline calibrated on published figures (see `bench.estimate`).

A device that cannot be reached gives a status and a message, never an exception: its results fall back to
the estimate where one exists, and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from rescompress.devices import DeviceProfile

# ssh failures that concern the connection, not the artifact: after one, the device is not tried again
CONNECTION_FAILURES = ("unreachable", "host-key", "auth-failed", "timeout")


@dataclass
class LatencyResult:
    latency: Optional[dict]
    message: str = ""
    remote_status: Optional[str] = None  # the ssh measurement's status, when one was tried


@dataclass
class DeviceLatency:
    """Takes latencies on one device and keeps what the report prints beside them."""

    device: DeviceProfile
    batch: int
    warmup: int
    runs: int
    threads: Optional[int]
    layers: Callable[[], Any]  # the layer table of the model the artifacts come from (built on first use)
    measure_here: Callable[[Any], dict]  # times an artifact on this host
    pool: Optional[list[DeviceProfile]] = None  # the profiles whose published figures calibrate estimates
    connection_failure: Optional[tuple[str, str]] = None  # (status, message) of a connection that failed
    facts: dict = field(default_factory=dict)  # from the device itself (remote runs)
    groups: dict = field(default_factory=dict)  # estimate group -> its calibration and held-out check

    def runtime_of(self, art: Any) -> str:
        from rescompress.export import TARGETS

        return "torch" if art.target == "torch" else TARGETS.get(art.target).runtime

    def take(self, art: Any) -> LatencyResult:
        runtime = self.runtime_of(art)
        plan = self.device.latency_plan(runtime)
        if runtime == "torch" and plan != "measured":
            return LatencyResult(None, f"accuracy reference (torch on this host); torch is not a deployment runtime "
                                       f"on {self.device.name}")
        if art.accuracy_only:
            return LatencyResult(None, f"latency not measured: {art.accuracy_only}")
        if plan == "measured":
            if art.status != "ok":
                return LatencyResult(None, "")
            return LatencyResult(self.measure_here(art))
        if plan == "measured-remote":
            return self._remote(art, runtime)
        if plan == "estimated":
            return self._estimate(art, runtime)
        return LatencyResult(None, f"latency not measured: {self.device.name} has no connection, and its "
                                   f"{runtime} runtime has no compute unit and estimate group to estimate from")

    def _remote(self, art: Any, runtime: str) -> LatencyResult:
        from rescompress.bench.remote import measure_remote

        if art.path is None or not art.path.exists():
            return LatencyResult(None, "no file to measure")
        if self.connection_failure is None:
            out = measure_remote(art.path, runtime, self.device.ssh, precision=art.precision, batch=self.batch,
                                 warmup=self.warmup, runs=self.runs, threads=self.threads,
                                 power_mode_command=self.device.power_mode_command, trtexec=self.device.trtexec)
            if out.status == "ok":
                self.facts.update(out.device_facts or {})
                return LatencyResult({**out.latency, "source": "measured-remote"}, remote_status="ok")
            status, message = out.status, out.message
            if status in CONNECTION_FAILURES:
                self.connection_failure = (status, message)
        else:
            status, message = self.connection_failure
        fallback = self._estimate(art, runtime)
        why = f"measured-remote failed ({status}): {message}"
        if fallback.latency is not None:
            return LatencyResult(fallback.latency, f"{why}; latency estimated instead", remote_status=status)
        return LatencyResult(None, why, remote_status=status)

    def _estimate(self, art: Any, runtime: str) -> LatencyResult:
        from rescompress.bench.estimate import estimate_latency

        est = estimate_latency(self.device, runtime, art.precision, self.layers(), devices=self.pool)
        if est.latency is None:
            return LatencyResult(None, f"latency not estimated: {est.message}")
        group = est.latency.get("group")
        if group and group not in self.groups:
            self.groups[group] = estimate_check(group, self.pool)
        return LatencyResult(est.latency, est.latency.get("extrapolated", ""))

    def provenance(self) -> dict:
        """What stands beside this device's numbers: how each runtime's latency was taken, and from where."""
        out: dict[str, Any] = {"latency": {rt: self.device.latency_plan(rt) for rt in self.device.runtimes}}
        if self.facts:
            out["device"] = self.facts
        if self.connection_failure:
            out["connection"] = ": ".join(self.connection_failure)
        if self.groups:
            out["estimates"] = self.groups
        if self.device.power_mode_command:
            out["power_mode_command"] = self.device.power_mode_command
        return out


def latency_input(x: np.ndarray, batch: int) -> np.ndarray:
    """`batch` images from `x` (repeating the first when there are fewer)."""
    return x[:batch] if len(x) >= batch else x[:1].repeat(batch, axis=0)


def estimate_check(group: str, pool: Optional[list[DeviceProfile]] = None) -> dict:
    """How an estimate group was calibrated, and its out-of-sample error on every published figure of the
    group (each calibration figure left out of the fit in turn; held-out figures never fitted)."""
    from rescompress.bench.estimate import calibrate, figure_errors

    cal = calibrate(group, pool)
    return {"parameters": cal.describe(), "figures": figure_errors(group, pool)}


SUFFIX_RUNTIMES = {".onnx": ("onnxruntime", "tensorrt"), ".tflite": ("tflite",), ".engine": ("tensorrt",),
                   ".plan": ("tensorrt",)}


def onnx_precision(path: Path) -> str:
    """int8 for a QDQ graph, fp16 for half-precision weights, else fp32."""
    import onnx

    from rescompress.errors import RescompressError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends on a file that is not ONNX
        raise RescompressError(f"{path.name} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def bench_file(path: Path, device_name: str, *, host: Optional[str] = None, runtime: Optional[str] = None,
               batch: int = 1, warmup: int = 20, runs: int = 200, threads: Optional[int] = None) -> dict:
    """`rescompress bench`: one file's latency on a device, here or over ssh. Bad input raises a
    RescompressError; a measurement that fails returns its status and message."""
    from rescompress.devices import SSHConnection, load_device
    from rescompress.errors import RescompressError

    path = Path(path)
    if not path.is_file():
        raise RescompressError(f"artifact not found: {path}")
    choices = SUFFIX_RUNTIMES.get(path.suffix.lower())
    if choices is None:
        raise RescompressError(f"{path.name}: unknown artifact type '{path.suffix}' (expected "
                               f"{', '.join(SUFFIX_RUNTIMES)})")
    device = load_device(device_name)
    if runtime is None:
        runtime = next((r for r in choices if r in device.runtimes), choices[0])
    if runtime not in choices:
        raise RescompressError(f"{path.name} cannot run on {runtime} (a {path.suffix} file runs on {', '.join(choices)})")
    if runtime not in device.runtimes:
        raise RescompressError(f"{device.name} does not run {runtime} (its runtimes: {', '.join(device.runtimes)})")
    precision = onnx_precision(path) if path.suffix.lower() == ".onnx" else "as built"
    threads = threads or device.threads
    plan = "measured-remote" if host else device.latency_plan(runtime)
    out = {"artifact": str(path), "device": device.name, "runtime": runtime, "precision": precision}
    if plan == "measured":
        from rescompress.bench.remote import measure_local

        outcome = measure_local(path, runtime, precision=precision, batch=batch, warmup=warmup, runs=runs,
                                threads=threads, trtexec=device.trtexec)
    elif plan == "measured-remote":
        from rescompress.bench.remote import measure_remote

        ssh = device.ssh or SSHConnection(host=host or "")
        outcome = measure_remote(path, runtime, ssh, precision=precision, batch=batch, warmup=warmup, runs=runs,
                                 threads=threads, power_mode_command=device.power_mode_command,
                                 trtexec=device.trtexec, host=host)
    else:
        raise RescompressError(f"{device.name} has no connection to measure on: give --host user@addr, or add "
                               f"connection.ssh to its profile (latency estimates need the model's layers: "
                               f"`rescompress run` makes them)")
    return {**out, "status": outcome.status, "message": outcome.message, "latency": outcome.latency,
            "device_facts": outcome.device_facts}
