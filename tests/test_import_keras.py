"""Keras models import as rescompress models, with parity against TensorFlow measured on every import; every
bad input ends with one clear message."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_bench_tools import load_tool

pytestmark = pytest.mark.tensorflow
keras = pytest.importorskip("keras", reason="needs the 'tensorflow' extra: pip install 'rescompress[tensorflow]'")
pytest.importorskip("tensorflow")
layers = keras.layers

from rescompress.errors import BackendMissingError, ModelImportError  # noqa: E402
from rescompress.imports import measure_parity, random_inputs, read_imported, read_source, save_imported  # noqa: E402
from rescompress.models import GraphModel, build_arch  # noqa: E402


def randomise_bn(model, seed: int = 0) -> None:
    """BatchNormalization that is not the identity (fresh layers have mean 0, variance 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, c))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, c))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0, 0.1, c))


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """The tutorial-style functional ResNet (Rescaling, stride-2 'same' convs, softmax head), untrained."""
    model = load_tool("keras_resnet").build(size=16, widths=(8, 16))
    randomise_bn(model)
    path = tmp_path_factory.mktemp("keras") / "tutorial.keras"
    model.save(path)
    return path


def _import(path, **kw):
    imported, source = read_source(path, **kw)
    return imported, source, measure_parity(imported, source, random_inputs(imported, 16))


def test_a_tutorial_resnet_imports_as_a_graph_model_with_parity(tutorial):
    imported, source, parity = _import(tutorial)
    assert isinstance(imported.model, GraphModel)
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] is None  # random inputs: no labels
    assert parity["source_runtime"].startswith("tensorflow")
    # Rescaling(1/255) folded into the input spec: the torch model takes pixels/255 as they are
    assert imported.normalization == {"mean": [0.0], "std": [1.0]}
    assert imported.source_input.layout == "NHWC" and imported.source_input.scale == pytest.approx([255.0])
    assert any("softmax" in n for n in imported.notes)
    # a stride-2 'same' conv on an even input pads only bottom/right, as TensorFlow does
    conv = next(n for n in imported.arch["graph"]["nodes"] if n["name"] == "stage2_conv1")
    assert conv["stride"] == [2, 2] and conv["padding"] == [0, 1, 0, 1]
    assert isinstance(imported.model.get_submodule("stage2_conv1_pad"), torch.nn.ZeroPad2d)
    assert imported.model.get_submodule("stage2_conv1").padding == (0, 0)
    assert imported.model.get_submodule("stem_bn").eps == pytest.approx(1e-3)  # Keras's own epsilon


def test_the_import_is_a_plain_model_that_exports_prunes_and_reloads(tutorial, tmp_path):
    import torch_pruning as tp

    imported, _, parity = _import(tutorial)
    model = imported.model
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.Conv2d in kinds and torch.nn.BatchNorm2d in kinds and torch.nn.Linear in kinds
    x = torch.randn(2, 1, 16, 16)
    torch.export.export(model, (x,), strict=True)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    assert len(list(graph.get_all_groups(ignored_layers=[model.predictions]))) >= 3

    out = save_imported(tmp_path / "m.pth", imported, parity)
    payload = torch.load(out, map_location="cpu", weights_only=True)  # no pickled code
    again = build_arch(payload["arch"]).eval()
    again.load_state_dict(payload["state_dict"])
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert read_imported(out)["import"]["parity"]["max_abs_diff"] == parity["max_abs_diff"]
    meta = json.loads((tmp_path / "m.pth.json").read_text())
    assert meta["arch"]["name"] == "graph" and "state_dict" not in meta


def test_flatten_dense_rows_maxpool_same_and_normalization_fold(tmp_path):
    inp = keras.Input((9, 9, 3))
    norm = layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[900.0, 1600.0, 2500.0])
    x = norm(inp)
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(6)(x)
    model = keras.Model(inp, layers.Softmax()(x))
    model.save(tmp_path / "flat.keras")
    imported, source, parity = _import(tmp_path / "flat.keras")
    assert parity["max_abs_diff"] <= 1e-4
    assert imported.normalization["std"] == pytest.approx([30 / 255, 40 / 255, 50 / 255], rel=1e-5)
    assert imported.normalization["mean"] == pytest.approx([120 / 255, 110 / 255, 100 / 255], rel=1e-5)
    assert [n["op"] for n in imported.arch["graph"]["nodes"]] == ["conv", "relu", "maxpool", "flatten", "linear"]


def test_sequential_and_nested_models_and_legacy_h5(tmp_path):
    backbone_in = keras.Input((12, 12, 3))
    y = layers.Conv2D(4, 3, padding="same", name="inner_conv")(backbone_in)
    y = layers.BatchNormalization(name="inner_bn")(y)
    backbone = keras.Model(backbone_in, layers.ReLU(name="inner_relu")(y), name="backbone")
    inp = keras.Input((12, 12, 3))
    x = backbone(inp)
    x = layers.GlobalAveragePooling2D()(x)
    nested = keras.Model(inp, layers.Dense(3)(x))
    randomise_bn(backbone)
    nested.save(tmp_path / "nested.keras")
    assert _import(tmp_path / "nested.keras")[2]["max_abs_diff"] <= 1e-4

    seq = keras.Sequential([keras.Input((10, 10, 1)), layers.Conv2D(3, 3, activation="relu"),
                            layers.AveragePooling2D(2), layers.Flatten(), layers.Dropout(0.5), layers.Dense(4)])
    seq.save(tmp_path / "seq.h5")  # the legacy HDF5 format
    imported, _, parity = _import(tmp_path / "seq.h5")
    assert parity["max_abs_diff"] <= 1e-4 and imported.source["format"] == "keras"


@pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="needs tf_keras (the 'tensorflow' extra)")
def test_a_keras_2_savedmodel_directory_imports(tmp_path):
    import tf_keras

    inp = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inp)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.Activation("relu")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    model = tf_keras.Model(inp, tf_keras.layers.Dense(5, activation="softmax")(x))
    model.save(str(tmp_path / "saved"))  # a directory: the SavedModel format
    imported, _, parity = _import(tmp_path / "saved")
    assert parity["max_abs_diff"] <= 1e-4 and "tf_keras" in imported.source["runtime"]


def test_a_difference_names_the_first_layer_whose_output_differs(tutorial):
    imported, source = read_source(tutorial)
    with torch.no_grad():
        imported.model.get_submodule("stage2_bn2").running_mean += 0.5  # break one layer of the import
    with pytest.raises(ModelImportError, match=r"max \|Δlogit\| .* > 0\.0001 .*first layer whose output differs is "
                                               r"'stage2_bn2'"):
        measure_parity(imported, source, random_inputs(imported, 8))


# --------------------------------------------------------------------------------------------- bad input


def test_an_unsupported_layer_names_the_layer_its_type_and_the_supported_list(tmp_path):
    inp = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, name="dw")(inp)
    keras.Model(inp, layers.Dense(2)(layers.Flatten()(x))).save(tmp_path / "dw.keras")
    with pytest.raises(ModelImportError, match=r"layer 'dw' of type DepthwiseConv2D is not supported; supported: "
                                               r"InputLayer, Conv2D, BatchNormalization"):
        read_source(tmp_path / "dw.keras")
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(2, 3, activation="sigmoid", name="c")(inp)
    keras.Model(inp, layers.Dense(2)(layers.Flatten()(x))).save(tmp_path / "sig.keras")
    with pytest.raises(ModelImportError, match=r"layer 'c' of type Conv2D\(activation='sigmoid'\) is not supported"):
        read_source(tmp_path / "sig.keras")


@keras.saving.register_keras_serializable(package="rescompress_tests")
class _Subclassed(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.conv = layers.Conv2D(2, 3)
        self.head = layers.Dense(2)

    def call(self, x):
        return self.head(layers.Flatten()(self.conv(x)))


def test_a_subclassed_model_says_how_to_save_a_functional_one(tmp_path, monkeypatch):
    model = _Subclassed()
    model(np.zeros((1, 8, 8, 3), np.float32))
    model.save(tmp_path / "sub.keras")
    with pytest.raises(ModelImportError, match=r"subclassed Keras model \(_Subclassed\), whose layer graph cannot be "
                                               r"read; build it with the functional API"):
        read_source(tmp_path / "sub.keras")
    # where the class is not importable (the usual case: another program saved it), loading itself fails
    monkeypatch.delitem(keras.saving.get_custom_objects(), "rescompress_tests>_Subclassed")
    with pytest.raises(ModelImportError, match=r"holds a subclassed Keras model whose layer graph cannot be read "
                                               r"\(.*\); build it with the functional API"):
        read_source(tmp_path / "sub.keras")


def test_nan_weights_name_the_layer(tmp_path):
    inp = keras.Input((6, 6, 1))
    conv = layers.Conv2D(2, 3, name="bad_conv")
    model = keras.Model(inp, layers.Dense(2)(layers.Flatten()(conv(inp))))
    kernel = conv.kernel.numpy()
    kernel[0, 0, 0, 0] = np.nan
    conv.kernel.assign(kernel)
    model.save(tmp_path / "nan.keras")
    with pytest.raises(ModelImportError, match=r"layer 'bad_conv' kernel holds NaN"):
        read_source(tmp_path / "nan.keras")


def test_dynamic_size_needs_image_size_and_a_mismatch_is_refused(tmp_path, tutorial):
    inp = keras.Input((None, None, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(2, 3, padding="same")(inp))
    keras.Model(inp, layers.Dense(2)(x)).save(tmp_path / "dyn.keras")
    with pytest.raises(ModelImportError, match=r"dynamic spatial dimensions .*give image_size"):
        read_source(tmp_path / "dyn.keras")
    imported, _ = read_source(tmp_path / "dyn.keras", image_size=20)
    assert (imported.height, imported.width) == (20, 20)
    with pytest.raises(ModelImportError, match=r"takes 16x16 inputs, but image_size 24 was asked for"):
        read_source(tutorial, image_size=24)
    with pytest.raises(ModelImportError, match=r"takes 1-channel inputs, but the data has 3 channels"):
        read_source(tutorial, channels=3)


def test_a_file_from_a_newer_keras_is_refused(tutorial, tmp_path):
    newer = tmp_path / "newer.keras"
    with zipfile.ZipFile(tutorial) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "metadata.json":
                meta = json.loads(data)
                meta["keras_version"] = "9.1.0"
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    with pytest.raises(ModelImportError, match=r"saved by Keras 9\.1\.0, newer than the installed Keras"):
        read_source(newer)


def test_a_missing_tensorflow_extra_names_the_extra(tutorial, monkeypatch):
    from rescompress.imports import keras_import

    real = importlib.util.find_spec
    monkeypatch.setattr(keras_import.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorflow", "keras") else real(name, *a))
    with pytest.raises(BackendMissingError, match=r"pip install 'rescompress\[tensorflow\]'"):
        read_source(tutorial)


def test_not_a_model_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelImportError, match=r"not a model file rescompress imports"):
        read_source(tmp_path / "notes.txt")
    with pytest.raises(ModelImportError, match=r"model file not found"):
        read_source(tmp_path / "absent.keras")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelImportError, match=r"not a Keras \.keras archive"):
        read_source(tmp_path / "broken.keras")


def test_the_import_command_exits_2_with_one_message(tmp_path):
    from typer.testing import CliRunner

    from rescompress.cli import app

    inp = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, name="dw")(inp)
    keras.Model(inp, layers.Dense(2)(layers.Flatten()(x))).save(tmp_path / "dw.keras")
    result = CliRunner().invoke(app, ["import", str(tmp_path / "dw.keras")], catch_exceptions=False)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith("error: layer 'dw' of type DepthwiseConv2D is not supported; supported:")
    assert "Traceback" not in result.output and not (tmp_path / "dw.pth").exists()


def test_a_model_with_another_class_count_gets_a_fresh_classifier(tmp_path):
    """A 5-class Keras model fine-tuned on 10-class digits: everything but the classifier is imported, parity is
    still measured on the recipe's images (without labels: the classes differ)."""
    import copy

    from rescompress.pipeline import make_plan
    from rescompress.recipe import parse_recipe
    from tests.conftest import TINY_RECIPE

    model = load_tool("keras_resnet").build(size=16, classes=5, widths=(8, 16))
    model.save(tmp_path / "five.keras")
    r = copy.deepcopy(TINY_RECIPE)
    r["model"] = {"weights": str(tmp_path / "five.keras")}
    r["data"] = {"name": "digits"}
    plan = make_plan(parse_recipe(r, "test"))
    assert plan.arch["num_classes"] == 10 and plan.start.num_classes == 5
    assert "'predictions' keeps a fresh initialisation and needs training" in plan.weights_note
    parity = plan.start.parity
    assert parity["inputs"] == "real" and parity["max_abs_diff"] <= 1e-4 and parity["top1"] is None
    assert parity["top1_agreement"] is not None  # the two models' predictions still agree or not
