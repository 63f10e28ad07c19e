"""Latency and accuracy on an Android phone over adb (`rescompress.bench.adb`), against the fake phone of
`tests/fake_adb.py`: a real shell parses the adb shell lines, and its benchmark_model replays TFLite's log
format and runs the model in LiteRT. No real phone is involved."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import fake_adb
from rescompress.bench.adb import MEAN_NOTE, evaluate_adb, measure_adb, parse_benchmark_output
from rescompress.devices import ADBConnection, DeviceProfile, available_devices

needs_litert = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                  reason="needs the 'tflite' extra: pip install 'rescompress[tflite]'")


def tiny_tflite(path: Path, *, int8: bool) -> Path:
    """A one-layer classifier (NHWC 1x4x4x3 -> 10 logits) written with the TFLite schema directly: no
    converter, milliseconds. The int8 one has int8 input and output with their own scales and zero points."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(10, 48)).astype(np.float32), rng.normal(size=(10,)).astype(np.float32)
    buffers = [fb.BufferT()]

    def buffer(arr: np.ndarray) -> int:
        buf = fb.BufferT()
        buf.data = list(arr.tobytes())
        buffers.append(buf)
        return len(buffers) - 1

    def quant(scale: float, zero_point: int):
        q = fb.QuantizationParametersT()
        q.scale, q.zeroPoint = [scale], [zero_point]
        return q

    def tensor(name, shape, kind, buf=0, q=None):
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer, t.quantization = name, list(shape), kind, buf, q
        return t

    T = fb.TensorType
    if int8:
        in_scale, w_scale = 0.02, 0.03
        wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        bq = np.round(b / (in_scale * w_scale)).astype(np.int32)
        tensors = [tensor("serving_default_x:0", (1, 4, 4, 3), T.INT8, q=quant(in_scale, -3)),
                   tensor("w", (10, 48), T.INT8, buffer(wq), quant(w_scale, 0)),
                   tensor("b", (10,), T.INT32, buffer(bq), quant(in_scale * w_scale, 0)),
                   tensor("logits", (1, 10), T.INT8, q=quant(0.25, 2))]
    else:
        tensors = [tensor("serving_default_x:0", (1, 4, 4, 3), T.FLOAT32), tensor("w", (10, 48), T.FLOAT32, buffer(w)),
                   tensor("b", (10,), T.FLOAT32, buffer(b)), tensor("logits", (1, 10), T.FLOAT32)]
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.FullyConnectedOptions, fb.FullyConnectedOptionsT()
    graph = fb.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators, graph.name = tensors, [0], [3], [op], "main"
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.FULLY_CONNECTED
    code.version = 4 if int8 else 1
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    if importlib.util.find_spec("ai_edge_litert") is None:
        pytest.skip("needs the 'tflite' extra")
    folder = tmp_path_factory.mktemp("models")
    return {"fp32": tiny_tflite(folder / "tiny-fp32.tflite", int8=False),
            "int8": tiny_tflite(folder / "tiny-int8.tflite", int8=True)}


@pytest.fixture
def phone(tmp_path) -> fake_adb.FakePhone:
    return fake_adb.install(tmp_path / "phone")


def shell_lines(phone: fake_adb.FakePhone) -> list[str]:
    return [argv[3] for argv in phone.calls() if argv[2] == "shell"]


# -------------------------------------------------------------------------------------------- latency

@pytest.mark.tflite
@needs_litert
def test_measure_runs_benchmark_model_on_the_phone_and_cleans_up(phone, models):
    out = measure_adb(models["fp32"], phone.connection(), threads=4, warmup=3, runs=12)
    assert out.status == "ok", out.message
    calls = phone.calls()
    assert all(argv[:2] == ["-s", fake_adb.SERIAL] for argv in calls)
    assert [argv[2] for argv in calls] == ["shell", "shell", "push", "shell", "shell"]
    assert calls[0][3].startswith("getprop;")
    tmp = calls[2][4].rsplit("/", 1)[0]  # push model.tflite into the fresh directory
    assert calls[2][3:] == [str(models["fp32"]), f"{tmp}/model.tflite"]
    assert Path(tmp).parent == phone.workdir and Path(tmp).name.startswith("rescompress-")
    assert calls[1][3].startswith(f"mkdir -p {tmp};") and calls[4][3].startswith(f"rm -rf {tmp};")
    bench = calls[3][3]
    assert bench.startswith(f"{phone.benchmark_model} --graph={tmp}/model.tflite --num_threads=4 --warmup_runs=3 ")
    assert "--num_runs=12" in bench and "--use_xnnpack=true" in bench and "--min_secs=0" in bench
    assert phone.benchmark_calls()[0]["use_xnnpack"] == "true"

    want = fake_adb.expected_latency(3, 12, percentiles=True)
    lat = out.latency
    for key, value in want.items():
        assert lat[key] == pytest.approx(value), key
    assert lat["statistic"] == "p50" and lat["p90_ms"] is None and lat["p99_ms"] is None
    assert lat["threads"] == 4 and lat["batch"] == 1 and lat["delegate"] == "xnnpack"
    assert lat["source"] == "measured-remote" and lat["host"] == f"adb:{fake_adb.SERIAL}"
    assert lat["input"] == "benchmark_model's own random input" and lat["runtime_version"] is None
    assert lat["method"].startswith("benchmark_model on the phone (--num_threads=4 --warmup_runs=3")
    assert "completely executed by the delegate" in lat["note"]
    assert out.device_facts == {"android_version": "14", "sdk": "34", "model": "SM-S921B", "soc": "QTI SM8650",
                                "machine": "arm64-v8a", "runtime": "tflite", "runtime_version": None}
    assert phone.leftovers() == []


@pytest.mark.tflite
@needs_litert
def test_a_build_without_percentiles_gives_the_mean_as_p50_and_says_so(phone, models):
    phone.configure(style="legacy")
    out = measure_adb(models["fp32"], phone.connection(), warmup=2, runs=7)
    assert out.status == "ok", out.message
    want = fake_adb.expected_latency(2, 7, percentiles=False)
    assert out.latency["statistic"] == "mean" and MEAN_NOTE in out.latency["note"]
    assert out.latency["p50_ms"] == out.latency["mean_ms"] == pytest.approx(want["mean_ms"])
    assert out.latency["runs"] == 7 and out.latency["threads"] is None  # no --num_threads: the binary's default
    assert "--num_threads" not in shell_lines(phone)[2]


@pytest.mark.tflite
@needs_litert
def test_the_soc_falls_back_to_the_board_platform(phone, models):
    props = {k: v for k, v in fake_adb.PROPS.items() if not k.startswith("ro.soc.")}
    phone.configure(props=props)
    out = measure_adb(models["fp32"], phone.connection(), runs=2)
    assert out.status == "ok" and out.device_facts["soc"] == "pineapple"


@pytest.mark.tflite
@needs_litert
def test_the_gpu_delegate_is_asked_for_with_use_gpu(phone, models):
    conn = phone.connection(delegates=["gpu", "xnnpack"])
    out = measure_adb(models["fp32"], conn, runs=3)
    assert out.status == "ok", out.message
    assert "--use_gpu=true" in shell_lines(phone)[2] and "--use_xnnpack" not in shell_lines(phone)[2]
    assert out.latency["delegate"] == "gpu"
    out = measure_adb(models["fp32"], conn, runs=3, delegate="nnapi")
    assert out.status == "ok" and phone.benchmark_calls()[-1]["use_nnapi"] == "true"


@pytest.mark.tflite
@needs_litert
@pytest.mark.parametrize("fail, status, words", [
    ("gpu", "failed", r"benchmark_model failed on phone R5CX10FAKE \(exit status 1\): .*Failed to apply GPU delegate"
                      r".*the delegate does not take this model"),
    ("alloc", "failed", r"\(exit status 1\): ERROR: Failed to allocate tensors! \| ERROR: Benchmarking failed\."),
    ("oom", "out-of-memory", r"benchmark_model ran out of memory on phone R5CX10FAKE \(exit status 137\)"),
])
def test_a_benchmark_model_failure_is_a_status_with_its_message(phone, models, fail, status, words):
    phone.configure(fail=fail)
    out = measure_adb(models["fp32"], phone.connection(), delegate="gpu" if fail == "gpu" else None, runs=3)
    assert out.status == status
    assert re.search(words, out.message), out.message
    assert out.device_facts["android_version"] == "14"  # what the phone said before the run failed
    assert phone.leftovers() == []


@pytest.mark.tflite
@needs_litert
def test_a_missing_benchmark_model_is_runtime_missing_and_says_how_to_push_it(phone, models):
    phone.remove_benchmark_model()
    out = measure_adb(models["fp32"], phone.connection(), runs=3)
    assert out.status == "runtime-missing"
    assert f"benchmark_model is not at {phone.benchmark_model}" in out.message
    assert f"adb -s {fake_adb.SERIAL} push benchmark_model {phone.benchmark_model}" in out.message
    assert "chmod +x" in out.message
    assert phone.leftovers() == []


@pytest.mark.tflite
@needs_litert
def test_a_run_past_the_timeout_is_timeout_and_cleaned_up(phone, models):
    phone.configure(sleep_s=6)
    out = measure_adb(models["fp32"], phone.connection(), runs=3, timeout_s=3)
    assert out.status == "timeout" and "within 3 s" in out.message
    assert shell_lines(phone)[-1].startswith("rm -rf ")
    assert phone.leftovers() == []


@pytest.mark.tflite
@needs_litert
def test_a_directory_that_cannot_be_removed_is_noted_beside_the_result(phone, models):
    phone.break_rm()
    out = measure_adb(models["fp32"], phone.connection(), runs=3)
    assert out.status == "ok" and out.latency["runs"] == 3
    assert re.fullmatch(r"could not remove \S+/rescompress-[0-9a-f]{8} on phone R5CX10FAKE: rm: \S+: Read-only file "
                        r"system", out.message), out.message


def test_an_unknown_serial_is_unreachable_before_anything_is_copied(phone, tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3")
    out = measure_adb(model, phone.connection(serial="emulator-5554"), runs=3)
    assert out.status == "unreachable"
    assert "adb sees no phone with serial emulator-5554" in out.message and "adb devices" in out.message
    assert len(phone.calls()) == 1


@pytest.mark.parametrize("state, words", [("unauthorized", "accept the 'Allow USB debugging?' prompt"),
                                          ("offline", "is offline to adb")])
def test_an_unauthorized_or_offline_phone_is_unreachable_with_what_to_do(phone, tmp_path, state, words):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3")
    phone.configure(state=state)
    out = measure_adb(model, phone.connection(), runs=3)
    assert out.status == "unreachable" and words in out.message


def test_no_adb_on_this_host_is_failed_and_names_the_install(tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3")
    out = measure_adb(model, ADBConnection(serial="R5CX10FAKE", adb=str(tmp_path / "no-adb")), runs=3)
    assert out.status == "failed" and "apt-get install adb" in out.message and "connection.adb.adb" in out.message


def test_invalid_arguments_raise(tmp_path):
    conn = ADBConnection(serial="R5CX10FAKE")
    with pytest.raises(ValueError, match=r"benchmark_model runs \.tflite files, got m\.onnx"):
        measure_adb(tmp_path / "m.onnx", conn)
    with pytest.raises(ValueError, match=r"need runs >= 1"):
        measure_adb(tmp_path / "m.tflite", conn, runs=0)
    assert measure_adb(tmp_path / "m.tflite", conn).status == "failed"  # no such file: a status


# ------------------------------------------------------------------------------------------- accuracy

def host_logits(path: Path, inputs: np.ndarray) -> np.ndarray:
    """The same model on the same inputs in LiteRT on this host, dequantized as the pipeline does."""
    from rescompress.export.tflite import litert_interpreter

    it = litert_interpreter(path)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for x in inputs:
        it.set_tensor(inp["index"], x[None])
        it.invoke()
        rows.append(it.get_tensor(out["index"])[0].copy())
    y = np.stack(rows)
    scale, zero_point = out["quantization"]
    return (y.astype(np.float32) - zero_point) * scale if scale else y.astype(np.float32)


def packed(kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "int8":
        return rng.integers(-128, 128, size=(n, 4, 4, 3)).astype(np.int8)
    return rng.normal(size=(n, 4, 4, 3)).astype(np.float32)


@pytest.mark.tflite
@needs_litert
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_evaluate_gives_the_logits_litert_gives_here(phone, models, kind):
    inputs = packed(kind, 5)
    out = evaluate_adb(models[kind], inputs, phone.connection(), threads=2)
    assert out.status == "ok", out.message
    assert out.logits.dtype == np.float32 and out.logits.shape == (5, 10)
    np.testing.assert_array_equal(out.logits, host_logits(models[kind], inputs))
    assert out.device_facts["soc"] == "QTI SM8650"
    assert ("dequantized on the host" in out.method) == (kind == "int8")

    calls = phone.calls()
    assert [argv[2] for argv in calls] == ["shell", "shell", "push", "push", "shell", "pull", "shell"]
    tmp = calls[2][4].rsplit("/", 1)[0]
    assert Path(calls[3][3]).name == "in" and calls[3][4] == f"{tmp}/in"  # every image in one push
    assert calls[5][3] == f"{tmp}/out.bin"
    runs = phone.benchmark_calls()
    assert len(runs) == 5
    for i, flags in enumerate(runs):
        assert flags["input_layer"] == "input"  # the model's name holds ':', which the flag syntax splits on
        assert flags["input_layer_shape"] == "1,4,4,3"
        assert flags["input_layer_value_files"] == f"input:{tmp}/in/{i}.bin"
        assert flags["output_filepath"] == f"{tmp}/o.bin"
        assert (flags["num_runs"], flags["warmup_runs"], flags["num_threads"]) == ("1", "0", "2")
        assert flags["use_xnnpack"] == "true"
    assert phone.leftovers() == []


@pytest.mark.tflite
@needs_litert
def test_evaluate_with_a_build_that_cannot_dump_outputs_says_so(phone, models):
    phone.configure(style="legacy")
    out = evaluate_adb(models["fp32"], packed("fp32", 2), phone.connection())
    assert out.status == "failed"
    assert "wrote no --output_filepath file (it does not know the flag: push a newer build)" in out.message
    assert phone.leftovers() == []


@pytest.mark.tflite
@needs_litert
def test_an_evaluation_failure_names_the_image(phone, models):
    phone.configure(fail="alloc")
    out = evaluate_adb(models["int8"], packed("int8", 3), phone.connection())
    assert out.status == "failed" and "Failed to allocate tensors!" in out.message
    assert out.message.endswith("(on image 0 of 3)")
    assert len(phone.benchmark_calls()) == 1 and phone.leftovers() == []


@pytest.mark.tflite
@needs_litert
def test_evaluate_refuses_inputs_the_model_does_not_take(phone, models):
    with pytest.raises(ValueError, match=r"inputs must be \(N, 4, 4, 3\) with N >= 1, as the model's input "
                                         r"\(1, 4, 4, 3\) takes them; got \(2, 3, 4, 4\)"):
        evaluate_adb(models["fp32"], np.zeros((2, 3, 4, 4), np.float32), phone.connection())
    with pytest.raises(ValueError, match=r"inputs must be int8, the model's input type \(int8 already quantized\); "
                                         r"got float32"):
        evaluate_adb(models["int8"], np.zeros((2, 4, 4, 3), np.float32), phone.connection())
    assert phone.calls() == []


@pytest.mark.tflite
@needs_litert
def test_an_unknown_serial_is_unreachable_for_evaluation_too(phone, models):
    out = evaluate_adb(models["fp32"], packed("fp32", 1), phone.connection(serial="192.168.1.7:5555"))
    assert out.status == "unreachable" and "192.168.1.7:5555" in out.message


# -------------------------------------------------------------------------------------------- parsing

def test_the_stat_lines_of_both_phases_are_read_in_milliseconds():
    log = """STARTING!
Num threads: [2]
#threads used for CPU inference: [2]
Loaded model /data/local/tmp/rescompress-1a2b3c4d/model.tflite
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=3 first=31250 curr=20875 min=20875 max=31250 avg=24500.3 std=4800

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=20100 curr=19950 min=19800 max=21400 avg=20012.5 std=210

Inference timings in us: Init: 15230, First inference: 31250, Warmup (avg): 24500.3, Inference (avg): 20012.5
"""
    lat = parse_benchmark_output(log)
    assert lat["mean_ms"] == lat["p50_ms"] == pytest.approx(20.0125) and lat["statistic"] == "mean"
    assert (lat["min_ms"], lat["max_ms"], lat["std_ms"]) == pytest.approx((19.8, 21.4, 0.21))
    assert (lat["runs"], lat["warmup"], lat["threads"]) == (50, 3, 2)
    assert lat["note"] == MEAN_NOTE

    modern = log.replace("std=210", "std=210 p5=19820 median=19990 p95=20800").replace("\nc", "\nINFO: c")
    lat = parse_benchmark_output(modern)
    assert lat["p50_ms"] == pytest.approx(19.99) and lat["statistic"] == "p50" and "note" not in lat

    same = "Running benchmark for at least 1 iterations\ncount=1 curr=1234 p5=1234 median=1234 p95=1234\n"
    lat = parse_benchmark_output(same)
    assert (lat["mean_ms"], lat["min_ms"], lat["std_ms"], lat["runs"]) == (1.234, 1.234, 0.0, 1)
    lat = parse_benchmark_output("Running benchmark for at least 2 iterations\ncount=2 curr=1.5e+06(all same)\n")
    assert lat["mean_ms"] == 1500.0 and lat["max_ms"] == 1500.0
    with pytest.raises(ValueError, match="benchmark_model printed no timings"):
        parse_benchmark_output("STARTING!\nLoaded model x.tflite\n")


def test_the_fake_prints_what_tflite_stat_prints():
    assert fake_adb.stat_line([5, 5], percentiles=False) == "count=2 curr=5(all same)"
    assert fake_adb.stat_line([], percentiles=True) == "count=0"
    assert fake_adb.stat_line([10, 20, 30], percentiles=True) == \
        "count=3 first=10 curr=30 min=10 max=30 avg=20 std=8 p5=10 median=20 p95=30"


# ------------------------------------------------------------------------------------- the connection

@pytest.mark.parametrize("fields, match", [
    ({"serial": "-s"}, r"invalid adb serial '-s'"),
    ({"serial": "R5CX 10"}, r"invalid adb serial 'R5CX 10'"),
    ({"serial": "x;reboot"}, r"invalid adb serial 'x;reboot'"),
    ({"serial": "x", "workdir": "data/local/tmp"}, r"invalid path on the phone 'data/local/tmp'"),
    ({"serial": "x", "benchmark_model": "/data/local/tmp/bench model"}, r"invalid path on the phone"),
    ({"serial": "x", "workdir": "/data/../system"}, r"invalid path on the phone '/data/../system'"),
    ({"serial": "x", "delegates": ["gpu", "gpu"]}, r"delegates lists one more than once"),
    ({"serial": "x", "delegates": ["hexagon"]}, r"Input should be 'xnnpack', 'gpu' or 'nnapi'"),
    ({"serial": "x", "delegates": []}, r"at least 1 item"),
    ({"serial": "x", "port": 5555}, r"Extra inputs are not permitted"),
])
def test_a_bad_adb_connection_is_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        ADBConnection(**fields)


def test_an_adb_connection_measures_tflite_on_the_phone():
    conn = ADBConnection(serial="adb-R5CX10FAKE-abc._adb-tls-connect._tcp")
    assert (conn.workdir, conn.benchmark_model, conn.delegate, conn.adb) == \
        ("/data/local/tmp", "/data/local/tmp/benchmark_model", "xnnpack", "adb")
    data = yaml.safe_load(open(available_devices()["galaxy-s24"], encoding="utf-8"))
    assert data["connection"] is None
    data["connection"] = {"adb": {"serial": "R5CX10FAKE", "delegates": ["gpu"]}}
    dev = DeviceProfile.model_validate(data)
    assert dev.adb.serial == "R5CX10FAKE" and dev.ssh is None
    assert dev.latency_plan("tflite") == "measured-remote"
    assert dev.latency_plan("onnxruntime") == "none" and dev.latency_plan("torch") == "none"
    DeviceProfile.model_validate({**data, "latency_source": "measured-remote"})  # tflite only: fine


def test_measured_remote_over_adb_alone_refuses_runtimes_it_cannot_measure():
    profile = {"name": "phone", "latency_source": "measured-remote", "runtimes": ["tflite", "onnxruntime"],
               "connection": {"adb": {"serial": "R5CX10FAKE"}}}
    with pytest.raises(ValueError, match=r"measured-remote over connection.adb measures tflite only, and runtimes "
                                         r"lists onnxruntime"):
        DeviceProfile.model_validate(profile)
    with pytest.raises(ValueError, match=r"measured-remote needs connection.ssh, or connection.adb for tflite"):
        DeviceProfile.model_validate({**profile, "connection": None})
