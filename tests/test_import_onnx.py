"""ONNX import: registry ResNets exported by both torch exporters and hand-made graphs become GraphModels whose
logits match onnxruntime's; what cannot be mapped is refused with a message that says why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rescompress.errors import ModelImportError
from rescompress.imports.onnx_import import SUPPORTED_OPS, OnnxSource, read_onnx
from rescompress.models import build_arch, build_model

TOL = 1e-4
RNG = np.random.default_rng(0)


def _randomise_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BatchNorm statistics and affine parameters, so no BatchNorm is the identity; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def _registry(name: str, small_input: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(build_model(name, num_classes=10, in_channels=3, small_input=small_input), seed)


def _inputs(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def resnet20_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("r20") / "resnet20.onnx"
    model = _registry("resnet20", True, 1)
    torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=True, optimize=False,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return path


@pytest.fixture(scope="module")
def resnet20(resnet20_file):
    return read_onnx(resnet20_file)


def test_resnet20_from_the_dynamo_exporter_matches_onnxruntime(resnet20_file, resnet20):
    assert {"BatchNormalization", "Shape", "Expand", "CastLike"} <= _ops(resnet20_file)
    imported, source = resnet20
    x = _inputs(32, 32, seed=1)
    assert np.abs(_logits(imported.model, x) - source.logits(x)).max() <= TOL
    ops = [n["op"] for n in imported.arch["graph"]["nodes"]]
    assert ops.count("batchnorm") == 21 and ops.count("conv") == 21 and ops.count("add") == 9
    assert ops[-1] == "linear" and imported.model.classifier_name == imported.arch["graph"]["output"]
    assert not imported.model.training and imported.num_classes == 10
    assert (imported.channels, imported.height, imported.width) == (3, 32, 32)
    assert imported.source["format"] == "onnx" and imported.source["runtime"].startswith("onnxruntime ")
    assert imported.source["architecture"].startswith("ONNX graph, ")
    assert imported.source["architecture"].endswith("nodes (opset 20)")
    assert imported.normalization is None and imported.source_input.apply(x).shape == x.shape
    assert any("all-zero bias" in n for n in imported.notes)


@pytest.mark.slow
def test_resnet18_at_224_matches_onnxruntime_in_the_files_fixed_batch(tmp_path):
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(_registry("resnet18", False, 2), (torch.zeros(2, 3, 224, 224),), str(path), dynamo=True,
                      optimize=False)
    assert {"BatchNormalization", "MaxPool"} <= _ops(path)
    imported, source = read_onnx(path)
    assert source.batch == 2 and any("fixed at 2" in n for n in imported.notes)
    x = _inputs(7, 224, seed=2)
    assert np.abs(_logits(imported.model, x) - source.logits(x)).max() <= TOL


def test_resnet_tiny_from_the_legacy_exporter_matches_onnxruntime(tmp_path):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(_registry("resnet_tiny", True, 3), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                      do_constant_folding=False, keep_initializers_as_inputs=True, input_names=["image"],
                      output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    assert {"BatchNormalization", "GlobalAveragePool", "Flatten", "Gemm"} <= _ops(path)
    assert len(onnx.load(str(path)).graph.input) > 1, "the initializers are listed as inputs, too"
    imported, source = read_onnx(path, image_size=32, channels=3)
    x = _inputs(16, 32, seed=3)
    assert source.batch is None
    assert np.abs(_logits(imported.model, x) - source.logits(x)).max() <= TOL
    assert [n["op"] for n in imported.arch["graph"]["nodes"]][-3:] == ["global_avgpool", "flatten", "linear"]


def _f32(*shape, scale=0.3):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _save(path, nodes, inits, *, shape=("N", 3, 17, 17), outputs=("logits",), opset=17, inputs=("image",)):
    graph = helper.make_graph(
        nodes, "handmade",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, list(shape)) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _pad_conv_pool_gemm(path, *, shape=("N", 3, 17, 17), nan=False, auto_pad="SAME_UPPER"):
    """Asymmetric Pad, a stride-2 SAME_UPPER conv (asymmetric at 18x19), an asymmetric MaxPool, Flatten, Gemm."""
    w1 = _f32(8, 3, 3, 3)
    if nan:
        w1[0, 0, 0, 0] = np.nan
    inits = {"pads": np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64), "w1": w1, "b1": _f32(8),
             "fc_w": _f32(160, 10, scale=0.1), "fc_b": _f32(10)}
    nodes = [helper.make_node("Pad", ["image", "pads"], ["padded"], name="pad0"),
             helper.make_node("Conv", ["padded", "w1", "b1"], ["c1"], name="conv1", auto_pad=auto_pad,
                              strides=[2, 2], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 0, 0, 1]),
             helper.make_node("Flatten", ["p1"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=0)]
    return _save(path, nodes, inits, shape=shape)


@pytest.mark.parametrize("auto_pad, conv_padding", [("SAME_UPPER", [0, 1, 1, 1]), ("SAME_LOWER", [1, 0, 1, 1])])
def test_handmade_pad_same_conv_maxpool_flatten_gemm(tmp_path, auto_pad, conv_padding):
    imported, source = read_onnx(_pad_conv_pool_gemm(tmp_path / "a.onnx", auto_pad=auto_pad))
    nodes = {n["name"]: n for n in imported.arch["graph"]["nodes"]}
    assert nodes["pad0"]["padding"] == [1, 0, 0, 2]
    assert nodes["conv1"]["padding"] == conv_padding and nodes["conv1"]["bias"]
    assert nodes["pool1"]["padding"] == [1, 0, 0, 1]
    assert nodes["fc"]["in_features"] == 160 and imported.model.classifier_name == "fc"
    assert imported.layer_map == {"pad0": "padded", "conv1": "c1", "relu1": "r1", "pool1": "p1", "flat": "flat",
                                  "fc": "logits"}
    x = _inputs(5, 17, seed=4)
    assert np.abs(_logits(imported.model, x) - source.logits(x)).max() <= TOL


def _folds_and_softmax(path):
    """Conv + constant Add (a bias), BatchNorm, Identity, asymmetric AveragePool counting its padding, a dilated
    depthwise conv, a residual Add, ReduceMean, Dropout, MatMul + Add, and a final Softmax."""
    inits = {"w1": _f32(6, 3, 3, 3), "c1": _f32(1, 6, 1, 1), "scale": _f32(6) + 1, "shift": _f32(6),
             "mean": _f32(6), "var": np.abs(_f32(6)) + 0.5, "dw": _f32(6, 1, 3, 3), "dw_b": _f32(6),
             "fc_w": _f32(6, 5), "fc_b": _f32(5)}
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1_out"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "c1_out"], ["biased"], name="bias1"),
             helper.make_node("BatchNormalization", ["biased", "scale", "shift", "mean", "var"], ["bn"], name="bn1",
                              epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
             helper.make_node("Identity", ["r1"], ["r1_id"], name="same"),
             helper.make_node("AveragePool", ["r1_id"], ["p1"], name="avg", kernel_shape=[2, 2], strides=[2, 2],
                              pads=[0, 0, 1, 1], count_include_pad=1),
             helper.make_node("Conv", ["p1", "dw", "dw_b"], ["dw_out"], name="dwconv", group=6, dilations=[2, 2],
                              pads=[2, 2, 2, 2]),
             helper.make_node("Add", ["dw_out", "p1"], ["res"], name="residual"),
             helper.make_node("ReduceMean", ["res"], ["gap"], name="gap", axes=[-2, -1], keepdims=0),
             helper.make_node("Dropout", ["gap"], ["drop"], name="drop"),
             helper.make_node("MatMul", ["drop", "fc_w"], ["mm"], name="fc"),
             helper.make_node("Add", ["mm", "fc_b"], ["fc_out"], name="fc_bias"),
             helper.make_node("Softmax", ["fc_out"], ["probs"], name="softmax")]
    return _save(path, nodes, inits, shape=("N", 3, 16, 16), outputs=("probs",), opset=13)


def test_constant_adds_fold_into_biases_and_a_final_softmax_is_dropped(tmp_path):
    imported, source = read_onnx(_folds_and_softmax(tmp_path / "b.onnx"))
    nodes = imported.arch["graph"]["nodes"]
    assert [n["op"] for n in nodes] == ["conv", "batchnorm", "relu", "pad", "avgpool", "conv", "add",
                                        "global_avgpool", "linear"]
    by_name = {n["name"]: n for n in nodes}
    assert by_name["conv1"]["bias"] and by_name["fc"]["bias"] and by_name["dwconv"]["groups"] == 6
    assert imported.layer_map["conv1"] == "biased" and imported.layer_map["fc"] == "fc_out"
    assert any("dropped the final Softmax 'softmax'" in n for n in imported.notes)
    assert source.output == "fc_out"
    x = _inputs(6, 16, seed=5)
    logits = source.logits(x)
    assert not np.allclose(logits.sum(1), 1.0)
    assert np.abs(_logits(imported.model, x) - logits).max() <= TOL


def test_an_unsupported_op_names_the_node_its_type_and_the_supported_ops(tmp_path):
    inits = {"w": _f32(4, 3, 3, 3), "fc_w": _f32(10, 4)}
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="gate"),
             helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc", transB=1)]
    path = _save(tmp_path / "sig.onnx", nodes, inits)
    supported = ", ".join(SUPPORTED_OPS)
    with pytest.raises(ModelImportError, match=rf"^layer 'gate' of type Sigmoid is not supported; supported: "
                                               rf"{supported}$"):
        read_onnx(path)
    nodes[1] = helper.make_node("Softmax", ["c"], ["s"], name="mid_softmax", axis=1)
    with pytest.raises(ModelImportError, match=r"layer 'mid_softmax' of type Softmax is not supported \(Softmax is "
                                               r"supported only as the graph's last op.*\); supported: Conv, "):
        read_onnx(_save(tmp_path / "soft.onnx", nodes, inits))
    inits["shift"] = _f32(1, 4, 1, 1)
    nodes[1] = helper.make_node("Relu", ["c"], ["r"], name="relu")
    nodes.insert(2, helper.make_node("Add", ["r", "shift"], ["s"], name="shift_add"))
    with pytest.raises(ModelImportError, match=r"layer 'shift_add' of type Add is not supported \(it adds a constant, "
                                               r"which is supported only right after a Conv, Gemm or MatMul"):
        read_onnx(_save(tmp_path / "add.onnx", nodes, inits))
    inits["target"] = np.array([-1, 4], np.int64)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "target"], ["f"], name="rows"),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc", transB=1)]
    with pytest.raises(ModelImportError, match=r"layer 'rows' of type Reshape is not supported \(target shape "
                                               r"\[-1, 4\] of a \[N, 4, 15, 15\] tensor"):
        read_onnx(_save(tmp_path / "reshape.onnx", nodes, inits))


def test_dynamic_spatial_dimensions_need_image_size(tmp_path):
    path = _pad_conv_pool_gemm(tmp_path / "dyn.onnx", shape=("N", 3, "H", "W"))
    with pytest.raises(ModelImportError, match=r"has dynamic spatial dimensions \(HxW\); give image_size "
                                               r"\(import --image-size N, or data.image_size in the recipe\)"):
        read_onnx(path)
    imported, source = read_onnx(path, image_size=17)
    assert (imported.height, imported.width) == (17, 17)
    assert any("imported for 17x17" in n for n in imported.notes)
    x = _inputs(3, 17, seed=6)
    assert np.abs(_logits(imported.model, x) - source.logits(x)).max() <= TOL


def test_a_mismatched_image_size_or_channel_count_is_refused(resnet20_file):
    with pytest.raises(ModelImportError, match=r"takes 32x32 inputs, but image_size 64 was asked for"):
        read_onnx(resnet20_file, image_size=64)
    with pytest.raises(ModelImportError, match=r"takes 3-channel inputs, but channels 1 was asked for"):
        read_onnx(resnet20_file, channels=1)
    assert read_onnx(resnet20_file, image_size=32, channels=3)[0].height == 32


def test_a_nan_initializer_is_refused_naming_the_tensor(tmp_path):
    with pytest.raises(ModelImportError, match=r"tensor 'w1' holds NaN \(1 of 216 values"):
        read_onnx(_pad_conv_pool_gemm(tmp_path / "nan.onnx", nan=True))


def test_files_that_are_not_single_input_single_output_onnx_models_are_refused(tmp_path):
    with pytest.raises(ModelImportError, match=r"ONNX file '.*missing.onnx' does not exist"):
        read_onnx(tmp_path / "missing.onnx")
    (tmp_path / "text.onnx").write_text("not an onnx model\n" * 20)
    with pytest.raises(ModelImportError, match=r"is not an ONNX model"):
        read_onnx(tmp_path / "text.onnx")
    two_in = [helper.make_node("Add", ["a", "b"], ["logits"], name="join")]
    with pytest.raises(ModelImportError, match=r"has 2 inputs \(a, b\); rescompress imports single-input"):
        read_onnx(_save(tmp_path / "two_in.onnx", two_in, {}, inputs=("a", "b")))
    two_out = [helper.make_node("Relu", ["image"], ["r"], name="relu"),
               helper.make_node("Relu", ["r"], ["logits"], name="relu2")]
    with pytest.raises(ModelImportError, match=r"has 2 outputs \(r, logits\)"):
        read_onnx(_save(tmp_path / "two_out.onnx", two_out, {}, outputs=("r", "logits")))


def test_the_imported_model_exports_strictly_and_reloads_from_its_state_dict(resnet20, tmp_path):
    imported, _ = resnet20
    torch.export.export(imported.model, (torch.zeros(2, 3, 32, 32),), strict=True)
    torch.save({"arch": imported.arch, "state_dict": imported.model.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    rebuilt = build_arch(ckpt["arch"])
    rebuilt.load_state_dict(ckpt["state_dict"])
    x = _inputs(4, 32, seed=7)
    assert np.array_equal(_logits(rebuilt.eval(), x), _logits(imported.model, x))


def test_layer_outputs_return_the_named_intermediate_tensors(resnet20):
    imported, source = resnet20
    names = [n["name"] for n in imported.arch["graph"]["nodes"]]
    picked = [names[0], names[1], next(n for n in names if imported.arch["graph"]["nodes"][names.index(n)]["op"]
                                       == "add"), names[-2], names[-1]]
    x = _inputs(3, 32, seed=8)
    with torch.no_grad():
        ours = imported.model.forward_all(torch.from_numpy(x))
    theirs = source.layer_outputs(x, [imported.layer_map[n] for n in picked])
    assert set(theirs) == {imported.layer_map[n] for n in picked}
    for name in picked:
        got = theirs[imported.layer_map[name]]
        assert got.shape == tuple(ours[name].shape), name
        assert np.abs(got - ours[name].numpy()).max() <= TOL * max(1.0, float(np.abs(got).max())), name
    assert theirs[imported.layer_map[names[0]]].shape == (3, 16, 32, 32)
    again = OnnxSource(source.path).layer_outputs(x, [imported.layer_map[names[0]]])
    assert np.array_equal(again[imported.layer_map[names[0]]], theirs[imported.layer_map[names[0]]])
