"""Latency of an artifact on one device, from the source the device's profile gives.

- `measured`: on this host, in the artifact's own runtime (`bench.latency.time_artifact`, for `rescompress run`
  and `rescompress bench` alike);
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
    evaluation: Any = None  # an EvalOutcome (bench.device_eval) when the device also ran the eval images
    engine: Optional[dict] = None  # an engine the device built and that was copied back


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
    pack: Optional[Callable[[Any], Optional[Path]]] = None  # the eval images as an artifact takes them (None: no eval)
    engine_dir: Optional[Path] = None  # where an engine built on the device is copied back to
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
            engine, chw = None, None
            if runtime == "tensorrt":
                from rescompress.export.tensorrt import TensorRTConfig

                build = art.details.get("build_config")  # what the export's build command was made from
                engine = TensorRTConfig(**build) if build else None
                spec = art.input_spec
                chw = (spec.channels, spec.height, spec.width) if spec is not None else None
            eval_inputs = self.pack(art) if self.pack is not None else None
            if self.device.ssh is None and self.device.adb is not None and runtime == "tflite":
                out = self._adb(art, eval_inputs)
            else:
                out = measure_remote(art.path, runtime, self.device.ssh, engine=engine, batch=self.batch,
                                     warmup=self.warmup, runs=self.runs, threads=self.threads, chw=chw,
                                     power_mode_command=self.device.power_mode_command,
                                     trtexec=self.device.trtexec, eval_inputs=eval_inputs, engine_dir=self.engine_dir)
            if out.status == "ok":
                self.facts.update(out.device_facts or {})
                return LatencyResult({**out.latency, "source": "measured-remote"}, remote_status="ok",
                                     evaluation=out.evaluation, engine=out.engine)
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

    def _adb(self, art: Any, eval_inputs: Optional[Path]) -> Any:
        """A TFLite artifact on a phone over adb: latency with each delegate the profile lists (the first is the
        result; the others are kept beside it under `delegates`), then the eval images with the first."""
        from rescompress.bench.adb import evaluate_adb, measure_adb

        adb = self.device.adb
        out = measure_adb(art.path, adb, threads=self.threads, warmup=self.warmup, runs=self.runs)
        if out.status != "ok":
            return out
        others = {}
        for delegate in adb.delegates[1:]:
            alt = measure_adb(art.path, adb, threads=self.threads, warmup=self.warmup, runs=self.runs,
                              delegate=delegate)
            others[delegate] = alt.latency if alt.status == "ok" else {"status": alt.status, "message": alt.message}
        if others:
            out.latency = {**out.latency, "delegates": others}
        if eval_inputs is not None:
            out.evaluation = evaluate_adb(art.path, np.load(eval_inputs, mmap_mode="r"), adb, threads=self.threads)
        return out

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
        if self.device.adb is not None:
            adb = self.device.adb
            out["adb"] = {"serial": adb.serial, "benchmark_model": adb.benchmark_model, "delegates": list(adb.delegates),
                          "tested_on": "a fake adb replaying benchmark_model's output; never on a real phone"}
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
               batch: int = 1, warmup: int = 20, runs: int = 200, threads: Optional[int] = None,
               images: Optional[Path] = None) -> dict:
    """`rescompress bench`: one file's latency on a device, here or over ssh. Here it is timed by
    `time_artifact`, as `rescompress run` times it, on `images` (a .npy batch as the model takes it) or else
    on seeded random input, named in the result. Bad input raises a RescompressError; a measurement that
    fails returns its status and message."""
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
    engine = None
    if runtime == "tensorrt" and path.suffix.lower() == ".onnx":
        from rescompress.export.tensorrt import engine_config

        engine = engine_config(precision, batch)
        precision = engine.precision
    threads = threads or device.threads
    plan = "measured-remote" if host else device.latency_plan(runtime)
    out = {"artifact": str(path), "device": device.name, "runtime": runtime, "precision": precision}
    if plan == "measured":
        return {**out, **_bench_here(path, runtime, engine, images, batch=batch, warmup=warmup, runs=runs,
                                     threads=threads)}
    if plan != "measured-remote":
        raise RescompressError(f"{device.name} has no connection to measure on: give --host user@addr, or add "
                               f"connection.ssh to its profile (latency estimates need the model's layers: "
                               f"`rescompress run` makes them)")
    if images is not None:
        raise RescompressError(f"--input feeds images on this host only; on {device.name} the device runner "
                               "times seeded random input (leave out --input)")
    from rescompress.bench.remote import measure_remote, parse_host

    if device.ssh is not None:
        ssh = device.ssh
    else:  # --host alone says where the device is
        user, addr = parse_host(host or "")
        ssh = SSHConnection(host=addr, user=user)
    outcome = measure_remote(path, runtime, ssh, engine=engine, batch=batch, warmup=warmup, runs=runs,
                             threads=threads, power_mode_command=device.power_mode_command,
                             trtexec=device.trtexec, host=host)
    return {**out, "status": outcome.status, "message": outcome.message, "latency": outcome.latency,
            "device_facts": outcome.device_facts}


def _bench_here(path: Path, runtime: str, engine: Any, images: Optional[Path], *, batch: int, warmup: int,
                runs: int, threads: Optional[int]) -> dict:
    """status, message, latency and device_facts of one file timed here by `time_artifact`."""
    import platform
    import tempfile

    from rescompress.bench.latency import RANDOM_INPUT, random_input, time_artifact
    from rescompress.errors import RescompressError

    with tempfile.TemporaryDirectory(prefix="rescompress-bench-") as work:  # an engine built from an ONNX
        try:
            art, chw = file_artifact(path, runtime, engine, Path(work))
            if images is not None:
                x, kind = latency_input(load_images(images, chw), batch), f"images from {Path(images).name}"
            else:
                x, kind = random_input((batch, *chw)), RANDOM_INPUT
            latency = time_artifact(art, x, input_kind=kind, warmup=warmup, runs=runs, threads=threads)
        except RescompressError:
            raise
        except Exception as exc:  # the runtime rejected the file or the input: a status, as over ssh
            return {"status": "failed", "message": f"on this host: {type(exc).__name__}: {exc}", "latency": None,
                    "device_facts": {}}
    facts = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
             "machine": platform.machine(), "runtime": runtime, "runtime_version": art.runtime}
    return {"status": "ok", "message": "", "latency": latency, "device_facts": facts}


def file_artifact(path: Path, runtime: str, engine: Any = None,
                  work_dir: Optional[Path] = None) -> tuple[Any, tuple[int, ...]]:
    """A model file as an Artifact run by `runtime` with the loader its export uses, and the shape of one
    image as that artifact takes it (NCHW). An ONNX for TensorRT is first built into an engine in
    `work_dir` with `engine` (a TensorRTConfig), as the export builds it."""
    from rescompress.data import InputSpec
    from rescompress.errors import RescompressError
    from rescompress.export.artifact import Artifact

    path = Path(path)

    def artifact(target: str, runtime_name: str, load_runner: Callable, file: Path, chw: tuple[int, ...]):
        spec = InputSpec(channels=chw[0], height=chw[1], width=chw[2], mean=(0.0,) * chw[0], std=(1.0,) * chw[0])
        return Artifact(name=path.stem, target=target, precision="as built", path=file, input_spec=spec,
                        runtime=runtime_name, load_runner=load_runner), chw

    if runtime == "onnxruntime":
        from rescompress.export.onnx import ort_runner, ort_version
        from rescompress.export.tensorrt import onnx_input

        return artifact("onnx", f"onnxruntime {ort_version()}", ort_runner, path, _image_shape(onnx_input, path))
    if runtime == "tflite":
        from functools import partial

        from rescompress.export.tflite import litert_interpreter, litert_version, tflite_runner

        shape = tuple(int(d) for d in litert_interpreter(path).get_input_details()[0]["shape"][1:])
        if len(shape) != 3:
            raise RescompressError(f"{path.name}: input of shape {shape} per image; an image model takes 3 dims")
        nhwc = shape[2] <= 4 < min(shape[0], shape[1])  # channels last, as the tflite target exports by default
        chw = (shape[2], shape[0], shape[1]) if nhwc else shape
        return artifact("tflite", f"litert {litert_version()} (XNNPACK)", partial(tflite_runner, nhwc=nhwc), path,
                        chw)
    from rescompress.export.tensorrt import (build_engine, engine_input, engine_runner, onnx_input,
                                             tensorrt_available)

    available, why = tensorrt_available()
    if not available:
        raise RescompressError(f"cannot time on TensorRT here: {why}; time it on the device with --host")
    if path.suffix.lower() == ".onnx":
        if work_dir is None:
            raise ValueError("building an engine from an ONNX needs a work_dir")
        chw = _image_shape(onnx_input, path)
        engine_path = Path(work_dir) / path.with_suffix(".engine").name
        version, gpu = build_engine(path, engine_path, engine)
        return artifact("tensorrt", f"tensorrt {version} on {gpu}", engine_runner, engine_path, chw)
    import tensorrt

    chw = _image_shape(engine_input, path)
    return artifact("tensorrt", f"tensorrt {tensorrt.__version__}", engine_runner, path, chw)


def _image_shape(read: Callable[[Path], tuple[str, tuple[int, ...]]], path: Path) -> tuple[int, ...]:
    """One image's CHW shape from `read(path)` (an input reader), a RescompressError when it has none."""
    from rescompress.errors import RescompressError

    try:
        _, chw = read(path)
    except ValueError as exc:
        raise RescompressError(str(exc)) from None
    if len(chw) != 3:
        raise RescompressError(f"{path.name}: input of shape {chw} per image; an image model takes (C, H, W)")
    return chw


def load_images(path: Path, chw: tuple[int, ...]) -> np.ndarray:
    """A .npy batch of preprocessed images (N, C, H, W), checked against the model's image shape."""
    from rescompress.errors import RescompressError

    path = Path(path)
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RescompressError(f"--input {path}: not a readable .npy array ({exc})") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(chw) or len(x) == 0 or x.dtype.kind not in "fiu":
        raise RescompressError(f"--input {path.name}: a {x.dtype} array of shape {x.shape}; the model takes "
                               f"preprocessed images of shape (N, {', '.join(map(str, chw))}), float32")
    return np.ascontiguousarray(x, dtype=np.float32)
