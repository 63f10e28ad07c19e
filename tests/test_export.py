from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from rescompress.data import InputSpec
from rescompress.export import TARGETS, parity, top1
from rescompress.export.onnx import OnnxConfig
from rescompress.export.torch_eager import torch_artifact
from rescompress.models import build_model

SPEC = InputSpec(channels=1, height=32, width=32, mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=10, in_channels=1).eval()


@pytest.fixture(scope="module")
def onnx_artifact(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    return TARGETS.get("onnx").export(model, torch.zeros(1, 1, 32, 32), OnnxConfig(), path, spec=SPEC,
                                      from_stage="baseline")


def test_onnx_file_is_self_contained_with_dynamic_batch(onnx_artifact):
    proto = onnx.load(str(onnx_artifact.path))
    onnx.checker.check_model(proto)
    assert not list(onnx_artifact.path.parent.glob("*.data")), "weights must live inside the .onnx file"
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert onnx_artifact.runtime.startswith("onnxruntime ")
    assert onnx_artifact.to_report()["input_spec"]["height"] == 32


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_matches_torch(model, onnx_artifact, batch):
    ref = torch_artifact(model, SPEC, name="torch-fp32", precision="fp32", from_stage="baseline", checkpoint=None)
    x = np.random.default_rng(batch).standard_normal((batch, 1, 32, 32)).astype(np.float32)
    out = onnx_artifact(x)
    assert out.shape == (batch, 10)
    stats = parity(onnx_artifact, ref, x)
    assert stats["max_abs_diff"] < 1e-4 and stats["top1_agreement"] == 1.0


def test_parity_and_top1_detect_a_different_model(model):
    other = build_model("resnet_tiny", num_classes=10, in_channels=1).eval()
    a = torch_artifact(model, SPEC, name="a", precision="fp32", from_stage="", checkpoint=None)
    b = torch_artifact(other, SPEC, name="b", precision="fp32", from_stage="", checkpoint=None)
    x = np.random.default_rng(0).standard_normal((16, 1, 32, 32)).astype(np.float32)
    assert parity(a, b, x)["max_abs_diff"] > 1e-3
    labels = a(x).argmax(1)
    assert top1(a, x, labels, batch_size=5) == 1.0
    assert top1(a, x, (labels + 1) % 10) == 0.0


def test_artifact_save_and_release(onnx_artifact, tmp_path):
    copy = onnx_artifact.save(tmp_path / "copy.onnx")
    assert copy.read_bytes() == onnx_artifact.path.read_bytes()
    onnx_artifact.release()
    assert onnx_artifact(np.zeros((1, 1, 32, 32), np.float32)).shape == (1, 10)


def test_onnx_config_is_strict():
    with pytest.raises(Exception, match="opset"):
        OnnxConfig(opset=11)
    with pytest.raises(Exception, match="extra"):
        OnnxConfig.model_validate({"dynamic": True})
