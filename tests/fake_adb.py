"""A fake Android phone for `rescompress.bench.adb`: a folder on this host, reached with a fake `adb`.

`install(root)` writes executables whose shebang is this Python:

- `root/host/adb`: records every command line (JSON lines in `root/adb-calls.jsonl`), answers for one serial
  (another one gets adb's `adb: device 'X' not found`, exit 1; the `state` setting makes the phone `offline`
  or `unauthorized`), copies files for `push` and `pull` as adb does (a folder pushed to a path that does not
  exist becomes that path), and runs `shell` lines with this host's /bin/sh in `root`, the phone's
  `system/bin` first on PATH: the quoting is parsed by a real POSIX shell, and the exit status comes back
  as with adb's shell protocol;
- `root/system/bin/getprop`: the `props` table, printed as Android's getprop prints it;
- `root/data/local/tmp/benchmark_model`: checks its flags as TFLite's benchmark_model does, prints the log a
  real one prints (`style` "modern": `INFO: ` prefixes and p5/median/p95 on the stat lines, as recent builds;
  "legacy": neither, and no `--output_filepath`, as older builds) with the deterministic run times of
  `run_times_us`, and, given `--input_layer_value_files` and `--output_filepath`, runs the model in LiteRT on
  the raw input file and writes the raw output tensors. The `fail` setting makes it fail as a real one
  does: "gpu" (`--use_gpu=true`: Failed to apply GPU delegate), "alloc" (Failed to allocate tensors), "oom"
  (killed by SIGKILL, as by the low-memory killer); `sleep_s` makes it slow.

Settings live in `root/phone.json` (`FakePhone.configure`); benchmark_model's parsed flags are logged in
`root/benchmark-calls.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SERIAL = "R5CX10FAKE"
PROPS = {"ro.build.version.release": "14", "ro.build.version.sdk": "34", "ro.product.model": "SM-S921B",
         "ro.product.manufacturer": "samsung", "ro.soc.manufacturer": "QTI", "ro.soc.model": "SM8650",
         "ro.board.platform": "pineapple", "ro.product.board": "pineapple", "ro.product.cpu.abi": "arm64-v8a"}
WARMUP_BASE_US, RUN_BASE_US = 9100, 8040
INIT_US = 3412


def run_times_us(n: int, base: int) -> list[int]:
    """The run times the fake benchmark_model reports: deterministic, the first run slower."""
    return [int(base * 1.4) if i == 0 else base + (i * 37) % 101 for i in range(n)]


def stat_line(values: list[int], percentiles: bool) -> str:
    """The line TFLite's `Stat`/`StatWithPercentiles::OutputToStream` prints for `values` (microseconds)."""
    if not values:
        text = "count=0"
    elif min(values) == max(values):
        text = f"count={len(values)} curr={values[-1]}" + ("(all same)" if len(values) > 1 else "")
    else:
        n = len(values)
        avg = sum(values) / n
        variance = int(sum(v * v for v in values) / n - avg * avg)  # ValueType (int64) in Stat
        text = (f"count={n} first={values[0]} curr={values[-1]} min={min(values)} max={max(values)} "
                f"avg={avg:g} std={int(math.sqrt(variance))}")
    if percentiles and values:
        ordered = sorted(values)
        text += " " + " ".join(f"{k}={ordered[len(ordered) * p // 100]}" for k, p in (("p5", 5), ("median", 50),
                                                                                      ("p95", 95)))
    return text


def expected_latency(warmup: int, runs: int, percentiles: bool) -> dict:
    """What the replayed log says, in milliseconds: what parsing it must give."""
    values = run_times_us(runs, RUN_BASE_US)
    ordered = sorted(values)
    n = len(values)
    avg = float(f"{sum(values) / n:g}")  # as printed: six significant digits
    variance = int(sum(v * v for v in values) / n - (sum(values) / n) ** 2) if min(values) != max(values) else 0
    std = int(math.sqrt(variance))
    return {"mean_ms": avg / 1000, "min_ms": min(values) / 1000, "max_ms": max(values) / 1000, "std_ms": std / 1000,
            "p50_ms": (ordered[n // 2] if percentiles else avg) / 1000, "runs": runs, "warmup": warmup}


# ---------------------------------------------------------------------------------------- the fixture

@dataclass
class FakePhone:
    root: Path
    serial: str = SERIAL

    @property
    def adb(self) -> Path:
        return self.root / "host" / "adb"

    @property
    def workdir(self) -> Path:
        return self.root / "data" / "local" / "tmp"

    @property
    def benchmark_model(self) -> Path:
        return self.workdir / "benchmark_model"

    def connection(self, **overrides):
        from rescompress.devices import ADBConnection

        fields = dict(serial=self.serial, adb=str(self.adb), workdir=str(self.workdir),
                      benchmark_model=str(self.benchmark_model), timeout_s=120)
        return ADBConnection(**{**fields, **overrides})

    def settings(self) -> dict:
        return json.loads((self.root / "phone.json").read_text())

    def configure(self, **changes) -> None:
        (self.root / "phone.json").write_text(json.dumps({**self.settings(), **changes}))

    def calls(self) -> list[list[str]]:
        """Every adb command line, in order (without the program name)."""
        log = self.root / "adb-calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    def benchmark_calls(self) -> list[dict]:
        """The flags of every benchmark_model run, parsed."""
        log = self.root / "benchmark-calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.workdir.glob("rescompress-*"))

    def remove_benchmark_model(self) -> None:
        self.benchmark_model.unlink()

    def break_rm(self) -> None:
        """The phone's `rm` fails from now on, as on a read-only or full storage."""
        rm = self.root / "system" / "bin" / "rm"
        rm.write_text("#!/bin/sh\necho \"rm: $2: Read-only file system\" >&2\nexit 1\n")
        rm.chmod(0o755)


def install(root: Path, *, serial: str = SERIAL) -> FakePhone:
    """A fake phone in `root`, with adb on the host and getprop and benchmark_model on the phone."""
    phone = FakePhone(Path(root), serial)
    for folder in ("host", "system/bin", "data/local/tmp"):
        (phone.root / folder).mkdir(parents=True, exist_ok=True)
    (phone.root / "phone.json").write_text(json.dumps({"serial": serial, "state": "device", "props": PROPS,
                                                        "style": "modern", "fail": None, "sleep_s": 0}))
    for role, path in (("adb", phone.adb), ("getprop", phone.root / "system" / "bin" / "getprop"),
                       ("benchmark_model", phone.benchmark_model)):
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                        f"import fake_adb\nsys.exit(fake_adb.main({role!r}, {str(phone.root)!r}, sys.argv[1:]))\n")
        path.chmod(0o755)
    return phone


def main(role: str, root: str, argv: list[str]) -> int:
    return {"adb": _adb, "getprop": _getprop, "benchmark_model": _benchmark_model}[role](Path(root), argv)


# ------------------------------------------------------------------------------------------------ adb

def _log(path: Path, record) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _adb(root: Path, argv: list[str]) -> int:
    _log(root / "adb-calls.jsonl", argv)
    cfg = json.loads((root / "phone.json").read_text())
    if len(argv) < 3 or argv[0] != "-s":
        print("adb: more than one device/emulator", file=sys.stderr)
        return 1
    serial, command, args = argv[1], argv[2], argv[3:]
    if serial != cfg["serial"]:
        print(f"adb: device '{serial}' not found", file=sys.stderr)
        return 1
    if cfg["state"] == "unauthorized":
        print("adb: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\nTry 'adb kill-server' if "
              "that seems wrong.\nOtherwise check for a confirmation dialog on your device.", file=sys.stderr)
        return 1
    if cfg["state"] == "offline":
        print("adb: device offline", file=sys.stderr)
        return 1
    if command == "push":
        return _copy(args, remote_source=False)
    if command == "pull":
        return _copy(args, remote_source=True)
    if command == "shell":
        env = {**os.environ, "PATH": f"{root / 'system' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        return subprocess.run(["/bin/sh", "-c", " ".join(args)], cwd=root, env=env).returncode
    print(f"adb: unknown command {command}", file=sys.stderr)
    return 1


def _copy(args: list[str], remote_source: bool) -> int:
    """push/pull SRC... DEST: into DEST when it is a folder; a folder copied to a path that does not exist
    becomes that path."""
    *sources, dest = args
    for src in map(Path, sources):
        if not src.exists():
            if remote_source:
                print(f"adb: error: failed to stat remote object '{src}': No such file or directory", file=sys.stderr)
            else:
                print(f"adb: error: cannot stat '{src}': No such file or directory", file=sys.stderr)
            return 1
        target = Path(dest) / src.name if Path(dest).is_dir() else Path(dest)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        print(f"{src}: 1 file {'pulled' if remote_source else 'pushed'}, 0 skipped.")
    return 0


def _getprop(root: Path, argv: list[str]) -> int:
    props = json.loads((root / "phone.json").read_text())["props"]
    if argv:
        print(props.get(argv[0], ""))
    else:
        for key in sorted(props):
            print(f"[{key}]: [{props[key]}]")
    return 0


# ------------------------------------------------------------------------------------ benchmark_model

KNOWN_FLAGS = {"graph", "num_threads", "warmup_runs", "warmup_min_secs", "num_runs", "min_secs", "max_secs",
               "use_xnnpack", "use_gpu", "use_nnapi", "input_layer", "input_layer_shape", "input_layer_value_files",
               "output_filepath"}


def _benchmark_model(root: Path, argv: list[str]) -> int:
    cfg = json.loads((root / "phone.json").read_text())
    modern = cfg["style"] == "modern"
    known = KNOWN_FLAGS if modern else KNOWN_FLAGS - {"output_filepath"}
    flags, unconsumed = {}, []
    for arg in argv:
        name, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and eq and name in known:
            flags[name] = value
        else:
            unconsumed.append(arg)
    _log(root / "benchmark-calls.jsonl", flags)
    prefix = "INFO: " if modern else ""

    def info(text: str = "") -> None:
        print(prefix + text, file=sys.stderr, flush=True)

    def error(text: str) -> None:
        print(("ERROR: " if modern else "") + text, file=sys.stderr, flush=True)

    info("STARTING!")
    if unconsumed:
        print(("WARN: " if modern else "") + "Unconsumed cmdline flags: " + " ".join(unconsumed), file=sys.stderr)
    if not flags.get("graph"):
        error("Please specify the name of your TF Lite input file with --graph")
        error("Benchmarking failed.")
        return 1
    threads = int(flags.get("num_threads", -1))
    warmup, runs = int(flags.get("warmup_runs", 1)), int(flags.get("num_runs", 50))
    delegate = next((d for d in ("gpu", "nnapi", "xnnpack") if flags.get(f"use_{d}") == "true"), None)
    info("Log parameter values verbosely: [0]")
    info(f"Min num runs: [{runs}]")
    if "min_secs" in flags:
        info(f"Min runs duration (seconds): [{flags['min_secs']}]")
    if threads > 0:
        info(f"Num threads: [{threads}]")
    info(f"Min warmup runs: [{warmup}]")
    info(f"Graph: [{flags['graph']}]")
    for name, label in (("input_layer", "Input layers"), ("input_layer_shape", "Input shapes"),
                        ("input_layer_value_files", "Input value files")):
        if name in flags:
            info(f"{label}: [{flags[name]}]")
    info(f"#threads used for CPU inference: [{threads}]")
    if delegate:
        info(f"Use {delegate}: [1]")
    if not Path(flags["graph"]).is_file():
        error(f"Failed to mmap model {flags['graph']}")
        error("Benchmarking failed.")
        return 1
    info(f"Loaded model {flags['graph']}")
    if cfg["fail"] == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=flags["graph"], num_threads=threads if threads > 0 else None)
    if delegate == "gpu":
        info("Created TensorFlow Lite delegate for GPU.")
        if cfg["fail"] == "gpu":
            error("Following operations are not supported by GPU delegate:\nFULLY_CONNECTED: Max version "
                  "supported: 9. Requested version 11.\nNo operations will run on the GPU, and all 1 operations "
                  "will run on the CPU.")
            error("Failed to apply GPU delegate.")
            error("Benchmarking failed.")
            return 1
    if delegate == "xnnpack":
        info("Created TensorFlow Lite XNNPACK delegate for CPU.")
    if delegate:
        info(f"Explicitly applied {delegate.upper()} delegate, and the model graph will be completely executed by "
             "the delegate.")
    if cfg["fail"] == "alloc":
        error("Failed to allocate tensors!")
        error("Benchmarking failed.")
        return 1
    it.allocate_tensors()
    detail = it.get_input_details()[0]
    if "input_layer_value_files" in flags:
        item = flags["input_layer_value_files"]
        name, _, file = item.partition(":")  # the names rescompress passes hold no ':'
        if name not in flags.get("input_layer", "").split(","):
            print(f"FATAL: Cannot find the corresponding input_layer name({name}) in --input_layer as "
                  f"{flags.get('input_layer', '')}", file=sys.stderr, flush=True)
            os.abort()
        shape = [int(d) for d in flags.get("input_layer_shape", "").split(",")]
        if shape != [int(d) for d in detail["shape"]]:
            it.resize_tensor_input(detail["index"], shape)
            it.allocate_tensors()
            detail = it.get_input_details()[0]
        import numpy as np

        data = Path(file).read_bytes() if Path(file).is_file() else None
        nbytes = int(np.prod(detail["shape"])) * np.dtype(detail["dtype"]).itemsize
        if data is None:
            print(f"FATAL: Failed to read the input_layer_value_file:{file}", file=sys.stderr, flush=True)
            os.abort()
        if len(data) != nbytes:
            print(f"FATAL: The size of {file} is {len(data)} bytes. It should be {nbytes} bytes.", file=sys.stderr,
                  flush=True)
            os.abort()
        if flags.get("input_layer") != detail["name"]:
            print(("WARN: " if modern else "") + f"Tensor # {detail['index']} is named {detail['name']} but flags "
                  f"call it {name}", file=sys.stderr)
        it.set_tensor(detail["index"], np.frombuffer(data, detail["dtype"]).reshape(detail["shape"]))
        it.invoke()
    info("The input model file size (MB): " + f"{Path(flags['graph']).stat().st_size / 1e6:g}")
    info(f"Initialized session in {INIT_US / 1e3:g}ms.")
    time.sleep(float(cfg.get("sleep_s") or 0))
    warm = run_times_us(warmup, WARMUP_BASE_US)
    timed = run_times_us(runs, RUN_BASE_US)
    for count, values, secs in ((warmup, warm, flags.get("warmup_min_secs", "0.5")),
                                (runs, timed, flags.get("min_secs", "1"))):
        info(f"Running benchmark for at least {count} iterations and at least {secs} seconds but terminate if "
             "exceeding 150 seconds.")
        info(stat_line(values, percentiles=modern) + "\n")
    if flags.get("output_filepath"):
        with open(flags["output_filepath"], "wb") as out:
            for o in it.get_output_details():
                out.write(it.get_tensor(o["index"]).tobytes())
    first = warm[0] if warm else 0
    warm_avg = f"{sum(warm) / len(warm):g}" if warm else "nan"
    info(f"Inference timings in us: Init: {INIT_US}, First inference: {first}, Warmup (avg): {warm_avg}, "
         f"Inference (avg): {sum(timed) / len(timed):g}")
    info("Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the "
         "actual memory footprint of the model at runtime. Take the information at your discretion.")
    info("Memory footprint delta from the start of the tool (MB): init=2.49219 overall=3.10547")
    return 0


if __name__ == "__main__":  # python fake_adb.py ROLE ROOT ARGS...
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
