#!/usr/bin/env python3
"""Measure one artifact's latency on this machine and print the result as one JSON line.

Standalone on purpose: rescompress copies this file to a device (over ssh) and runs it there, so it
imports only the standard library, numpy and the runtime it measures. It never imports rescompress.

    python3 remote_runner.py --artifact model.onnx --runtime onnxruntime --batch 1 --warmup 20 --runs 200 \
        [--threads N] [--power-mode-command 'nvpmodel -q']
    python3 remote_runner.py --artifact model.onnx --runtime tensorrt ... \
        --trtexec-build '["trtexec", "--onnx=model.onnx", ...]' --trtexec-time '["trtexec", "--loadEngine=...", ...]'

onnxruntime and LiteRT are fed seeded random data of the model's input shape. On TensorRT the runner runs
the trtexec commands it is given (rescompress builds them, the same way it writes a deferred export's build
command) in the folder holding the artifact: the build, when given, then the timing.

With `--eval-inputs FILE.npy --eval-output FILE.npy` it then runs every image of the array file (already
preprocessed on the host into exactly what the model's input takes: layout, dtype, int8 quantization) through
the artifact and saves the logits (float32, dequantized) in order; the result's "eval" says how that went.
On TensorRT each chunk of images goes through `--trtexec-eval`, a trtexec command that loads the chunk
(`--loadInputs`) and writes the outputs (`--exportOutput`) as JSON.

The last line on stdout is one JSON object. Exit status: 0 with {"status": "ok", ...}; 3 with
{"status": "runtime-missing", "message": ...} when the runtime (or numpy) is not installed; 4 with
{"status": "failed" (or "out-of-memory"), "message": ...} on any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional

RUNTIMES = ("onnxruntime", "tflite", "tensorrt")
EXIT_OK, EXIT_MISSING, EXIT_FAILED = 0, 3, 4
POWER_MODE_TIMEOUT_S = 10
SEED = 0
RANDOM_INPUT = f"random: seeded standard normal (seed {SEED})"
RUNNER_METHOD = "tools/remote_runner.py on the device: warm-up calls, then one timed call per run"


class RuntimeMissing(Exception):
    """The runtime (or numpy) is not installed here; the message says what to install."""


class RunFailed(Exception):
    """The measurement could not be made; the message says why."""


# ---------------------------------------------------------------------------------------------- helpers

def host_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def import_numpy():
    """numpy, or RuntimeMissing naming the package to install."""
    try:
        import numpy
    except ImportError:
        raise RuntimeMissing("numpy is not installed on this device (pip install numpy)") from None
    return numpy


def numpy_version() -> Optional[str]:
    """numpy's version, or None where it is not installed."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy.__version__


def power_mode(command: Optional[str]) -> Optional[str]:
    """The power-mode command's stripped output (at most 200 characters), or why it has none."""
    if not command:
        return None
    argv = shlex.split(command)
    if not argv:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=POWER_MODE_TIMEOUT_S)
    except FileNotFoundError:
        return f"unknown: {argv[0]} not found"
    except PermissionError:
        return f"unknown: {argv[0]} is not executable"
    except subprocess.TimeoutExpired:
        return f"unknown: '{command}' did not finish within {POWER_MODE_TIMEOUT_S} s"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()[:120]
        return f"unknown: '{command}' exited {done.returncode}" + (f": {why}" if why else "")
    return done.stdout.strip()[:200]


def time_calls(call: Callable[[], object], warmup: int, runs: int) -> dict:
    """Run `call` `warmup` times untimed, then `runs` timed calls; percentiles in milliseconds."""
    np = import_numpy()
    for _ in range(warmup):
        call()
    samples = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        call()
        samples[i] = (time.perf_counter_ns() - t0) / 1e6
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(samples.mean()), "min_ms": float(samples.min())}


def random_input(shape: list[int], dtype_name: str):
    """Seeded random data of `shape`: standard normal for floats, the full range for integers."""
    np = import_numpy()
    rng = np.random.default_rng(SEED)
    dtype = np.dtype(dtype_name)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise RunFailed(f"cannot make random input of dtype {dtype_name}")


# ----------------------------------------------------------------------------------------- onnxruntime

ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32",
               "tensor(int64)": "int64", "tensor(bool)": "bool"}


def onnx_input_shape(name: str, shape: list, batch: int) -> list[int]:
    """The input's shape with a symbolic batch dim replaced by `batch`; other symbolic dims fail."""
    dims = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif axis == 0:
            dims.append(batch)
        else:
            raise RunFailed(f"input '{name}' has a symbolic dimension '{dim}' at axis {axis}; "
                            "export the model with a fixed input size")
    if dims and dims[0] != batch:
        raise RunFailed(f"input '{name}' has a fixed batch of {dims[0]}, not {batch}; "
                        f"run with --batch {dims[0]} or export with a dynamic batch")
    return dims


def run_onnxruntime(args: argparse.Namespace, threads: int) -> dict:
    """Latency of one onnxruntime CPU session (no spinning threads), seeded random inputs."""
    import_numpy()
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeMissing("onnxruntime is not installed on this device (pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(args.artifact, sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        dtype = ONNX_DTYPES.get(inp.type)
        if dtype is None:
            raise RunFailed(f"input '{inp.name}' has type {inp.type}, which the runner cannot feed")
        feeds[inp.name] = random_input(onnx_input_shape(inp.name, list(inp.shape), args.batch), dtype)
    stats = time_calls(lambda: sess.run(None, feeds), args.warmup, args.runs)
    return {**stats, "runtime_version": ort.__version__, "input": RANDOM_INPUT, "method": RUNNER_METHOD}


# ---------------------------------------------------------------------------------------------- tflite

def tflite_interpreter_class():
    """The LiteRT interpreter class and its version: ai-edge-litert, tflite-runtime, then TensorFlow."""
    from importlib import metadata

    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert " + metadata.version("ai-edge-litert")
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime " + metadata.version("tflite-runtime")
    except ImportError:
        pass
    try:
        import tensorflow as tf
        return tf.lite.Interpreter, "tensorflow " + tf.__version__
    except ImportError:
        raise RuntimeMissing("the LiteRT interpreter is not installed on this device "
                             "(pip install ai-edge-litert; or tflite-runtime)") from None


def tflite_input(detail: dict):
    """Seeded random float32 data for one input, quantized with its scale/zero point if it is int8/uint8."""
    np = import_numpy()
    dtype = np.dtype(detail["dtype"])
    x = random_input(list(detail["shape"]), "float32")
    if dtype.kind in "iu":
        scale, zero_point = detail["quantization"]
        if not scale:
            return random_input(list(detail["shape"]), dtype.name)
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
    return np.ascontiguousarray(x, dtype=dtype)


def run_tflite(args: argparse.Namespace, threads: int) -> dict:
    """Latency of set-input + invoke + get-output in the LiteRT interpreter (its default delegate)."""
    import_numpy()
    interpreter_class, version = tflite_interpreter_class()
    try:
        it = interpreter_class(model_path=args.artifact, num_threads=threads)
    except (ValueError, RuntimeError) as exc:
        raise RunFailed(f"the LiteRT interpreter could not load {args.artifact}: {exc}") from None
    details = it.get_input_details()
    resized = False
    for d in details:
        if len(d["shape"]) and int(d["shape"][0]) != args.batch:
            it.resize_tensor_input(d["index"], [args.batch, *[int(s) for s in d["shape"][1:]]])
            resized = True
    it.allocate_tensors()
    if resized:
        details = it.get_input_details()
    inputs = [(d["index"], tflite_input(d)) for d in details]
    outputs = [d["index"] for d in it.get_output_details()]

    def call() -> None:
        for index, x in inputs:
            it.set_tensor(index, x)
        it.invoke()
        for index in outputs:
            it.get_tensor(index)

    return {**time_calls(call, args.warmup, args.runs), "runtime_version": version, "input": RANDOM_INPUT,
            "method": RUNNER_METHOD}


# -------------------------------------------------------------------------------------------- tensorrt

TRT_FIELDS = {"min": "min_ms", "mean": "mean_ms", "median": "p50_ms",
              "percentile(90%)": "p90_ms", "percentile(99%)": "p99_ms"}
TRT_WARMUP_MS = 200


def parse_trtexec(text: str) -> dict:
    """Latency fields (ms) from trtexec's "GPU Compute Time: min = ..., percentile(99%) = ..." line,
    plus runtime_version from its "TensorRT version" or "[TensorRT vNNNNNN]" banner."""
    line = next((ln for ln in text.splitlines() if "GPU Compute Time:" in ln), None)
    if line is None:
        raise RunFailed("trtexec printed no 'GPU Compute Time' line; its output ends with: "
                        + " | ".join(text.strip().splitlines()[-3:]))
    found = dict(re.findall(r"([\w()%]+) = ([-+0-9.eE]+) ms", line.split("GPU Compute Time:", 1)[1]))
    missing = [key for key in TRT_FIELDS if key not in found]
    if missing:
        raise RunFailed(f"trtexec's GPU Compute Time line lacks {', '.join(missing)}: {line.strip()}")
    out: dict = {field: float(found[key]) for key, field in TRT_FIELDS.items()}
    out["runtime_version"] = trtexec_version(text)
    return out


def trtexec_version(text: str) -> Optional[str]:
    """TensorRT's version as trtexec prints it ("10.3.0"), or None."""
    named = re.search(r"TensorRT version:\s*([0-9][0-9.]*)", text)
    if named:
        return named.group(1)
    banner = re.search(r"\[TensorRT v(\d{4,})\]", text)
    if banner is None:
        return None
    number = int(banner.group(1))  # TensorRT 10: 100300 -> 10.3.0; TensorRT 8: 8601 -> 8.6.1
    major, rest = divmod(number, 10000 if number >= 100000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def trtexec_gpu(text: str) -> Optional[str]:
    """The GPU trtexec ran on, from its "=== Device Information ===" section ("Selected Device: Orin"), or None."""
    found = re.search(r"Selected Device:\s*(.+)", text)
    return found.group(1).strip() if found else None


def trtexec_argv(text: Optional[str], flag: str) -> Optional[list[str]]:
    """A trtexec command given as a JSON list of strings, or None."""
    if text is None:
        return None
    try:
        argv = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFailed(f"{flag} is not JSON ({exc})") from None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise RunFailed(f"{flag} must be a non-empty JSON list of strings")
    return argv


def run_trtexec(argv: list[str], cwd: str, what: str) -> str:
    """Run one trtexec command in `cwd`; its stdout and stderr together."""
    trtexec = shutil.which(argv[0])
    if trtexec is None:
        raise RuntimeMissing(f"trtexec ('{argv[0]}') is not found on this device; install TensorRT "
                             "(JetPack: /usr/src/tensorrt/bin/trtexec) and set trtexec in the device profile")
    done = subprocess.run([trtexec, *argv[1:]], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
        raise RunFailed(f"{what} failed: trtexec exited {done.returncode}: {tail}")
    return done.stdout + "\n" + done.stderr


def run_tensorrt(args: argparse.Namespace, threads: int) -> dict:
    """Build the engine with the given command (for an ONNX), then time it; latency from trtexec's GPU
    compute time. Both commands run in the folder holding the artifact."""
    build = trtexec_argv(args.trtexec_build, "--trtexec-build")
    timing = trtexec_argv(args.trtexec_time, "--trtexec-time")
    cwd = os.path.dirname(os.path.abspath(args.artifact))
    notes, engine = [], None
    if build is not None:
        log = run_trtexec(build, cwd, "the engine build")
        saved = [a.split("=", 1)[1] for a in build if a.startswith("--saveEngine=")]
        if saved and not os.path.isfile(os.path.join(cwd, saved[-1])):
            raise RunFailed(f"the engine build wrote no {saved[-1]} (trtexec exited 0)")
        notes.append(f"engine built on the device with: {shlex.join(build)}")
        engine = {"file": saved[-1] if saved else None, "tensorrt_version": trtexec_version(log),
                  "gpu": trtexec_gpu(log), "build_command": shlex.join(build)}
    warmup = next((a for a in timing if a.startswith("--warmUp=")), None)
    if warmup:
        notes.append(f"trtexec warms up by time ({warmup} ms), not by count")
    timed = run_trtexec(timing, cwd, "timing the engine")
    return {**parse_trtexec(timed), "method": "trtexec GPU compute time", "gpu": trtexec_gpu(timed),
            "input": "random: trtexec's own input data", "note": "; ".join(notes),
            **({"engine": engine} if engine else {})}


# ------------------------------------------------------------------------------------------- evaluation

ORT_EVAL_BATCH = 64
OOM_WORDS = ("outofmemory", "cannotallocatememory", "bad_alloc", "failedtoallocate")  # matched without spaces


def eval_status(exc: BaseException) -> str:
    """"out-of-memory" for an allocation failure (MemoryError; "out of memory", trtexec's "OutOfMemory",
    "std::bad_alloc" in the message), "runtime-missing" for a missing runtime, else "failed"."""
    text = str(exc).lower().replace(" ", "")
    if isinstance(exc, MemoryError) or any(w in text for w in OOM_WORDS):
        return "out-of-memory"
    return "runtime-missing" if isinstance(exc, RuntimeMissing) else "failed"


def eval_onnxruntime(args: argparse.Namespace, threads: int, x) -> tuple:
    """Logits of every image in `x` from one onnxruntime CPU session, in chunks (one at a time for a model
    with a fixed batch of 1)."""
    np = import_numpy()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(args.artifact, sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    step = ORT_EVAL_BATCH if not (isinstance(inp.shape[0], int) and inp.shape[0] > 0) else inp.shape[0]
    outs = [sess.run(None, {inp.name: x[i:i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(outs).astype(np.float32), f"onnxruntime {ort.__version__} CPU, batches of {step}"


def eval_tflite(args: argparse.Namespace, threads: int, x) -> tuple:
    """Logits of every image in `x`, one invoke per image (the model's batch), the output dequantized with the
    model's own scale and zero point."""
    np = import_numpy()
    interpreter_class, version = tflite_interpreter_class()
    it = interpreter_class(model_path=args.artifact, num_threads=threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if np.dtype(inp["dtype"]) != x.dtype:
        raise RunFailed(f"the packed images are {x.dtype}, the model's input is {np.dtype(inp['dtype']).name}")
    scale, zero_point = out["quantization"]
    outs = []
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i:i + 1])
        it.invoke()
        y = it.get_tensor(out["index"]).astype(np.float32)
        outs.append((y - zero_point) * scale if scale else y)
    return np.concatenate(outs), f"{version}, one image per invoke"


def trtexec_outputs(path: str):
    """The first output tensor of trtexec's --exportOutput JSON, as float32 of its "dimensions"."""
    np = import_numpy()
    with open(path, encoding="utf-8") as f:
        outputs = json.load(f)
    if not outputs:
        raise RunFailed(f"trtexec's output file {os.path.basename(path)} lists no output tensor")
    first = outputs[0]
    dims = [int(d) for d in str(first["dimensions"]).split("x") if d]
    return np.asarray(first["values"], dtype=np.float32).reshape(dims)


def eval_tensorrt(args: argparse.Namespace, threads: int, x) -> tuple:
    """Logits of every image in `x` from the engine, in chunks of at most the profile's largest batch: each
    chunk is written as raw binary, loaded by trtexec (--loadInputs) and read back from --exportOutput."""
    np = import_numpy()
    spec = json.loads(args.trtexec_eval)
    template, max_batch = spec["argv"], int(spec["max_batch"])
    cwd = os.path.dirname(os.path.abspath(args.artifact))
    chunk_in, chunk_out = os.path.join(cwd, "eval_chunk.bin"), os.path.join(cwd, "eval_chunk.json")
    outs = []
    for i in range(0, len(x), max_batch):
        chunk = np.ascontiguousarray(x[i:i + max_batch])
        chunk.tofile(chunk_in)
        words = {"{batch}": str(len(chunk)), "{inputs}": os.path.basename(chunk_in),
                 "{outputs}": os.path.basename(chunk_out)}
        argv = [_fill(a, words) for a in template]
        run_trtexec(argv, cwd, f"evaluating images {i}..{i + len(chunk) - 1}")
        outs.append(trtexec_outputs(chunk_out).reshape(len(chunk), -1))
    for f in (chunk_in, chunk_out):
        if os.path.exists(f):
            os.remove(f)
    return np.concatenate(outs), f"trtexec --loadInputs/--exportOutput, batches of up to {max_batch}"


def _fill(word: str, values: dict) -> str:
    for key, value in values.items():
        word = word.replace(key, value)
    return word


EVALUATORS = {"onnxruntime": eval_onnxruntime, "tflite": eval_tflite, "tensorrt": eval_tensorrt}


def evaluate(args: argparse.Namespace, threads: int) -> dict:
    """Run the packed images through the artifact and save their logits; a status, never an exception."""
    np = import_numpy()
    try:
        x = np.load(args.eval_inputs, allow_pickle=False)
        t0 = time.perf_counter()
        logits, method = EVALUATORS[args.runtime](args, threads, x)
        if len(logits) != len(x):
            raise RunFailed(f"{len(logits)} outputs for {len(x)} images")
        np.save(args.eval_output, logits.astype(np.float32))
    except Exception as exc:  # reported as the evaluation's status; the latency stands on its own
        return {"status": eval_status(exc), "message": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "images": int(len(x)), "method": method, "seconds": round(time.perf_counter() - t0, 3)}


# ------------------------------------------------------------------------------------------------ main

RUNNERS = {"onnxruntime": run_onnxruntime, "tflite": run_tflite, "tensorrt": run_tensorrt}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="model file: .onnx, .tflite, .engine/.plan")
    p.add_argument("--runtime", required=True, choices=RUNTIMES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="default: the CPUs this process may use")
    p.add_argument("--power-mode-command", default=None, help="prints the power mode, e.g. 'nvpmodel -q'")
    p.add_argument("--trtexec-build", default=None, help="tensorrt: the engine build command, a JSON list")
    p.add_argument("--trtexec-time", default=None, help="tensorrt: the timing command, a JSON list")
    p.add_argument("--eval-inputs", default=None, help="a .npy of packed images to run through the artifact")
    p.add_argument("--eval-output", default=None, help="where their logits are saved (.npy)")
    p.add_argument("--trtexec-eval", default=None, help='tensorrt: {"argv": [...], "max_batch": N}, the argv '
                                                        "with {batch}, {inputs} and {outputs} to fill per chunk")
    args = p.parse_args(argv)
    if args.runtime == "tensorrt" and args.trtexec_time is None:
        p.error("--runtime tensorrt needs --trtexec-time")
    for name in ("batch", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--warmup must be >= 0 and --threads >= 1")
    if (args.eval_inputs is None) != (args.eval_output is None):
        p.error("--eval-inputs and --eval-output go together")
    if args.eval_inputs and args.runtime == "tensorrt" and args.trtexec_eval is None:
        p.error("--runtime tensorrt with --eval-inputs needs --trtexec-eval")
    return args


def measure(args: argparse.Namespace) -> dict:
    """The ok-result dict: latency, the runtime's version and the facts of this device."""
    if not os.path.isfile(args.artifact):
        raise RunFailed(f"artifact not found: {args.artifact}")
    threads = args.threads or host_threads()
    result = RUNNERS[args.runtime](args, threads)
    out = {"status": "ok", "runtime": args.runtime, **result, "batch": args.batch, "warmup": args.warmup,
           "runs": args.runs, "threads": threads, "python": platform.python_version(),
           "numpy": numpy_version(), "platform": platform.platform(), "machine": platform.machine(),
           "power_mode": power_mode(args.power_mode_command)}
    if args.eval_inputs:
        out["eval"] = evaluate(args, threads)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """Measure, print one JSON line, and return the exit status."""
    args = parse_args(argv)
    try:
        result, code = measure(args), EXIT_OK
    except RuntimeMissing as exc:
        result, code = {"status": "runtime-missing", "message": str(exc)}, EXIT_MISSING
    except RunFailed as exc:
        result, code = {"status": eval_status(exc), "message": str(exc)}, EXIT_FAILED
    except Exception as exc:  # the caller reads JSON, not a traceback: report it, traceback on stderr
        traceback.print_exc()
        result, code = {"status": eval_status(exc), "message": f"{type(exc).__name__}: {exc}"}, EXIT_FAILED
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
