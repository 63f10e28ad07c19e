"""Deployability lint on real exports of the tiny ResNet: the TensorRT-readiness rules on rescompress's own
int8 layouts, on onnxruntime's quantize_static output and on hand-broken QDQ graphs, and the onnxruntime
fusion check."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rescompress.errors import RescompressError
from rescompress.export.lint import LintResult, lint_file
from rescompress.export.onnx import OnnxConfig, export_onnx

_PTQ_CACHE: dict = {}


def int8_model(trained, data, scheme: str, work_dir: Path):
    """A PTQ int8 copy of `trained` in `scheme`'s layout, calibrated on real digits; cached for the session
    (callers must not change it)."""
    from rescompress.compress.quantize import PTQConfig, quantize_ptq
    from tests.conftest import make_ctx

    key = (id(trained), id(data), scheme)
    if key not in _PTQ_CACHE:
        ctx = make_ctx(data, work_dir, trained)
        _PTQ_CACHE[key] = quantize_ptq(copy.deepcopy(trained), ctx, PTQConfig(calibration_batches=2), scheme,
                                       observer="minmax")
    return _PTQ_CACHE[key]


def example_input(data) -> torch.Tensor:
    spec = data.input_spec
    return torch.zeros(2, spec.channels, spec.height, spec.width)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lint")


def _export(model, data, path: Path, precision: str) -> Path:
    export_onnx(model, example_input(data), OnnxConfig(precision=precision), path, spec=data.input_spec,
                from_stage="test")
    return path


@pytest.fixture(scope="module")
def trt_onnx(trained_tiny, digits_small, onnx_dir) -> Path:
    q = int8_model(trained_tiny, digits_small, "tensorrt", onnx_dir / "w")
    return _export(q, digits_small, onnx_dir / "trt.onnx", "int8")


@pytest.fixture(scope="module")
def ort_onnx(trained_tiny, digits_small, onnx_dir) -> Path:
    q = int8_model(trained_tiny, digits_small, "onnxruntime", onnx_dir / "w")
    return _export(q, digits_small, onnx_dir / "ort.onnx", "int8")


@pytest.fixture(scope="module")
def fp32_onnx(trained_tiny, digits_small, onnx_dir) -> Path:
    return _export(trained_tiny, digits_small, onnx_dir / "fp32.onnx", "fp32")


def _ort_quantize(fp32: Path, data, out: Path, **kw) -> Path:
    """onnxruntime's own static quantization, calibrated on real digits images."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    images = data.input_spec.normalize_numpy(data.train.images[:64].numpy())

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i:i + 16]} for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(out), Reader(), **kw)
    return out


def _edited(src: Path, dest: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dest))
    return dest


def _rules(result: LintResult, severity: str = "error") -> set[str]:
    return {f.rule for f in result.findings if f.severity == severity}


def _actionable(result: LintResult) -> LintResult:
    for f in result.findings:
        assert f.node and f.fix and f.message, f
    return result


def _node(model, name: str):
    return next(n for n in model.graph.node if n.name == name)


def _producer(model, tensor: str):
    return next(n for n in model.graph.node if tensor in n.output)


def _set_initializer(model, name: str, value: np.ndarray) -> None:
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(value, name))


def _bypass(model, dq) -> None:
    """Remove a Q -> DQ pair: the DQ's consumers read the float tensor the Q quantized."""
    q = _producer(model, dq.input[0])
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == dq.output[0]:
                n.input[i] = q.input[0]
    model.graph.node.remove(dq)
    if not any(q.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(q)


# ------------------------------------------------------------------------------------------- tensorrt


def test_tensorrt_scheme_passes_the_tensorrt_lint(trt_onnx):
    result = _actionable(lint_file(trt_onnx, "tensorrt"))
    assert result.passed and not result.errors, [f.line() for f in result.findings]
    assert "Q/DQ" in result.checked and result.to_dict()["passed"] is True


def test_onnxruntime_quantize_static_defaults_fail(fp32_onnx, digits_small, tmp_path):
    """onnxruntime's defaults (QDQ, asymmetric QInt8 activations, int32 biases) are not TensorRT's layout."""
    qdq = _ort_quantize(fp32_onnx, digits_small, tmp_path / "ort_default.onnx")
    result = _actionable(lint_file(qdq, "tensorrt"))
    assert not result.passed and "FAILS" in result.summary()
    assert {"trt-zero-point-nonzero", "trt-bias-quantized"} <= _rules(result)
    finding = next(f for f in result.errors if f.rule == "trt-zero-point-nonzero")
    assert "symmetric int8" in finding.fix
    bias = next(f for f in result.errors if f.rule == "trt-bias-quantized")
    assert "'QuantizeBias': False" in bias.fix and "Conv" in bias.message


def test_onnxruntime_uint8_activations_fail_int8_zero_point(fp32_onnx, digits_small, tmp_path):
    from onnxruntime.quantization import QuantType

    qdq = _ort_quantize(fp32_onnx, digits_small, tmp_path / "ort_u8.onnx", activation_type=QuantType.QUInt8)
    result = _actionable(lint_file(qdq, "tensorrt"))
    finding = next(f for f in result.errors if f.rule == "trt-int8-zero-point")
    assert "uint8" in finding.message and "symmetric int8" in finding.fix


def test_onnxruntime_configured_as_the_fix_says_passes(fp32_onnx, digits_small, tmp_path):
    """The quantize_static settings the lint's fixes name give a TensorRT-ready graph."""
    from onnxruntime.quantization import QuantType

    qdq = _ort_quantize(fp32_onnx, digits_small, tmp_path / "ort_trt.onnx", activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    result = _actionable(lint_file(qdq, "tensorrt"))
    assert result.passed, [f.line() for f in result.errors]


def test_onnxruntime_qoperator_format_fails(fp32_onnx, digits_small, tmp_path):
    from onnxruntime.quantization import QuantFormat

    qop = _ort_quantize(fp32_onnx, digits_small, tmp_path / "qop.onnx", quant_format=QuantFormat.QOperator)
    result = _actionable(lint_file(qop, "tensorrt"))
    qlinear = [f for f in result.errors if f.rule == "trt-qoperator"]
    assert qlinear and any("QLinearConv" in f.node for f in qlinear)
    assert "QuantFormat.QDQ" in qlinear[0].fix


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_weight_dequantize_without_axis_fails(trt_onnx, tmp_path, op):
    proto = onnx.load(str(trt_onnx))
    conv = next(n for n in proto.graph.node if n.op_type == op)
    dq = _producer(proto, conv.input[1])
    assert dq.op_type == "DequantizeLinear"

    def drop_axis(model) -> None:
        node = _node(model, dq.name)
        keep = [a for a in node.attribute if a.name != "axis"]
        del node.attribute[:]
        node.attribute.extend(keep)

    result = _actionable(lint_file(_edited(trt_onnx, tmp_path / "noaxis.onnx", drop_axis), "tensorrt"))
    axis = [f for f in result.errors if f.rule == "trt-weight-axis"]
    assert len(axis) == 1 and dq.name in axis[0].node and "axis" in axis[0].fix
    assert op == "Gemm" or "axis=0" in axis[0].fix
    assert _rules(result) == {"trt-weight-axis"}


def test_residual_add_with_one_float_input_fails(trt_onnx, tmp_path):
    proto = onnx.load(str(trt_onnx))
    add = next(n for n in proto.graph.node if n.op_type == "Add"
               and all(_producer(proto, i).op_type == "DequantizeLinear" for i in n.input))

    def strip_one_input(model) -> None:
        _bypass(model, _producer(model, _node(model, add.name).input[1]))

    result = _actionable(lint_file(_edited(trt_onnx, tmp_path / "add.onnx", strip_one_input), "tensorrt"))
    findings = [f for f in result.errors if f.rule == "trt-add-qdq"]
    assert len(findings) == 1 and add.name in findings[0].node and "both inputs" in findings[0].fix


def _activation_qdq(model):
    """The first QuantizeLinear of an activation (its input is not a weight)."""
    inits = {t.name for t in model.graph.initializer}
    return next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)


def test_nonzero_int8_zero_point_fails(trt_onnx, tmp_path):
    def shift(model) -> None:
        _set_initializer(model, _activation_qdq(model).input[2], np.array(3, dtype=np.int8))

    result = _actionable(lint_file(_edited(trt_onnx, tmp_path / "zp.onnx", shift), "tensorrt"))
    findings = [f for f in result.errors if f.rule == "trt-zero-point-nonzero"]
    assert findings and "zero point 3" in findings[0].message


def test_zero_scale_and_old_opset_fail(trt_onnx, tmp_path):
    def break_it(model) -> None:
        _set_initializer(model, _activation_qdq(model).input[1], np.array(0.0, dtype=np.float32))
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 12

    result = _actionable(lint_file(_edited(trt_onnx, tmp_path / "old.onnx", break_it), "tensorrt"))
    assert {"trt-scale-value", "trt-opset"} <= _rules(result)


def test_per_channel_activation_fails(trt_onnx, tmp_path):
    def per_channel(model) -> None:
        q = _activation_qdq(model)
        model.graph.initializer.extend([numpy_helper.from_array(np.full(2, 0.1, np.float32), "pc_scale"),
                                        numpy_helper.from_array(np.zeros(2, np.int8), "pc_zp")])
        q.input[1], q.input[2] = "pc_scale", "pc_zp"

    result = _actionable(lint_file(_edited(trt_onnx, tmp_path / "pc.onnx", per_channel), "tensorrt"))
    assert _rules(result) == {"trt-activation-per-tensor"}


# ---------------------------------------------------------------------------------------- onnxruntime


def test_onnxruntime_scheme_fuses_every_layer(ort_onnx):
    result = lint_file(ort_onnx, "onnxruntime")
    assert result.passed and not result.findings, [f.line() for f in result.findings]
    assert "QLinearConv" in result.checked and "QLinearAdd" in result.checked


def test_tensorrt_scheme_warns_s8s8_in_onnxruntime(trt_onnx):
    result = _actionable(lint_file(trt_onnx, "onnxruntime"))
    s8s8 = [f for f in result.warnings if f.rule == "ort-s8s8"]
    assert len(s8s8) == 1 and s8s8[0].node.startswith("QuantizeLinear")


def test_unfused_conv_is_an_onnxruntime_error(ort_onnx, tmp_path):
    """Without Q/DQ on its output the stem conv cannot become a QLinearConv, nor can the layers reading it."""
    stem = next(n for n in onnx.load(str(ort_onnx)).graph.node if n.op_type == "Conv")

    def unquantize_stem_output(model) -> None:
        relu = next(n for n in model.graph.node if stem.output[0] in n.input)
        assert relu.op_type == "Relu"
        q = next(n for n in model.graph.node if relu.output[0] in n.input)
        for dq in [n for n in model.graph.node if q.output[0] in n.input]:
            _bypass(model, dq)

    result = _actionable(lint_file(_edited(ort_onnx, tmp_path / "unfused.onnx", unquantize_stem_output),
                                   "onnxruntime"))
    unfused = [f for f in result.errors if f.rule == "ort-unfused"]
    assert any(f.node.endswith(f"Conv {stem.name}") for f in unfused), [f.node for f in unfused]
    assert "scheme onnxruntime" in unfused[0].fix and _rules(result) == {"ort-unfused"}


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_fp32_onnx_has_no_findings(fp32_onnx, target):
    result = lint_file(fp32_onnx, target)
    assert result.passed and not result.findings


# --------------------------------------------------------------------------------------------- errors


def test_lint_file_input_errors(fp32_onnx, tmp_path):
    with pytest.raises(RescompressError, match="unknown lint target 'tensorRT'.*known: tensorrt"):
        lint_file(fp32_onnx, "tensorRT")
    with pytest.raises(RescompressError, match="no such file: .*missing.onnx"):
        lint_file(tmp_path / "missing.onnx", "tensorrt")
    (tmp_path / "model.engine").write_bytes(b"\0" * 16)
    with pytest.raises(RescompressError, match="the tensorrt lint reads an ONNX file, got model.engine"):
        lint_file(tmp_path / "model.engine", "tensorrt")
    with pytest.raises(RescompressError, match="the tflite lint reads a .tflite file, got fp32.onnx"):
        lint_file(fp32_onnx, "tflite")


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(256), b""], ids=["random", "empty"])
def test_corrupt_onnx_is_a_clear_error(tmp_path, content):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(content)
    for target in ("tensorrt", "onnxruntime"):
        with pytest.raises(RescompressError, match="corrupt.onnx is not a readable ONNX model"):
            lint_file(path, target)


# ------------------------------------------------------------------ onnxruntime: the target device's CPU

def _cpu_profile(name: str, cpu: dict | None):
    from rescompress.devices import DeviceProfile

    return DeviceProfile.model_validate({"name": name, "runtimes": ["onnxruntime"],
                                         **({"cpu": cpu} if cpu is not None else {})})


OLD_XEON = {"model": "Xeon E5-2690 v4 (Broadwell)", "arch": "x86_64", "isa": ["avx2", "fma"]}
VNNI_XEON = {"model": "Xeon Gold 6248 (Cascade Lake)", "arch": "x86_64", "isa": ["avx2", "avx512f", "avx512_vnni"]}


@pytest.fixture(scope="module")
def u8s8_wide_onnx(fp32_onnx, digits_small, onnx_dir) -> Path:
    """onnxruntime's quantize_static with uint8 activations and full 8-bit per-channel weights."""
    from onnxruntime.quantization import QuantType

    path = _ort_quantize(fp32_onnx, digits_small, onnx_dir / "u8s8_wide.onnx", activation_type=QuantType.QUInt8,
                         weight_type=QuantType.QInt8, per_channel=True)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    assert any(w.dtype == np.int8 and w.ndim == 4 and np.abs(w.astype(np.int16)).max() > 64 for w in weights)
    return path


def _saturation(result: LintResult) -> list:
    return [f for f in result.findings if f.rule == "ort-u8s8-saturation"]


def test_u8s8_saturation_warns_for_an_x86_device_without_vnni(u8s8_wide_onnx):
    result = _actionable(lint_file(u8s8_wide_onnx, "onnxruntime", [_cpu_profile("old-xeon", OLD_XEON)]))
    (finding,) = _saturation(result)
    assert finding.severity == "warning" and "old-xeon" in finding.message and "without VNNI" in finding.message
    assert finding.node.startswith("DequantizeLinear") and "[-63, 63]" in finding.fix
    assert result.passed  # a warning: it runs, with a risk to accuracy


def test_no_saturation_warning_for_cpus_with_vnni_or_arm(u8s8_wide_onnx):
    from rescompress.devices import load_device

    devices = [_cpu_profile("new-xeon", VNNI_XEON), load_device("jetson-orin-nano"), load_device("jetson-agx-orin"),
               load_device("raspberry-pi-5")]
    result = lint_file(u8s8_wide_onnx, "onnxruntime", devices)
    assert _saturation(result) == [], [f.line() for f in result.findings]


def test_an_unknown_cpu_is_reported_as_unknown(u8s8_wide_onnx):
    result = _actionable(lint_file(u8s8_wide_onnx, "onnxruntime"))  # no device: the CPU is not known
    (finding,) = _saturation(result)
    assert finding.severity == "info" and "unknown" in finding.message and "--device" in finding.fix

    result = _actionable(lint_file(u8s8_wide_onnx, "onnxruntime", [_cpu_profile("board", None),
                                                                   _cpu_profile("old-xeon", OLD_XEON)]))
    by_severity = {f.severity: f for f in _saturation(result)}
    assert set(by_severity) == {"info", "warning"}
    assert "board" in by_severity["info"].message and "unknown" in by_severity["info"].message
    assert "no `cpu` section" in by_severity["info"].message and "old-xeon" in by_severity["warning"].message


def test_the_verdict_reads_this_hosts_cpuinfo_only_for_host_cpu(u8s8_wide_onnx, tmp_path, monkeypatch):
    import rescompress.devices
    from rescompress.devices import load_device

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    vnni, plain = tmp_path / "vnni", tmp_path / "plain"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n", encoding="utf-8")
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n", encoding="utf-8")
    devices = [_cpu_profile("old-xeon", OLD_XEON), _cpu_profile("new-xeon", VNNI_XEON),
               load_device("jetson-orin-nano"), load_device("host-cpu")]

    def verdicts() -> dict:
        found = _saturation(lint_file(u8s8_wide_onnx, "onnxruntime", devices))
        return {d.name: next((f.severity for f in found if f"{d.name} " in f.message), None) for d in devices}

    # the profiles' own CPUs decide, whatever this host's flags say; only host-cpu follows them
    profiles = {"old-xeon": "warning", "new-xeon": None, "jetson-orin-nano": None}
    monkeypatch.setattr(rescompress.devices, "CPUINFO", vnni)
    assert verdicts() == {**profiles, "host-cpu": None}
    monkeypatch.setattr(rescompress.devices, "CPUINFO", plain)
    assert verdicts() == {**profiles, "host-cpu": "warning"}
    monkeypatch.setattr(rescompress.devices, "CPUINFO", tmp_path / "missing")  # unreadable: unknown, not assumed
    assert verdicts() == {**profiles, "host-cpu": "info"}


def test_cli_lint_judges_the_named_device(u8s8_wide_onnx):
    import json

    from typer.testing import CliRunner

    from rescompress.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["lint", str(u8s8_wide_onnx), "--target", "onnxruntime", "--device",
                              "jetson-orin-nano", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["devices"] == ["jetson-orin-nano"]
    assert not [f for f in data["findings"] if f["rule"] == "ort-u8s8-saturation"]
    out = runner.invoke(app, ["lint", str(u8s8_wide_onnx), "--target", "onnxruntime", "--json"])
    assert [f["severity"] for f in json.loads(out.output)["findings"] if f["rule"] == "ort-u8s8-saturation"] == ["info"]
    out = runner.invoke(app, ["lint", str(u8s8_wide_onnx), "--target", "onnxruntime", "--device", "galaxy-s24"])
    assert out.exit_code == 2 and "galaxy-s24 does not run onnxruntime" in out.output
    out = runner.invoke(app, ["lint", str(u8s8_wide_onnx), "--target", "tensorrt", "--device", "jetson-orin-nano"])
    assert out.exit_code == 2 and "--device names the CPU" in out.output
