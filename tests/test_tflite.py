"""TFLite exports converted for real (litert-torch, onnx2tf) and run in the LiteRT interpreter."""

from __future__ import annotations

import copy
import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import make_ctx
from rescompress.compress.quantize import PTQConfig, quantize_ptq
from rescompress.errors import BackendMissingError
from rescompress.export.artifact import parity, top1
from rescompress.export.lint import lint_file, tflite_ops
from rescompress.export.tflite import TFLiteConfig, export_tflite, unfold_int8_weights

needs_litert = pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None,
                                  reason="needs the 'tflite' extra: pip install 'rescompress[tflite]'")
needs_onnx2tf = pytest.mark.skipif(importlib.util.find_spec("onnx2tf") is None or importlib.util.find_spec("tf_keras") is None,
                                   reason="needs the 'tensorflow' extra and tf-keras (tools/install_tensorflow_extra.sh)")


@pytest.fixture(scope="module")
def int8_tiny(trained_tiny, digits_small, tmp_path_factory):
    """The tiny ResNet quantized in the LiteRT layout (PTQ on real digits)."""
    ctx = make_ctx(digits_small, tmp_path_factory.mktemp("ptq"), trained_tiny)
    return quantize_ptq(copy.deepcopy(trained_tiny), ctx, PTQConfig(calibration_batches=4), "tflite", observer="minmax")


def _export(model, data, tmp_path, **cfg):
    spec = data.input_spec
    images = spec.normalize_numpy(data.train.images.numpy())
    config = TFLiteConfig(**cfg)
    return export_tflite(model, torch.zeros(2, spec.channels, spec.height, spec.width), config,
                         tmp_path / f"{config.converter}-{config.precision}-{config.layout}.tflite", spec=spec,
                         from_stage="test", calibration=lambda n: images[:n])


def _torch(model):
    @torch.no_grad()
    def run(x):
        return model(torch.from_numpy(x)).numpy()
    return run


def _test_inputs(data):
    return data.input_spec.normalize_numpy(data.test.images.numpy()), data.test.labels.numpy()


@pytest.mark.tflite
@needs_litert
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fp32_litert_matches_torch(trained_tiny, digits_small, tmp_path, layout):
    art = _export(trained_tiny, digits_small, tmp_path, layout=layout)
    x, y = _test_inputs(digits_small)
    p = parity(art, _torch(trained_tiny), x)
    assert p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0
    assert top1(art, x, y) == top1(_torch(trained_tiny), x, y)
    shape = _input_shape(art.path)
    spec = digits_small.input_spec
    assert shape == ([1, spec.height, spec.width, spec.channels] if layout == "nhwc" else [1, spec.channels, spec.height, spec.width])
    assert art.input_spec.layout == layout.upper()
    result = lint_file(art.path, "tflite")
    assert result.passed and not result.findings
    assert art.details["converter"] == "litert_torch"


def _input_shape(path):
    from rescompress.export.tflite import litert_interpreter

    return [int(d) for d in litert_interpreter(path).get_input_details()[0]["shape"]]


@pytest.mark.tflite
@needs_litert
def test_fp16_halves_the_weights(trained_tiny, digits_small, tmp_path):
    fp32 = _export(trained_tiny, digits_small, tmp_path)
    fp16 = _export(trained_tiny, digits_small, tmp_path, precision="fp16")
    assert fp16.size_bytes < 0.75 * fp32.size_bytes
    x, _ = _test_inputs(digits_small)
    p = parity(fp16, _torch(trained_tiny), x)
    assert p["max_abs_diff"] < 0.05 and p["top1_agreement"] >= 0.99
    ops, tensors = tflite_ops(fp16.path)
    assert any(tensors[t]["dtype"] == "float16" for op in ops for t in op["inputs"])


@pytest.mark.tflite
@needs_litert
def test_unfolded_weights_are_the_same_integers(int8_tiny, digits_small):
    x, _ = _test_inputs(digits_small)
    unfolded = unfold_int8_weights(int8_tiny)
    assert np.array_equal(_torch(unfolded)(x), _torch(int8_tiny)(x))
    assert any(n.target == torch.ops.quantized_decomposed.quantize_per_channel.default for n in unfolded.graph.nodes)


@pytest.mark.tflite
@needs_litert
def test_int8_from_the_pt2e_model_is_integer_only_and_agrees(int8_tiny, trained_tiny, digits_small, tmp_path):
    art = _export(int8_tiny, digits_small, tmp_path, precision="int8")
    x, y = _test_inputs(digits_small)
    p = parity(art, _torch(int8_tiny), x)
    assert p["top1_agreement"] >= 0.98, p
    assert abs(top1(art, x, y) - top1(_torch(int8_tiny), x, y)) <= 0.02
    result = lint_file(art.path, "tflite")
    assert result.passed and not result.errors, [f.line() for f in result.findings]
    ops, tensors = tflite_ops(art.path)
    assert {"CONV_2D", "ADD", "FULLY_CONNECTED"} <= {op["name"] for op in ops}
    assert all(not tensors[t]["dtype"].startswith("float") for op in ops for t in op["inputs"] + op["outputs"])
    assert art.details["scheme"] == "tflite"
    fp32 = _export(trained_tiny, digits_small, tmp_path)
    assert art.size_bytes < 0.6 * fp32.size_bytes


@pytest.mark.tflite
@needs_litert
def test_lint_names_a_layer_left_in_float(trained_tiny, digits_small, tmp_path):
    ctx = make_ctx(digits_small, tmp_path / "w", trained_tiny)
    mixed = quantize_ptq(copy.deepcopy(trained_tiny), ctx, PTQConfig(calibration_batches=2), "tflite",
                         observer="minmax", keep_float=["fc"])
    art = _export(mixed, digits_small, tmp_path, precision="int8")
    result = lint_file(art.path, "tflite")
    assert not result.passed
    bad = [f for f in result.errors if f.rule == "tflite-float-op"]
    assert bad and any(f.node.startswith("FULLY_CONNECTED") for f in bad) and all(f.fix for f in bad)


@pytest.mark.tflite
@needs_litert
def test_int8_export_needs_the_int8_model(trained_tiny, digits_small, tmp_path):
    with pytest.raises(ValueError, match="qat or ptq"):
        _export(trained_tiny, digits_small, tmp_path, precision="int8")


def test_missing_backend_names_the_extra(trained_tiny, digits_small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # what an absent package looks like to import
    with pytest.raises(BackendMissingError, match=r"rescompress\[tflite\]"):
        _export(trained_tiny, digits_small, tmp_path)


def test_config_rejects_unknown_keys():
    with pytest.raises(Exception, match="extra"):
        TFLiteConfig(precision="fp32", quantize=True)


@pytest.mark.tensorflow
@needs_onnx2tf
def test_onnx2tf_fp32_and_int8(trained_tiny, digits_small, tmp_path):
    x, y = _test_inputs(digits_small)
    fp32 = _export(trained_tiny, digits_small, tmp_path, converter="onnx2tf")
    assert parity(fp32, _torch(trained_tiny), x)["max_abs_diff"] < 1e-4
    int8 = _export(trained_tiny, digits_small, tmp_path, converter="onnx2tf", precision="int8", calibration_batches=4)
    assert lint_file(int8.path, "tflite").passed
    assert top1(int8, x, y) >= top1(_torch(trained_tiny), x, y) - 0.05
    assert "post-training" in int8.details["quantization"]
