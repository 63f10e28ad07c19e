"""`rescompress bench`: one file's latency on a device, here or over ssh; bad input is one line and exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rescompress.cli import app
from tests.remote_device import onnx_model, sshd  # noqa: F401 (fixtures)

runner = CliRunner()
FAST = ["--warmup", "1", "--runs", "5"]


def bench(*args: str):
    return runner.invoke(app, ["bench", *args], catch_exceptions=False)


def test_bench_here(onnx_model):
    result = bench(str(onnx_model), "--device", "host-cpu", *FAST, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["status"] == "ok" and out["runtime"] == "onnxruntime" and out["precision"] == "fp32"
    lat = out["latency"]
    assert lat["source"] == "measured" and lat["runs"] == 5 and 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    table = bench(str(onnx_model), *FAST)
    assert table.exit_code == 0 and "p50 ms" in table.output and "measured" in table.output


def test_bench_over_ssh(onnx_model, sshd, tmp_path, monkeypatch):
    """--host with a device profile whose connection names the key and known_hosts of the test sshd."""
    import sys

    import yaml

    profile = tmp_path / "board.yaml"
    conn = sshd.connection(tmp_path)
    profile.write_text(yaml.safe_dump({
        "name": "board", "runtimes": ["onnxruntime"], "power_mode_command": "/bin/echo MAXN",
        "connection": {"ssh": {"host": "unused.invalid", "port": sshd.port, "key": conn.key,
                               "known_hosts": conn.known_hosts, "python": sys.executable,
                               "workdir": str(tmp_path)}}}), encoding="utf-8")
    result = bench(str(onnx_model), "--device", str(profile), "--host", f"{conn.user}@127.0.0.1", *FAST, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["latency"]["source"] == "measured-remote" and out["latency"]["power_mode"] == "MAXN"
    assert out["device_facts"]["runtime"] == "onnxruntime"
    # the profile's own host does not resolve: a status and exit 1, not a traceback
    result = bench(str(onnx_model), "--device", str(profile), *FAST)
    assert result.exit_code == 1 and "unreachable" in result.output


@pytest.mark.parametrize("args, match", [
    (["missing.onnx"], "artifact not found: missing.onnx"),
    (["{model}", "--device", "jetson-agx-orin"], "jetson-agx-orin has no connection to measure on: give --host"),
    (["{model}", "--device", "galaxy-s24"], r"galaxy-s24 does not run onnxruntime \(its runtimes: tflite\)"),
    (["{model}", "--runtime", "tflite"], r"cannot run on tflite"),
    (["{model}", "--device", "jetson-nanoo"], "unknown device 'jetson-nanoo'"),
    (["{garbage}"], r"garbage.onnx is not a readable ONNX file"),
])
def test_bench_bad_input(onnx_model, tmp_path, args, match):
    import re

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx protobuf" * 8)
    result = bench(*[a.format(model=onnx_model, garbage=garbage) for a in args])
    assert result.exit_code == 2
    assert re.search(match, " ".join(result.output.split())), result.output
