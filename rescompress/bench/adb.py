"""Latency and accuracy of a TFLite artifact measured on an Android phone over adb, with TFLite's
`benchmark_model` (`measured-remote` for a profile with `connection.adb`).

Nothing here has been run against a real phone: it is tested against `tests/fake_adb.py`, a fake `adb` whose
`benchmark_model` replays benchmark_model's output format and computes outputs with LiteRT on the host.

What it relies on, read in TensorFlow Lite's sources (tensorflow/lite/tools/benchmark, now
google-ai-edge/LiteRT tflite/tools/benchmark: benchmark_model.cc, benchmark_tflite_model.cc, README.md, and
the `Stat` printer in xla/tsl/util/stats_calculator.h):

- flags `--graph`, `--num_threads`, `--warmup_runs`, `--warmup_min_secs`, `--num_runs`, `--min_secs`, and
  `--use_xnnpack=true` / `--use_gpu=true` / `--use_nnapi=true` for the delegate. Without `--min_secs=0` and
  `--warmup_min_secs=0` benchmark_model runs for at least 1 s (0.5 s of warm-up) whatever the counts say, so
  both are passed; the counts it prints (`count=`) are the ones reported;
- its log: `Running benchmark for at least N iterations ...`, then the stat line of that phase, in
  microseconds: `count=50 first=.. curr=.. min=.. max=.. avg=.. std=..` (`count=N curr=X(all same)` when every
  run took the same time), with ` p5=.. median=.. p95=..` appended by builds whose Stat keeps percentiles;
  and `Inference timings in us: Init: .., First inference: .., Warmup (avg): .., Inference (avg): ..`.
  A build that prints `median=` gives `p50_ms` as the median (`statistic: p50`); an older one prints no
  percentiles, and then `p50_ms` holds the mean (`statistic: mean`, said in `note`), since the pipeline ranks
  on `p50_ms`. benchmark_model prints no TFLite version: `runtime_version` is None;
- input files: `--input_layer=NAME --input_layer_shape=1,H,W,C --input_layer_value_files=NAME:FILE`, FILE
  being the tensor's raw bytes (its size must equal the tensor's); a NAME that differs from the model's only
  draws a warning, so a name holding ',' or ':' (which the flag syntax splits on) is passed as `input`;
- `--output_filepath=FILE`: after the last run, every output tensor's raw bytes, in output order. The flag is
  in recent builds only; an older binary warns `Unconsumed cmdline flags` and writes nothing, which is
  reported as such.

Each image is one benchmark_model run (`--num_runs=1 --warmup_runs=0`): the exported models have batch 1 and
their reshapes are fixed, so resizing the batch is not relied on. All images go in one `adb push` of a
folder, run in one shell loop on the phone and come back as one file: seven adb calls whatever their number.

adb joins the words after `shell` into one line for the phone's shell: every word is `shlex.quote`d. `push`
and `pull` paths are not read by a shell; the profile's paths are plain characters (`ADBConnection`).

A failure is a status with a message saying what to do, never an exception (only invalid arguments raise
ValueError): "ok" | "unreachable" | "runtime-missing" | "out-of-memory" | "timeout" | "failed".
"""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from rescompress.bench.device_eval import EvalOutcome
from rescompress.bench.remote import RemoteOutcome

if TYPE_CHECKING:
    from rescompress.devices import ADBConnection

DELEGATE_FLAGS = {"xnnpack": "--use_xnnpack=true", "gpu": "--use_gpu=true", "nnapi": "--use_nnapi=true"}
CLEANUP_TIMEOUT_S = 30
EXIT_MARK = "rescompress-exit:"  # printed after the command: old adb returns 0 whatever the phone's exit status
IMAGE_MARK = "rescompress-image:"
NO_OUTPUT_MARK = "rescompress-no-output"
PROP = re.compile(r"^\[([^\]]+)\]: \[(.*)\]\s*$")
NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
STAT_FIELD = re.compile(rf"\b(count|first|curr|min|max|avg|std|p5|median|p95)=({NUMBER})")
TIMINGS = re.compile(rf"Inference timings in us: Init: ({NUMBER}), First inference: ({NUMBER}), "
                     rf"Warmup \(avg\): ({NUMBER}), Inference \(avg\): ({NUMBER})")
THREADS_USED = re.compile(r"#threads used for CPU inference: \[(\d+)\]")
DELEGATION = re.compile(r"(Explicitly applied \w+ delegate, and the model graph will be [^\n]*?|Though \w+ delegate "
                        r"is explicitly applied, the model graph will not be executed by the delegate)\.?\s*$",
                        re.MULTILINE)
ERROR_LINE = re.compile(r"\b(ERROR|FATAL|Failed|failed|Killed|Aborted)\b")
PLAIN_NAME = re.compile(r"[^,:\s]+")
OOM = ("out of memory", "cannot allocate memory", "std::bad_alloc", "failed to allocate memory")
KILLED = 137  # the shell's status of a process killed by SIGKILL: on a phone, most often the low-memory killer
NOT_FOUND, NOT_EXECUTABLE = 127, 126
MEAN_NOTE = "benchmark_model reports no percentiles; p50_ms holds the mean"


class _Failure(Exception):
    """A measurement step that failed; becomes the outcome's status and message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------------------- public API

def measure_adb(path: Path, adb: "ADBConnection", *, threads: Optional[int] = None, warmup: int = 20,
                runs: int = 200, delegate: Optional[str] = None, timeout_s: Optional[float] = None) -> RemoteOutcome:
    """Latency of the .tflite at `path` on the phone `adb` names, timed there by benchmark_model on its own
    random input with `delegate` (default: the connection's primary one). The device facts (Android
    version, SoC, model, ABI) come from `getprop`. Problems come back as a status and message; only invalid
    arguments raise ValueError."""
    delegate = _check_args(path, adb, threads, delegate, warmup=warmup, runs=runs)
    path = Path(path)
    if not path.is_file():
        return RemoteOutcome("failed", f"artifact not found: {path}")
    phone = _Phone(adb, timeout_s)
    facts: dict = {}
    try:
        facts = phone.facts()
        with phone.workdir() as tmp:
            phone.push(path, f"{tmp}/model.tflite")
            flags = benchmark_flags(threads=threads, warmup=warmup, runs=runs, delegate=delegate)
            out = phone.run_benchmark([adb.benchmark_model, f"--graph={tmp}/model.tflite", *flags])
    except _Failure as failure:
        return RemoteOutcome(failure.status, phone.noted(failure.message), device_facts=facts)
    try:
        latency = parse_benchmark_output(out)
    except ValueError as exc:
        return RemoteOutcome("failed", phone.noted(f"on {phone.label}: {exc}"), device_facts=facts)
    latency.update(threads=latency["threads"] or threads, source="measured-remote", host=phone.host,
                   delegate=delegate, input="benchmark_model's own random input",
                   method=f"benchmark_model on the phone ({' '.join(flags)})")
    return RemoteOutcome("ok", phone.noted(""), latency, facts)


def evaluate_adb(path: Path, inputs: np.ndarray, adb: "ADBConnection", *, threads: Optional[int] = None,
                 delegate: Optional[str] = None, timeout_s: Optional[float] = None) -> EvalOutcome:
    """The logits (N, classes) float32 of the packed images `inputs` run through the .tflite at `path` on the
    phone: benchmark_model reads each image from a raw file and dumps the outputs (`--input_layer_value_files`,
    `--output_filepath`), one run per image; int8 outputs are dequantized here with the model's own scale and
    zero point. `inputs` holds the model's input tensors as they are fed (its dtype and layout, int8 already
    quantized), one per image: shape (N, *input_shape[1:]). Problems come back as a status and message;
    invalid arguments raise ValueError."""
    delegate = _check_args(path, adb, threads, delegate)
    path = Path(path)
    if not path.is_file():
        return EvalOutcome("failed", f"artifact not found: {path}")
    try:
        io = _model_io(path)
    except _Failure as failure:
        return EvalOutcome(failure.status, failure.message)
    inputs = _check_inputs(inputs, io)
    phone = _Phone(adb, timeout_s)
    facts: dict = {}
    flags = benchmark_flags(threads=threads, warmup=0, runs=1, delegate=delegate)
    try:
        facts = phone.facts()
        with tempfile.TemporaryDirectory(prefix="rescompress-adb-") as work:
            local_in = Path(work) / "in"
            local_in.mkdir()
            for i in range(len(inputs)):
                (local_in / f"{i}.bin").write_bytes(np.ascontiguousarray(inputs[i:i + 1]).tobytes())
            with phone.workdir() as tmp:
                phone.push(path, f"{tmp}/model.tflite")
                phone.push(local_in, f"{tmp}/in")  # a folder pushed to a path that does not exist becomes it
                name = io["name"] if PLAIN_NAME.fullmatch(io["name"]) else "input"
                argv = [adb.benchmark_model, f"--graph={tmp}/model.tflite", *flags, f"--input_layer={name}",
                        "--input_layer_shape=" + ",".join(str(d) for d in io["shape"])]
                phone.run_images(argv, name, tmp, len(inputs))
                phone.pull(f"{tmp}/out.bin", Path(work) / "out.bin")
            raw = (Path(work) / "out.bin").read_bytes()
    except _Failure as failure:
        return EvalOutcome(failure.status, phone.noted(failure.message), device_facts=facts)
    per_image = io["output_bytes"]
    if len(raw) != per_image * len(inputs):
        return EvalOutcome("failed", phone.noted(f"benchmark_model on {phone.label} wrote {len(raw)} bytes of "
                                                 f"outputs for {len(inputs)} images; expected {per_image} per image"),
                           device_facts=facts)
    out = np.frombuffer(raw, np.uint8).reshape(len(inputs), per_image)[:, :io["first_bytes"]]
    y = np.ascontiguousarray(out).view(io["out_dtype"]).reshape(len(inputs), -1)
    scale, zero_point = io["out_quant"]
    logits = (y.astype(np.float32) - zero_point) * scale if scale else y.astype(np.float32)
    method = (f"benchmark_model on the phone {phone.host}, one run per image ({' '.join(flags)}), raw inputs via "
              "--input_layer_value_files, outputs via --output_filepath")
    method += ", dequantized on the host" if scale else ""
    return EvalOutcome("ok", phone.noted(""), logits=logits.astype(np.float32), method=method, device_facts=facts)


def benchmark_flags(*, threads: Optional[int], warmup: int, runs: int, delegate: str) -> list[str]:
    """benchmark_model's flags for `runs` timed runs after `warmup` ones, exactly those counts."""
    flags = [f"--num_threads={threads}"] if threads is not None else []
    return flags + [f"--warmup_runs={warmup}", "--warmup_min_secs=0", f"--num_runs={runs}", "--min_secs=0",
                    DELEGATE_FLAGS[delegate]]


def parse_benchmark_output(text: str) -> dict:
    """benchmark_model's log as LatencyStats-style keys in milliseconds (p50_ms is the median where the build
    prints one, else the mean, as `statistic` says); ValueError when it holds no timings."""
    phases = _phase_stats(text)
    timings = TIMINGS.search(text)
    if not phases and timings is None:
        raise ValueError(f"benchmark_model printed no timings ({_tail(text) or 'no output'})")
    timed = phases[-1] if phases else {}
    warm = phases[-2] if len(phases) >= 2 else {}
    mean_us = timed.get("avg", float(timings.group(4)) if timings else None)
    if not timed.get("count") and timings is None:
        raise ValueError(f"benchmark_model made no timed run ({_tail(text)})")
    median = timed.get("median")
    latency = {"p50_ms": _ms(median if median is not None else mean_us), "p90_ms": None, "p99_ms": None,
               "mean_ms": _ms(mean_us), "min_ms": _ms(timed.get("min")), "max_ms": _ms(timed.get("max")),
               "std_ms": _ms(timed.get("std")), "batch": 1,
               "warmup": int(warm["count"]) if "count" in warm else None,
               "runs": int(timed["count"]) if "count" in timed else None,
               "threads": _threads_used(text), "statistic": "p50" if median is not None else "mean",
               "runtime_version": None}
    notes = [] if median is not None else [MEAN_NOTE]
    notes += [m.group(1) for m in DELEGATION.finditer(text)]
    if notes:
        latency["note"] = "; ".join(notes)
    return latency


# ------------------------------------------------------------------------------------------ arguments

def _check_args(path: Path, adb: "ADBConnection", threads: Optional[int], delegate: Optional[str], *,
                warmup: int = 0, runs: int = 1) -> str:
    """The delegate to use; ValueError for arguments that cannot be measured with."""
    if Path(path).suffix.lower() != ".tflite":
        raise ValueError(f"benchmark_model runs .tflite files, got {Path(path).name}")
    if runs < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(f"need runs >= 1, warmup >= 0, threads >= 1 or None; got runs={runs}, warmup={warmup}, "
                         f"threads={threads}")
    delegate = delegate or adb.delegate
    if delegate not in DELEGATE_FLAGS:
        raise ValueError(f"delegate must be one of {', '.join(DELEGATE_FLAGS)}, got '{delegate}'")
    return delegate


def _model_io(path: Path) -> dict:
    """The model's input (name, shape, dtype) and outputs (first output's dtype, quantization and bytes, all
    outputs' bytes per image), read on the host with LiteRT."""
    from rescompress.errors import BackendMissingError
    from rescompress.export.tflite import litert_interpreter

    try:
        it = litert_interpreter(path, delegates=False)
    except BackendMissingError as exc:
        raise _Failure("failed", f"reading the model's input and output tensors on this host: {exc}") from None
    except (ValueError, RuntimeError) as exc:  # LiteRT's errors for a file that is not a model it can load
        raise _Failure("failed", f"{path.name} is not a .tflite model LiteRT can load ({exc})") from None
    inputs, outputs = it.get_input_details(), it.get_output_details()
    if len(inputs) != 1:
        raise _Failure("failed", f"{path.name} has {len(inputs)} inputs; evaluating images needs exactly one")
    sizes = [int(np.prod(o["shape"])) * np.dtype(o["dtype"]).itemsize for o in outputs]
    return {"name": inputs[0]["name"], "shape": tuple(int(d) for d in inputs[0]["shape"]),
            "dtype": np.dtype(inputs[0]["dtype"]), "out_dtype": np.dtype(outputs[0]["dtype"]),
            "out_quant": tuple(outputs[0]["quantization"]), "first_bytes": sizes[0], "output_bytes": sum(sizes)}


def _check_inputs(inputs: np.ndarray, io: dict) -> np.ndarray:
    inputs = np.asarray(inputs)
    shape = io["shape"]
    if inputs.ndim != len(shape) or tuple(inputs.shape[1:]) != shape[1:] or len(inputs) == 0:
        raise ValueError(f"inputs must be (N, {', '.join(str(d) for d in shape[1:])}) with N >= 1, as the model's "
                         f"input {shape} takes them; got {inputs.shape}")
    if inputs.dtype != io["dtype"]:
        raise ValueError(f"inputs must be {io['dtype']}, the model's input type (int8 already quantized); got "
                         f"{inputs.dtype}")
    return inputs


# ----------------------------------------------------------------------------------------------- adb

class _Phone:
    """adb calls to one phone, sharing one deadline."""

    def __init__(self, adb: "ADBConnection", timeout_s: Optional[float]) -> None:
        self.adb = adb
        self.budget = timeout_s if timeout_s is not None else adb.timeout_s
        self.deadline = time.monotonic() + self.budget
        self.label = f"phone {adb.serial}"
        self.host = f"adb:{adb.serial}"
        self.cleanup_error = ""  # set when a temporary directory could not be removed

    def noted(self, message: str) -> str:
        """`message`, with the cleanup problem after it when there was one."""
        return "; ".join(m for m in (message, self.cleanup_error) if m)

    def call(self, *args: str, timeout_s: Optional[float] = None) -> subprocess.CompletedProcess:
        """`adb -s SERIAL args...`; a _Failure when adb is missing, the phone is not there or time ran out."""
        timeout = timeout_s if timeout_s is not None else self.deadline - time.monotonic()
        if timeout <= 0:
            raise self._timeout()
        argv = [self.adb.adb, "-s", self.adb.serial, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise self._timeout() from None
        except OSError as exc:  # the executable itself: missing, or not executable
            raise _Failure("failed", f"cannot run adb ({self.adb.adb}: {exc.strerror or exc}); install it "
                                     "(apt-get install adb, or Android's platform-tools) or set "
                                     "connection.adb.adb to its path") from None
        if EXIT_MARK not in (proc.stdout or ""):
            self._connection_problem(proc)
        return proc

    def shell(self, words: list[str], timeout_s: Optional[float] = None) -> tuple[int, str]:
        """(exit status, stdout and stderr) of `words` run by the phone's shell."""
        return self.shell_line(" ".join(shlex.quote(w) for w in words), timeout_s)

    def shell_line(self, line: str, timeout_s: Optional[float] = None) -> tuple[int, str]:
        proc = self.call("shell", f"{line}; echo {EXIT_MARK}$?", timeout_s=timeout_s)
        out = proc.stdout or ""
        marks = re.findall(rf"{EXIT_MARK}(\d+)", out)
        status = int(marks[-1]) if marks else None
        text = re.sub(rf"{EXIT_MARK}\d+\s*", "\n", out) + (proc.stderr or "")
        if status is None:
            raise _Failure("failed", f"adb shell on {self.label} ended without the command's exit status "
                                     f"({_tail(text) or f'exit status {proc.returncode}'})")
        return status, text

    def facts(self) -> dict:
        """What the phone says about itself (`getprop`); also the first contact."""
        status, text = self.shell(["getprop"])
        props = {m.group(1): m.group(2) for m in map(PROP.match, text.splitlines()) if m}
        if status != 0 or not props:
            raise _Failure("failed", f"getprop on {self.label} printed no properties ({_tail(text)})")
        soc = " ".join(p for p in (props.get("ro.soc.manufacturer"), props.get("ro.soc.model")) if p)
        soc = soc or props.get("ro.board.platform") or props.get("ro.product.board") or None
        return {"android_version": props.get("ro.build.version.release"), "sdk": props.get("ro.build.version.sdk"),
                "model": props.get("ro.product.model"), "soc": soc, "machine": props.get("ro.product.cpu.abi"),
                "runtime": "tflite", "runtime_version": None}

    def workdir(self) -> "_Workdir":
        return _Workdir(self)

    def push(self, local: Path, remote: str) -> None:
        proc = self.call("push", str(local), remote)
        if proc.returncode != 0:
            raise _Failure("failed", f"could not copy {local.name} to {self.label}:{remote} ({_tail(proc.stderr)}); "
                                     "is the phone's storage full, or connection.adb.workdir not writable?")

    def pull(self, remote: str, local: Path) -> None:
        proc = self.call("pull", remote, str(local))
        if proc.returncode != 0 or not local.is_file():
            raise _Failure("failed", f"could not copy {remote} back from {self.label} ({_tail(proc.stderr)})")

    def run_benchmark(self, argv: list[str]) -> str:
        """Run benchmark_model; its log, or a _Failure saying why it did not run through."""
        status, text = self.shell(argv)
        if status != 0:
            raise self._benchmark_failure(status, text)
        return text

    def run_images(self, argv: list[str], name: str, tmp: str, n: int) -> None:
        """Run benchmark_model once per image `tmp/in/I.bin` (0 <= I < n) in one shell loop, appending each
        output dump to `tmp/out.bin`; a _Failure naming the first image that failed."""
        q = shlex.quote
        run = " ".join(q(w) for w in argv)
        one, log, out = q(f"{tmp}/o.bin"), q(f"{tmp}/log.txt"), q(f"{tmp}/out.bin")
        files = f"{q(f'--input_layer_value_files={name}:{tmp}/in/')}\"$i\".bin --output_filepath={one}"
        line = (f"rm -f {out}; i=0; while [ \"$i\" -lt {n} ]; do "
                f"rm -f {one}; {run} {files} > {log} 2>&1; s=$?; "
                f"if [ \"$s\" -ne 0 ]; then cat {log}; echo {IMAGE_MARK}$i; exit $s; fi; "
                f"if [ ! -f {one} ]; then cat {log}; echo {NO_OUTPUT_MARK}; exit 0; fi; "
                f"cat {one} >> {out} || exit $?; i=$((i+1)); done")
        status, text = self.shell_line(f"( {line} )")
        if NO_OUTPUT_MARK in text:
            raise _Failure("failed", f"benchmark_model on {self.label} wrote no --output_filepath file"
                                     + (" (it does not know the flag: push a newer build)"
                                        if "Unconsumed cmdline flags" in text else "") + f" ({_tail(text)})")
        if status != 0:
            image = re.search(rf"{IMAGE_MARK}(\d+)", text)
            failure = self._benchmark_failure(status, re.sub(rf"{IMAGE_MARK}\d+\s*", "", text))
            if image:
                failure.message += f" (on image {image.group(1)} of {n})"
            raise failure

    # ------------------------------------------------------------------------------- classification

    def _timeout(self) -> _Failure:
        return _Failure("timeout", f"the measurement on {self.label} did not finish within {self.budget:g} s; raise "
                                   "connection.adb.timeout_s, or lower runs")

    def _connection_problem(self, proc: subprocess.CompletedProcess) -> None:
        """A _Failure for adb's own errors: no such phone, offline, not authorized, no server."""
        err = (proc.stderr or "") + (proc.stdout or "")
        low = err.lower()
        serial = self.adb.serial
        if ("not found" in low and f"'{serial.lower()}'" in low) or "no devices/emulators found" in low:
            raise _Failure("unreachable", f"adb sees no phone with serial {serial} (`adb devices` lists those it "
                                          "sees): is it plugged in with USB debugging on, or connected with "
                                          "`adb connect HOST:PORT`? Check connection.adb.serial")
        if "unauthorized" in low:
            raise _Failure("unreachable", f"{self.label} has not authorized this computer: unlock it and accept the "
                                          "'Allow USB debugging?' prompt, then run again")
        if "offline" in low:
            raise _Failure("unreachable", f"{self.label} is offline to adb: reconnect the cable (or run "
                                          "`adb reconnect`) and check `adb devices`")
        if "cannot connect to daemon" in low or "failed to start daemon" in low:
            raise _Failure("failed", f"the adb server on this machine did not start ({_tail(err)}); run "
                                     "`adb start-server` to see why")
        if "error: closed" in low or "connection reset" in low or "protocol fault" in low:
            raise _Failure("unreachable", f"adb lost {self.label} ({_tail(err)}); is it still connected?")

    def _benchmark_failure(self, status: int, text: str) -> _Failure:
        binary = self.adb.benchmark_model
        serial = self.adb.serial
        if status == NOT_FOUND or (status != 0 and binary in text and re.search(r"not found|No such file", text)):
            return _Failure("runtime-missing", f"benchmark_model is not at {binary} on {self.label}: build it "
                                               "(bazel build -c opt --config=android_arm64 "
                                               "tensorflow/lite/tools/benchmark:benchmark_model) or download "
                                               "TFLite's prebuilt android_aarch64_benchmark_model, then "
                                               f"`adb -s {serial} push benchmark_model {binary}` and "
                                               f"`adb -s {serial} shell chmod +x {binary}` (or set "
                                               "connection.adb.benchmark_model)")
        if status == NOT_EXECUTABLE:
            return _Failure("runtime-missing", f"{binary} on {self.label} cannot be executed ({_tail(text)}); run "
                                               f"`adb -s {serial} shell chmod +x {binary}`")
        low = text.lower()
        if status == KILLED or any(k in low for k in OOM):
            return _Failure("out-of-memory", f"benchmark_model ran out of memory on {self.label} (exit status "
                                             f"{status}): {_error_lines(text)}")
        hint = ("; the delegate does not take this model: measure with another one (connection.adb.delegates)"
                if re.search(r"Failed to apply \w+ delegate", text) else "")
        return _Failure("failed", f"benchmark_model failed on {self.label} (exit status {status}): "
                                  f"{_error_lines(text)}{hint}")


class _Workdir:
    """A fresh `rescompress-XXXXXXXX` directory under the connection's workdir, always removed at the end (a
    failure to remove it is noted in the outcome's message, as the ssh path does)."""

    def __init__(self, phone: _Phone) -> None:
        self.phone = phone
        self.path = f"{phone.adb.workdir.rstrip('/')}/rescompress-{secrets.token_hex(4)}"

    def __enter__(self) -> str:
        status, text = self.phone.shell(["mkdir", "-p", self.path])
        if status != 0:
            raise _Failure("failed", f"could not make {self.path} on {self.phone.label} ({_tail(text)}); set "
                                     "connection.adb.workdir to a writable directory (/data/local/tmp is)")
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            status, text = self.phone.shell(["rm", "-rf", self.path], timeout_s=CLEANUP_TIMEOUT_S)
        except _Failure as failure:
            status, text = 1, failure.message
        if status != 0:
            self.phone.cleanup_error = f"could not remove {self.path} on {self.phone.label}: {_tail(text)}"


# ------------------------------------------------------------------------------------------- parsing

def _phase_stats(text: str) -> list[dict]:
    """The stat line of each `Running benchmark for at least ...` phase (warm-up, then timed runs), in us."""
    phases: list[dict] = []
    expecting = False
    for line in text.splitlines():
        if "Running benchmark for at least" in line:
            expecting = True
            continue
        if expecting and "count=" in line:
            fields = {k: float(v) for k, v in STAT_FIELD.findall(line)}
            if "avg" not in fields and "curr" in fields:  # every run took the same time
                fields.update(min=fields["curr"], max=fields["curr"], avg=fields["curr"], std=0.0)
            phases.append(fields)
            expecting = False
    return phases


def _threads_used(text: str) -> Optional[int]:
    m = THREADS_USED.search(text)
    return int(m.group(1)) if m else None


def _ms(us: Optional[float]) -> Optional[float]:
    return None if us is None else float(us) / 1000.0


def _error_lines(text: str, n: int = 3) -> str:
    """The last `n` lines that report an error (ERROR:, FATAL:, "Failed ..."), else the last `n` lines."""
    errors = "\n".join(ln for ln in text.splitlines() if ERROR_LINE.search(ln))
    return _tail(errors or text, n)


def _tail(text: Optional[str], n: int = 1) -> str:
    """The last `n` non-empty lines of `text`, joined."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])
