"""A stand-in `trtexec` for the device-side TensorRT paths (a real one needs an NVIDIA GPU and TensorRT).

It is NOT an engine builder: its "engine" file is the ONNX behind a header that says so, and it answers from
onnxruntime on that ONNX (graph optimisations off, as the host's proxy runs it). What it checks is the command
lines rescompress sends: every flag must be one trtexec has, a build needs --onnx and --saveEngine, an
evaluation's batch must lie within the build's --maxShapes, and --loadInputs must hold exactly that many images.
Each call is appended to a JSON-lines log. Its output imitates trtexec 10's: the banner, the device section
("Selected Device: ..."), the performance summary, and --exportOutput's JSON layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

HEADER = b"FAKE-TRT-ENGINE (an ONNX file behind this line; not a TensorRT engine)\n"
GPU = "Orin (fake)"
VERSION = "10.3.0"

SCRIPT = r'''#!{python}
import json, os, re, sys
import numpy as np

LOG = {log!r}
HEADER = {header!r}
OOM = {oom!r}
KNOWN = ("--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--stronglyTyped", "--fp16",
         "--memPoolSize", "--loadEngine", "--shapes", "--warmUp", "--iterations", "--duration", "--loadInputs",
         "--exportOutput")
BANNER = ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b17] # trtexec\n"
          "[I] TensorRT version: {version}\n[I] === Device Information ===\n[I] Available Devices:\n"
          "[I]   Device 0: \"{gpu}\"\n[I] Selected Device: {gpu}\n")
SUMMARY = ("[I] === Performance summary ===\n"
           "[I] GPU Compute Time: min = 0.776245 ms, max = 1.37524 ms, mean = 0.78784 ms, median = 0.779297 ms, "
           "percentile(90%) = 0.804688 ms, percentile(95%) = 0.824219 ms, percentile(99%) = 1.00098 ms\n")


def fail(message):
    sys.stdout.write(BANNER + "[E] " + message + "\n&&&& FAILED TensorRT.trtexec\n")
    sys.exit(1)


args = {{}}
flags = []
for a in sys.argv[1:]:
    flag, _, value = a.partition("=")
    if flag not in KNOWN:
        fail("Unknown option: " + flag)
    args[flag] = value
    flags.append(flag)
with open(LOG, "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "cwd": os.getcwd()}}) + "\n")
if OOM:
    fail("Error[2]: [virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory (no further information)")


def shape(spec):
    name, _, dims = spec.rpartition(":")
    return name, [int(d) for d in dims.split("x")]


if "--onnx" in args:
    if "--saveEngine" not in args:
        fail("a build without --saveEngine")
    onnx_bytes = open(args["--onnx"], "rb").read()
    meta = {{"max": shape(args["--maxShapes"])[1] if "--maxShapes" in args else None}}
    with open(args["--saveEngine"], "wb") as f:
        f.write(HEADER + (json.dumps(meta) + "\n").encode() + onnx_bytes)
    sys.stdout.write(BANNER + "[I] Engine built in 1.0 sec.\n&&&& PASSED TensorRT.trtexec\n")
    sys.exit(0)

if "--loadEngine" not in args:
    fail("neither --onnx nor --loadEngine")
blob = open(args["--loadEngine"], "rb").read()
if not blob.startswith(HEADER):
    fail("Error[1]: the engine plan file is not compatible with this version of TensorRT")
meta_line, onnx_bytes = blob[len(HEADER):].split(b"\n", 1)
meta = json.loads(meta_line)
if "--loadInputs" not in args:  # timing
    sys.stdout.write(BANNER + SUMMARY + "&&&& PASSED TensorRT.trtexec\n")
    sys.exit(0)

import onnxruntime as ort

if "--exportOutput" not in args:
    fail("--loadInputs without --exportOutput: nothing to read back")
name, dims = shape(args["--shapes"])
in_name, path = args["--loadInputs"].split(":", 1)
if in_name != name:
    fail("--loadInputs names " + in_name + ", --shapes names " + name)
if meta["max"] is not None and dims[0] > meta["max"][0]:
    fail("batch " + str(dims[0]) + " exceeds the profile's max " + str(meta["max"][0]))
x = np.fromfile(path, dtype=np.float32)
if x.size != int(np.prod(dims)):
    fail("input file holds " + str(x.size) + " values, --shapes asks for " + str(int(np.prod(dims))))
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
y = sess.run(None, {{name: x.reshape(dims)}})[0]
out_name = sess.get_outputs()[0].name
with open(args["--exportOutput"], "w") as f:
    f.write("[\n  {{ \"name\" : \"" + out_name + "\"\n  , \"dimensions\" : \"" + "x".join(map(str, y.shape)) + "\"\n"
            "  , \"values\" : [ " + ", ".join(repr(float(v)) for v in y.ravel()) + " ]\n  }}\n]\n")
sys.stdout.write(BANNER + SUMMARY + "&&&& PASSED TensorRT.trtexec\n")
'''


def fake_trtexec(tmp_path: Path, *, oom: bool = False) -> tuple[Path, Path]:
    """Write the fake into `tmp_path/bin/trtexec`; returns (its path, its call log). With `oom` every call fails
    as trtexec does when the device runs out of memory."""
    log = tmp_path / "trtexec-calls.jsonl"
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(SCRIPT.format(python=sys.executable, log=str(log), header=HEADER, oom=oom, version=VERSION,
                                 gpu=GPU))
    fake.chmod(0o755)
    return fake, log
