"""The tensorrt target: a linted TensorRT-ready ONNX plus a deferred trtexec build where TensorRT or a GPU is
missing (every CI host), a failed artifact for a layout TensorRT would reject, and a real engine build where
both exist."""

from __future__ import annotations

import json
import shlex

import pytest
from pydantic import ValidationError

from rescompress.devices import DeviceProfile, load_device
from rescompress.export.lint import lint_file
from rescompress.export.tensorrt import TensorRTConfig, build_commands, export_tensorrt, tensorrt_available
from tests.remote_device import sshd  # noqa: F401 (fixture)
from tests.test_lint import example_input, int8_model
from tests.test_remote import calls_of, recording_trtexec

JETSONS = ("jetson-orin-nano", "jetson-agx-orin")
TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


def _export(model, data, cfg: TensorRTConfig, out_dir, devices=()):
    return export_tensorrt(model, example_input(data), cfg, out_dir / f"tensorrt-{cfg.precision}.engine",
                           spec=data.input_spec, from_stage="ptq", devices=devices)


@pytest.fixture(scope="module")
def deferred_int8(trained_tiny, digits_small, tmp_path_factory):
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a CUDA GPU are present: the engine is built, not deferred")
    out = tmp_path_factory.mktemp("trt")
    q = int8_model(trained_tiny, digits_small, "tensorrt", out / "w")
    devices = [load_device(d) for d in (*JETSONS, "host-cpu")]
    return _export(q, digits_small, TensorRTConfig(), out, devices)


def test_int8_without_tensorrt_is_deferred_with_a_linted_onnx(deferred_int8):
    art = deferred_int8
    assert art.status == "deferred" and art.target == "tensorrt" and art.name == "tensorrt-int8"
    assert art.path.suffix == ".onnx" and art.path.is_file()
    assert not art.path.with_suffix(".engine").exists(), "a deferred build must not leave an engine file"
    assert lint_file(art.path, "tensorrt").passed
    assert art.lint_checked["tensorrt"]["passed"] and art.lint_checked["tensorrt"]["errors"] == 0
    assert art.message.startswith("engine build deferred: TensorRT is not installed here")
    assert art.details["onnx"] == "tensorrt-int8.onnx" and art.details["strongly_typed"] is True
    assert art.details["scheme"] == "tensorrt"
    with pytest.raises(RuntimeError, match="cannot run: deferred"):
        art.runner()
    json.dumps(art.to_report())


def test_deferred_int8_gives_a_trtexec_command_per_jetson(deferred_int8):
    commands = deferred_int8.details["build_commands"]
    assert set(commands) == set(JETSONS), "host-cpu has no tensorrt runtime"
    expected = (f"{TRTEXEC} --onnx=tensorrt-int8.onnx --saveEngine=tensorrt-int8.engine "
                "--minShapes=input:1x1x8x8 --optShapes=input:1x1x8x8 --maxShapes=input:32x1x8x8 "
                "--stronglyTyped --memPoolSize=workspace:1024M")
    assert all(c == expected for c in commands.values())
    assert expected in deferred_int8.message and "jetson-orin-nano" in deferred_int8.message


def test_fp16_defers_an_fp32_onnx(trained_tiny, digits_small, tmp_path, monkeypatch):
    import onnx

    monkeypatch.setattr("rescompress.export.tensorrt.tensorrt_available", lambda: (True, ""))
    engine = tmp_path / "tensorrt-fp16.engine"
    engine.write_bytes(b"an engine from an earlier run")
    cfg = TensorRTConfig(precision="fp16", build="defer", max_batch=4, workspace_mib=256)
    art = _export(trained_tiny, digits_small, cfg, tmp_path)
    assert art.status == "deferred" and art.message.startswith("engine build deferred: build: defer")
    assert not engine.exists(), "a stale engine must not pass for this export's"
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert "QuantizeLinear" not in ops and "Conv" in ops
    command = art.details["build_commands"]["any"]
    assert command.startswith("trtexec --onnx=tensorrt-fp16.onnx ") and "--maxShapes=input:4x1x8x8" in command
    assert "--fp16" in command and "--stronglyTyped" not in command and "workspace:256M" in command
    assert art.details["strongly_typed"] is False and "scheme" not in art.details


def test_onnxruntime_scheme_int8_fails_the_tensorrt_lint(trained_tiny, digits_small, tmp_path):
    q = int8_model(trained_tiny, digits_small, "onnxruntime", tmp_path / "w")
    art = _export(q, digits_small, TensorRTConfig(), tmp_path, [load_device("jetson-orin-nano")])
    assert art.status == "failed" and not (tmp_path / "tensorrt-int8.engine").exists()
    assert "trt-int8-zero-point" in art.message and "symmetric int8" in art.message
    assert "scheme onnxruntime" in art.message and "build_commands" not in art.details
    assert art.lint_checked["tensorrt"]["errors"] > 0 and not art.lint_checked["tensorrt"]["passed"]
    assert all(f["target"] == "tensorrt" for f in art.lint)


def test_int8_needs_a_quantized_model(trained_tiny, digits_small, tmp_path):
    with pytest.raises(ValueError, match="needs the int8 model"):
        _export(trained_tiny, digits_small, TensorRTConfig(), tmp_path)


def test_config_is_strict():
    with pytest.raises(ValidationError, match="precison"):
        TensorRTConfig(precison="int8")
    for bad in ({"precision": "fp32"}, {"opset": 12}, {"build": "now"}, {"max_batch": 0}):
        with pytest.raises(ValidationError):
            TensorRTConfig(**bad)


def test_target_is_registered_and_generic_command_quotes_names():
    from rescompress.export import TARGETS

    spec = TARGETS.get("tensorrt")
    assert spec.suffix == ".engine" and spec.precisions == ("fp16", "int8") and spec.extra == "tensorrt"
    commands = build_commands(TensorRTConfig(), "my model.onnx", "my model.engine", (3, 32, 32))
    assert commands == {"any": "trtexec --onnx='my model.onnx' --saveEngine='my model.engine' "
                               "--minShapes=input:1x3x32x32 --optShapes=input:1x3x32x32 "
                               "--maxShapes=input:32x3x32x32 --stronglyTyped --memPoolSize=workspace:1024M"}


def _board(sshd, tmp_path, trtexec) -> DeviceProfile:
    """A TensorRT device reached over the test sshd, whose trtexec is `trtexec`."""
    conn = sshd.connection(tmp_path / "device")
    (tmp_path / "device").mkdir()
    return DeviceProfile.model_validate({"name": "board", "runtimes": ["tensorrt"], "trtexec": str(trtexec),
                                         "connection": {"ssh": conn.model_dump()}})


def test_the_engine_timed_over_ssh_is_the_engine_the_report_says_to_build(trained_tiny, digits_small, sshd, tmp_path):
    """A deferred export prints a trtexec build command for the device; measuring it there runs exactly that
    command (same argv, in the folder holding the ONNX), then times the engine it wrote."""
    from rescompress.bench.device_latency import DeviceLatency

    fake, log = recording_trtexec(tmp_path)
    board = _board(sshd, tmp_path, fake)
    cfg = TensorRTConfig(precision="fp16", build="defer", max_batch=4, workspace_mib=256)
    art = _export(trained_tiny, digits_small, cfg, tmp_path, [board])
    printed = art.details["build_commands"]["board"]
    assert printed in art.message

    source = DeviceLatency(board, batch=2, warmup=1, runs=5, threads=None, layers=lambda: [],
                           measure_here=lambda a: pytest.fail("a remote device is not timed here"))
    taken = source.take(art)
    assert taken.remote_status == "ok", taken.message
    calls = calls_of(log)
    assert calls and calls[0]["argv"] == shlex.split(printed), "the device built another engine than the one printed"
    build, timing = calls
    assert timing["argv"] == [str(fake), "--loadEngine=tensorrt-fp16.engine", "--shapes=input:2x1x8x8",
                              "--warmUp=200", "--iterations=5", "--duration=0"]
    assert build["cwd"] == timing["cwd"] and build["cwd"].startswith(str(tmp_path / "device"))
    lat = taken.latency
    assert lat["source"] == "measured-remote" and lat["p50_ms"] == 0.779297 and lat["batch"] == 2
    assert f"engine built on the device with: {shlex.join(build['argv'])}" in lat["note"]
    assert list((tmp_path / "device").iterdir()) == [], "the engine was left on the device"


def test_remote_commands_come_from_the_export_builder(trained_tiny, digits_small, tmp_path):
    """The remote path's build argv for an exported ONNX is the printed command, also for int8 defaults."""
    from rescompress.bench.remote import measure_remote, trtexec_commands
    from rescompress.devices import SSHConnection

    cfg = TensorRTConfig(precision="fp16", build="defer", max_batch=8)
    board = DeviceProfile.model_validate({"name": "board", "runtimes": ["tensorrt"], "trtexec": "/opt/trt/trtexec"})
    art = _export(trained_tiny, digits_small, cfg, tmp_path, [board])
    build, timing = trtexec_commands(art.path, engine=TensorRTConfig(**art.details["build_config"]), batch=8,
                                     warmup=0, runs=7, trtexec=board.trtexec)
    assert build == shlex.split(art.details["build_commands"]["board"])
    assert timing == ["/opt/trt/trtexec", "--loadEngine=tensorrt-fp16.engine", "--shapes=input:8x1x8x8",
                      "--warmUp=0", "--iterations=7", "--duration=0"]
    # a file given alone: fp32 ONNX -> fp16 engine, the profile reaching the batch asked for
    build, _ = trtexec_commands(art.path, batch=64)
    assert build == shlex.split(build_commands(TensorRTConfig(precision="fp16", max_batch=64), art.path.name,
                                               "tensorrt-fp16.engine", (1, 8, 8))["any"])
    # a batch the engine's profile does not reach is refused before connecting
    out = measure_remote(art.path, "tensorrt", SSHConnection(host="unused.invalid"),
                         engine=TensorRTConfig(**art.details["build_config"]), batch=9)
    assert out.status == "failed" and "batch 9 is larger than the engine's profile allows (max_batch 8)" in out.message


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_engine_builds_and_matches_the_onnx(trained_tiny, digits_small, tmp_path, precision):
    available, why = tensorrt_available()
    if not available:
        pytest.skip(why)
    from rescompress.export.onnx import ort_runner

    model = int8_model(trained_tiny, digits_small, "tensorrt", tmp_path / "w") if precision == "int8" else trained_tiny
    art = _export(model, digits_small, TensorRTConfig(precision=precision, max_batch=8), tmp_path)
    assert art.status == "ok", art.message
    assert art.path.suffix == ".engine" and art.path.is_file() and art.runtime.startswith("tensorrt ")
    assert {"tensorrt_version", "gpu", "onnx", "strongly_typed"} <= set(art.details)
    x = digits_small.input_spec.normalize_numpy(digits_small.test.images[:50].numpy())
    got = art(x)  # 50 images through a profile of at most 8
    ref = ort_runner(art.path.with_suffix(".onnx"), None, optimize=False)(x)
    assert got.shape == ref.shape and (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
