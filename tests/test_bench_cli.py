"""`rescompress bench`: one file's latency on a device, here or over ssh; bad input is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rescompress.bench.latency import HOST_METHOD, RANDOM_INPUT, TEST_IMAGES
from rescompress.cli import app
from tests.conftest import TINY_RECIPE, write_recipe
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
    assert lat["method"] == HOST_METHOD and lat["input"] == RANDOM_INPUT, "a file alone is timed on random input"
    assert lat["runtime"].startswith("onnxruntime ")
    table = bench(str(onnx_model), *FAST)
    assert table.exit_code == 0 and "p50 ms" in table.output and "measured" in table.output
    assert "random" in table.output and HOST_METHOD in " ".join(table.output.split())


def test_bench_here_on_given_images(onnx_model, tmp_path):
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(1).random((3, 3, 16, 16), dtype=np.float32))
    out = json.loads(bench(str(onnx_model), "--input", str(images), "--batch", "2", *FAST, "--json").output)
    assert out["status"] == "ok" and out["latency"]["input"] == "images from images.npy"
    assert out["latency"]["batch"] == 2
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 1, 8, 8), np.float32))
    result = bench(str(onnx_model), "--input", str(wrong), *FAST)
    assert result.exit_code == 2
    assert "the model takes preprocessed images of shape (N, 3, 16, 16)" in " ".join(result.output.split())


@pytest.mark.slow
def test_run_and_bench_time_on_this_host_by_the_same_function(tmp_path):
    """The figure `rescompress run` reports for host-cpu and the one `rescompress bench` gives for the same
    file come from one function: the same method label, runtime and keys; only the input says which is which."""
    from rich.console import Console

    from rescompress.data import load_dataset
    from rescompress.pipeline import execute, prepare_new

    plan, run_dir, manifest = prepare_new(write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE), tmp_path / "runs")
    report = execute(plan, run_dir, manifest, Console(quiet=True))
    (host,) = report["devices"]
    ran = next(r["latency"] for r in host["results"] if r["artifact"] == "onnx-fp32")
    data = load_dataset("digits", limit_train=400, seed=0)
    images = tmp_path / "test.npy"
    np.save(images, data.input_spec.normalize_numpy(data.test.images[:4].numpy()))
    out = bench(str(run_dir / "artifacts" / "onnx-fp32.onnx"), "--device", "host-cpu", "--input", str(images),
                "--warmup", "2", "--runs", "10", "--json")
    assert out.exit_code == 0, out.output
    benched = json.loads(out.output)["latency"]
    assert ran["method"] == benched["method"] == HOST_METHOD
    assert ran["source"] == benched["source"] == "measured" and ran["runtime"] == benched["runtime"]
    assert set(ran) == set(benched)
    assert (ran["input"], benched["input"]) == (TEST_IMAGES, "images from test.npy")
    assert (ran["batch"], ran["warmup"], ran["runs"]) == (benched["batch"], benched["warmup"], benched["runs"])


def test_an_option_in_the_host_is_refused_before_ssh_runs(onnx_model, tmp_path):
    marker = tmp_path / "pwned"
    result = bench(str(onnx_model), "--host", f"-oProxyCommand=touch {marker}@h", *FAST)
    assert result.exit_code == 2, result.output
    assert "invalid ssh user '-oProxyCommand=touch" in result.output and "in --host" in result.output
    assert not list(tmp_path.glob("pwned*")), "the ProxyCommand ran"
    result = bench(str(onnx_model), "--host", "me@-oProxyCommand=x", *FAST)
    assert result.exit_code == 2 and "invalid ssh host '-oProxyCommand=x' in --host" in result.output


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


def test_an_option_in_the_profile_user_is_refused_before_ssh_runs(onnx_model, tmp_path):
    import yaml

    marker = tmp_path / "pwned"
    profile = tmp_path / "board.yaml"
    profile.write_text(yaml.safe_dump({"name": "board", "runtimes": ["onnxruntime"], "connection": {
        "ssh": {"host": "127.0.0.1", "user": f"-oProxyCommand=touch {marker}"}}}), encoding="utf-8")
    result = bench(str(onnx_model), "--device", str(profile), *FAST)
    assert result.exit_code == 2, result.output
    assert "invalid ssh user '-oProxyCommand=touch" in " ".join(result.output.split())
    assert not list(tmp_path.glob("pwned*")), "the ProxyCommand ran"
