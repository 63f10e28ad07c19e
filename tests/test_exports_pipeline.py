"""Exports inside a run: plan-time checks, automatic lint, deferred TensorRT builds, TFLite measured per device."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
from typer.testing import CliRunner

from rescompress.cli import app
from rescompress.devices import load_device
from rescompress.errors import BackendMissingError, PlanError
from rescompress.pipeline import check_exports, execute, prepare_new
from rescompress.recipe import parse_recipe
from tests.conftest import TINY_RECIPE, write_recipe


def _recipe(stages, export, devices=("host-cpu",)):
    data = copy.deepcopy(TINY_RECIPE)
    data.update(stages=stages, export=export, devices=list(devices))
    return parse_recipe(data, "r.yaml")


@pytest.mark.parametrize("stages, export, devices, match", [
    ([{"qat": {"scheme": "onnxruntime"}}], [{"tflite": {"precision": "int8"}}], ["host-cpu"],
     r"export\[0\] tflite-int8 cannot ship the qat stage's onnxruntime int8 layout; set qat\.scheme to tflite or tensorrt"),
    ([{"ptq": {}}], [{"tensorrt": {"precision": "int8"}}], ["host-cpu"],
     r"export\[0\] tensorrt-int8 cannot ship the ptq stage's onnxruntime int8 layout; set ptq\.scheme to tensorrt"),
    ([], [{"tensorrt": {"precision": "int8"}}], ["jetson-orin-nano"],
     r"export\[0\] tensorrt-int8 needs an int8 model, but no stage quantizes"),
])
def test_impossible_exports_fail_at_plan_time(stages, export, devices, match):
    with pytest.raises(PlanError, match=match):
        check_exports(_recipe(stages, export, devices), [load_device(d) for d in devices])


def test_plan_accepts_tflite_int8_when_the_first_device_picks_its_scheme(monkeypatch):
    real = importlib.util.find_spec  # the backends' presence is another check's business
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("litert_torch", "onnx2tf") else real(name, *a))
    devices = [load_device("galaxy-s24")]
    check_exports(_recipe([{"qat": {}}], [{"tflite": {"precision": "int8"}}], ["galaxy-s24"]), devices)
    check_exports(_recipe([], [{"tflite": {"precision": "int8", "converter": "onnx2tf"}}], ["galaxy-s24"]), devices)


def _zero_points(path):
    """(activation zero points, weight zero points) of an int8 QDQ ONNX file, as numpy arrays.

    Activations are quantized in the graph (QuantizeLinear); weights are int8 constants behind a
    DequantizeLinear. A missing zero point is ONNX's default, uint8 0."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def zp(node):
        return const[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)

    acts = [zp(n) for n in graph.node if n.op_type == "QuantizeLinear"]
    weights = [zp(n) for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in const]
    return acts, weights


@pytest.mark.parametrize("devices, scheme", [
    (["jetson-orin-nano", "host-cpu"], "tensorrt"),
    (["host-cpu", "jetson-orin-nano"], "onnxruntime"),
    (["galaxy-s24", "jetson-orin-nano"], "tflite"),
])
def test_scheme_follows_the_first_device_when_unset(tmp_path, devices, scheme):
    import numpy as np
    from rich.console import Console

    data = copy.deepcopy(TINY_RECIPE)
    data.update(train={"epochs": 0}, data={"name": "digits", "limit_train": 200},
                stages=[{"ptq": {"calibration_batches": 2}}], export=[{"onnx": {"precision": "int8"}}],
                devices=devices, report={"latency": {"warmup": 1, "runs": 2}})
    plan, run_dir, manifest = prepare_new(write_recipe(tmp_path / "r.yaml", data), tmp_path / "runs")
    report = execute(plan, run_dir, manifest, Console(quiet=True))
    art = next(a for a in report["artifacts"] if a["name"] == "onnx-int8")
    assert art["status"] == "ok"
    acts, weights = _zero_points(run_dir / art["path"])
    assert acts and weights
    # every layout has symmetric int8 weights
    assert all(w.dtype == np.int8 and not w.any() for w in weights)
    if scheme == "tensorrt":  # symmetric int8 activations: zero point 0
        assert all(a.dtype == np.int8 and not a.any() for a in acts)
    elif scheme == "onnxruntime":  # uint8 activations (U8S8)
        assert all(a.dtype == np.uint8 for a in acts)
    else:  # LiteRT: int8 activations, asymmetric
        assert all(a.dtype == np.int8 for a in acts) and any(a.any() for a in acts)


def test_missing_backend_fails_at_plan_time_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2tf" else real(name, *a))
    with pytest.raises(BackendMissingError,
                       match=r"export\[0\] tflite-fp32-onnx2tf needs onnx2tf.*rescompress\[tensorflow\]"):
        check_exports(_recipe([], [{"tflite": {"converter": "onnx2tf"}}]), [])


def test_lint_command_exit_codes(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    result = CliRunner().invoke(app, ["lint", str(bad), "--target", "tensorrt"])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.output
    result = CliRunner().invoke(app, ["lint", str(tmp_path / "none.onnx"), "--target", "onnxruntime"])
    assert result.exit_code == 2 and "no such file" in result.output
    result = CliRunner().invoke(app, ["lint", str(bad), "--target", "coreml"])
    assert result.exit_code == 2


@pytest.mark.slow
@pytest.mark.tflite
@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None,
                    reason="needs the 'tflite' extra: pip install 'rescompress[tflite]'")
def test_run_with_tensorrt_and_tflite_exports(tmp_path):
    from rich.console import Console

    data = copy.deepcopy(TINY_RECIPE)
    data.update(stages=[{"ptq": {"scheme": "tensorrt", "calibration_batches": 2}}],
                export=[{"onnx": {"precision": "int8"}}, {"tensorrt": {"precision": "int8"}},
                        {"tflite": {"precision": "fp32"}}, {"tflite": {"precision": "int8"}}],
                devices=["jetson-orin-nano", "host-cpu"])
    plan, run_dir, manifest = prepare_new(write_recipe(tmp_path / "r.yaml", data), tmp_path / "runs")
    report = execute(plan, run_dir, manifest, Console(quiet=True))
    arts = {a["name"]: a for a in report["artifacts"]}

    trt = arts["tensorrt-int8"]
    assert trt["status"] == "deferred" and trt["path"].endswith(".onnx")
    assert trt["lint_checked"]["tensorrt"]["passed"]
    assert not list((run_dir / "artifacts").glob("*.engine")), "no engine file may appear without TensorRT"
    assert arts["onnx-int8"]["lint_checked"]["tensorrt"]["passed"]
    assert "onnxruntime" not in arts["onnx-int8"]["lint_checked"]  # the TensorRT layout is only a reference there

    tfl = arts["tflite-int8"]
    assert tfl["status"] == "ok" and tfl["lint_checked"]["tflite"]["passed"]
    assert tfl["parity"]["reference"] == "torch-int8" and tfl["parity"]["top1_agreement"] >= 0.95
    assert arts["tflite-fp32"]["parity"]["max_abs_diff"] < 1e-4

    devices = {d["name"]: {r["artifact"]: r for r in d["results"]} for d in report["devices"]}
    jetson, host = devices["jetson-orin-nano"], devices["host-cpu"]
    assert "tflite-int8" not in jetson  # a Jetson profile does not run LiteRT
    assert "/usr/src/tensorrt/bin/trtexec --onnx=tensorrt-int8.onnx" in jetson["tensorrt-int8"]["message"]
    assert "--stronglyTyped" in jetson["tensorrt-int8"]["message"]
    assert "tensorrt-int8" not in host
    assert host["tflite-int8"]["latency"]["p50_ms"] > 0 and host["tflite-fp32"]["latency"]["p50_ms"] > 0
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["artifacts"] == report["artifacts"]
    assert "tensorrt: passes" in (run_dir / "report.md").read_text()
