"""keras.applications ResNets onto the registry's *_keras models: the layouts, recognition, the input contract,
and logits parity with Keras on randomised weights and BatchNorm statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rescompress.errors import ModelImportError
from rescompress.imports.keras_apps import import_keras_application, match_keras_application
from rescompress.models import MODELS, build_model
from rescompress.models.resnet import BasicBlock, ResNet

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

pytestmark = pytest.mark.tensorflow

KERAS_NAMES = [f"resnet{n}{v}_keras" for n in (50, 101, 152) for v in ("", "v2")]
APPS = {"resnet50_keras": "ResNet50", "resnet101_keras": "ResNet101", "resnet152_keras": "ResNet152",
        "resnet50v2_keras": "ResNet50V2", "resnet101v2_keras": "ResNet101V2", "resnet152v2_keras": "ResNet152V2"}
BATCH = 8


def app(name: str, **kw):
    keras.utils.set_random_seed(0)
    return getattr(keras.applications, APPS[name])(weights=None, **kw)


def randomise(kmodel, seed: int = 0):
    """Random BatchNorm statistics and affine terms, conv and Dense biases (the kernels keep Keras' init)."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(kmodel):
        w = layer.get_weights()
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            c = w[0].shape
            layer.set_weights([rng.uniform(0.8, 1.2, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                               rng.uniform(0.5, 1.5, c)])
        elif kind in ("Conv2D", "Dense") and len(w) == 2:
            layer.set_weights([w[0], rng.normal(0, 0.05, w[1].shape)])
    return kmodel


def _all_layers(kmodel):
    for layer in kmodel.layers:
        yield from _all_layers(layer) if hasattr(layer, "layers") else [layer]


def linear_head(kmodel, dense_name: str):
    kmodel.get_layer(dense_name).activation = keras.activations.linear
    return kmodel


def torch_inputs(imp, n: int, seed: int = 0) -> np.ndarray:
    """Uniform RGB pixels in [0, 1], normalised as the import records."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 1, (n, imp.channels, imp.height, imp.width)).astype(np.float32)
    mean = np.asarray(imp.normalization["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(imp.normalization["std"], np.float32).reshape(1, -1, 1, 1)
    return (pixels - mean) / std


def max_logit_gap(kmodel, imp, n: int) -> tuple[float, float]:
    """max |torch - Keras| over `n` seeded inputs, and the largest |logit|, in batches of BATCH."""
    x = torch_inputs(imp, n)
    gap, scale = 0.0, 0.0
    for i in range(0, n, BATCH):
        xb = x[i:i + BATCH]
        ref = np.asarray(kmodel(imp.source_input.apply(xb), training=False))
        with torch.no_grad():
            got = imp.model(torch.from_numpy(xb)).numpy()
        gap = max(gap, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return gap, scale


def headless_with_head(name: str, size, *, nested: str = "", classes: int = 10, dropout: bool = True):
    """include_top=False + GAP (+ Dropout) + Dense(softmax); `nested`: "functional" or "sequential" wraps the
    backbone as one layer."""
    base = app(name, include_top=False, input_shape=(size, size, 3) if size else (None, None, 3))
    if nested == "sequential":
        head = [keras.layers.GlobalAveragePooling2D(name="gap")] + ([keras.layers.Dropout(0.3, name="drop")]
                                                                   if dropout else [])
        return keras.Sequential([keras.Input(base.input_shape[1:]), base, *head,
                                 keras.layers.Dense(classes, activation="softmax", name="head")])
    if nested:
        inputs = keras.Input(base.input_shape[1:])
        x = keras.layers.GlobalAveragePooling2D(name="gap")(base(inputs))
    else:
        inputs, x = base.input, keras.layers.GlobalAveragePooling2D(name="gap")(base.output)
    if dropout:
        x = keras.layers.Dropout(0.3, name="drop")(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, out)


@pytest.fixture(scope="module")
def r50():
    return randomise(app("resnet50_keras", input_shape=(64, 64, 3)), seed=1)


@pytest.fixture(scope="module")
def r50v2():
    return randomise(app("resnet50v2_keras", input_shape=(64, 64, 3)), seed=2)


# --- the torch layouts -----------------------------------------------------------------------------------------

def test_registry_names_and_param_counts():
    assert set(KERAS_NAMES) | {"resnet101", "resnet152"} <= set(MODELS.names())
    with torch.device("meta"):  # shapes only: no memory, no init
        counts = {name: sum(p.numel() for p in build_model(name).parameters())
                  for name in ("resnet101", "resnet152", "resnet50_keras")}
        assert build_model("resnet152_keras").state_dict().keys() == build_model("resnet152").state_dict().keys()
    assert counts == {"resnet101": 44_549_160, "resnet152": 60_192_808, "resnet50_keras": 25_557_032}
    model = build_model("resnet101v2_keras", num_classes=7, in_channels=1, small_input=True)
    assert model.rescompress_arch == {"name": "resnet101v2_keras", "num_classes": 7, "in_channels": 1,
                                      "small_input": True}
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    assert model.stage_names == ["layer1", "layer2", "layer3", "layer4"] and model.fc.out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_v1_stride_on_the_first_1x1_and_keras_epsilon():
    keras_v1, tv = build_model("resnet50_keras"), build_model("resnet50")
    for stage in ("layer2", "layer3", "layer4"):
        k, t = getattr(keras_v1, stage)[0], getattr(tv, stage)[0]
        assert k.conv1.stride == (2, 2) and k.conv2.stride == (1, 1) and k.downsample[0].stride == (2, 2)
        assert t.conv1.stride == (1, 1) and t.conv2.stride == (2, 2)
    bns = [m for m in keras_v1.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(m.eps == 1.001e-5 for m in bns)
    assert all(m.eps == 1e-5 for m in tv.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.bias is None for m in keras_v1.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="needs Bottleneck"):
        ResNet(BasicBlock, (1,), (8,), num_classes=2, in_channels=3, stem="small", stride_on="1x1")


def test_v2_downsamples_in_the_last_block_of_the_first_three_stages():
    model = build_model("resnet50v2_keras").eval()
    for stage, depth in zip(model.stage_names, (3, 4, 6, 3)):
        blocks = list(getattr(model, stage))
        assert len(blocks) == depth
        first, last = blocks[0], blocks[-1]
        assert first.downsample.kernel_size == (1, 1) and first.downsample.stride == (1, 1)
        assert first.downsample.bias is not None and first.subsample is None
        want = (1, 1) if stage == "layer4" else (2, 2)
        assert last.conv2.stride == want and last.conv1.stride == (1, 1)
        assert (last.subsample is None) == (stage == "layer4")
        if last.subsample is not None:
            assert last.subsample.kernel_size == 1 and last.subsample.stride == 2
        assert all(b.conv2.stride == (1, 1) and b.downsample is None for b in blocks[1:-1])
    sizes = {}
    for name in model.stage_names:
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, out.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v[1:]) for k, v in sizes.items()} == {
        "layer1": (256, 8, 8), "layer2": (512, 4, 4), "layer3": (1024, 2, 2), "layer4": (2048, 2, 2)}
    assert all(m.eps == 1.001e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_v2_state_dict_keys():
    sd = build_model("resnet50v2_keras").state_dict()
    assert {"conv1.weight", "conv1.bias", "post_bn.running_var", "fc.weight", "fc.bias",
            "layer1.0.downsample.weight", "layer1.0.downsample.bias", "layer1.0.bn0.weight",
            "layer1.2.conv2.weight", "layer4.2.conv3.bias", "layer3.5.bn2.running_mean"} <= sd.keys()
    assert "layer1.1.downsample.weight" not in sd and "layer1.0.conv1.bias" not in sd and "bn1.weight" not in sd
    assert not any("relu" in k or "pool" in k or "subsample" in k for k in sd)
    assert sd["layer2.0.downsample.weight"].shape == (512, 256, 1, 1)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)


def test_v2_stem_pool_pads_with_zeros():
    pool = build_model("resnet50v2_keras").maxpool
    out = pool(-torch.ones(1, 1, 8, 8))
    assert out.shape == (1, 1, 4, 4)
    assert torch.all(out[..., 0, :] == 0) and torch.all(out[..., :, 0] == 0)  # windows over the zero border
    assert torch.all(out[..., 1:, 1:] == -1)
    assert torch.all(nn.MaxPool2d(3, 2, padding=1)(-torch.ones(1, 1, 8, 8)) == -1)  # -inf padding would differ


# --- recognition -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet50_keras", "resnet50v2_keras",
                                  pytest.param("resnet101_keras", marks=pytest.mark.slow),
                                  pytest.param("resnet152v2_keras", marks=pytest.mark.slow)])
def test_match_import_and_parity(name, r50, r50v2):
    kmodel = {"resnet50_keras": r50, "resnet50v2_keras": r50v2}.get(name)
    size = 64 if kmodel is not None else 32
    if kmodel is None:
        kmodel = randomise(app(name, input_shape=(size, size, 3)))
    assert match_keras_application(kmodel) == name
    imp = import_keras_application(kmodel, name, "m.keras")
    assert imp.arch == {"name": name, "num_classes": 1000, "in_channels": 3, "small_input": False}
    assert (imp.channels, imp.height, imp.width) == (3, size, size)
    assert imp.source["architecture"] == f"keras.applications {APPS[name]}" and imp.source["format"] == "keras"
    assert imp.source["runtime"].startswith("tensorflow ") and "(keras " in imp.source["runtime"]
    assert any("softmax" in note and "dropped" in note for note in imp.notes)
    gap, scale = max_logit_gap(linear_head(kmodel, "predictions"), imp, 4)
    # fp32 rounding grows with the logits, which random BN statistics leave large in the deeper nets
    # (|logit| ~ 300 for resnet152_keras at 64x64): 1e-4, or 1e-5 of the largest |logit| when that is more
    assert gap <= max(1e-4, 1e-5 * scale) and scale > 0.1


@pytest.mark.parametrize("name", ["resnet50_keras", "resnet50v2_keras"])
def test_layer_map_outputs_equal_the_keras_layers(name, r50, r50v2):
    kmodel = linear_head(r50 if name == "resnet50_keras" else r50v2, "predictions")
    imp = import_keras_application(kmodel, name, "m.keras")
    assert imp.layer_map["fc"] == "predictions" and imp.layer_map["layer1.0"] == "conv2_block1_out"
    if name == "resnet50_keras":
        assert "conv1" not in imp.layer_map  # its bias is folded into bn1
        assert imp.layer_map["bn1"] == "conv1_bn" and imp.layer_map["layer2.3.relu3"] == "conv3_block4_out"
    else:
        assert imp.layer_map["conv1"] == "conv1_conv" and imp.layer_map["post_relu"] == "post_relu"
    keras_names = sorted(set(imp.layer_map.values()))
    probe = keras.Model(kmodel.input, [kmodel.get_layer(k).output for k in keras_names])
    x = torch_inputs(imp, 2)
    ref = dict(zip(keras_names, probe(imp.source_input.apply(x), training=False)))
    got = {}
    modules = dict(imp.model.named_modules())
    for t in imp.layer_map:
        modules[t].register_forward_hook(lambda _m, _i, out, t=t: got.__setitem__(t, out.detach().numpy()))
    with torch.no_grad():
        imp.model(torch.from_numpy(x))
    for t, k in imp.layer_map.items():
        r = np.asarray(ref[k])
        r = r.transpose(0, 3, 1, 2) if r.ndim == 4 else r
        assert got[t].shape == r.shape, t
        assert np.abs(got[t] - r).max() <= 1e-4 * max(1.0, np.abs(r).max()), (t, k)


def test_caffe_and_tf_input_contracts(r50, r50v2):
    imp = import_keras_application(r50, "resnet50_keras", "m.keras")
    assert imp.normalization == {"mean": [123.68 / 255, 116.779 / 255, 103.939 / 255], "std": [1 / 255] * 3}
    assert imp.source_input.layout == "NHWC" and imp.source_input.channel_order == [2, 1, 0]
    assert "caffe" in imp.preprocessing and "BGR" in imp.preprocessing
    pixels = np.random.default_rng(3).uniform(0, 255, (2, 3, 64, 64)).astype(np.float32)
    x = torch_inputs_from_pixels(imp, pixels)
    nhwc_rgb = pixels.transpose(0, 2, 3, 1)
    want = keras.applications.resnet.preprocess_input(nhwc_rgb.copy())
    np.testing.assert_allclose(imp.source_input.apply(x), want, atol=1e-3)

    kernel = r50.get_layer("conv1_conv").get_weights()[0]  # HWIO, I in BGR order
    np.testing.assert_array_equal(imp.model.conv1.weight.detach().numpy()[:, 0], kernel[:, :, 2, :].transpose(2, 0, 1))
    conv_bias = r50.get_layer("conv1_conv").get_weights()[1]
    moving_mean = r50.get_layer("conv1_bn").get_weights()[2]
    np.testing.assert_allclose(imp.model.bn1.running_mean.numpy(), moving_mean - conv_bias, rtol=0, atol=1e-7)
    assert imp.model.bn1.eps == r50.get_layer("conv1_bn").epsilon

    imp2 = import_keras_application(r50v2, "resnet50v2_keras", "m.keras")
    assert imp2.normalization == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert imp2.source_input.layout == "NHWC" and imp2.source_input.channel_order is None
    want = keras.applications.resnet_v2.preprocess_input(nhwc_rgb.copy())
    np.testing.assert_allclose(imp2.source_input.apply(torch_inputs_from_pixels(imp2, pixels)), want, atol=1e-5)


def torch_inputs_from_pixels(imp, pixels: np.ndarray) -> np.ndarray:
    mean = np.asarray(imp.normalization["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(imp.normalization["std"], np.float32).reshape(1, -1, 1, 1)
    return (pixels / 255.0 - mean) / std


@pytest.mark.parametrize("nested", ["functional", "sequential"])
def test_nested_headless_backbone_with_gap_dropout_dense(nested):
    kmodel = randomise(headless_with_head("resnet50v2_keras", 64, nested=nested, classes=5))
    assert match_keras_application(kmodel) == "resnet50v2_keras"
    imp = import_keras_application(kmodel, "resnet50v2_keras", "m.keras")
    assert imp.num_classes == 5 and imp.layer_map["fc"] == "head"
    assert imp.layer_map["post_bn"] == "resnet50v2/post_bn"
    assert any("Dropout 'drop'" in note for note in imp.notes)
    assert any("nested model 'resnet50v2'" in note for note in imp.notes)
    gap, _ = max_logit_gap(linear_head(kmodel, "head"), imp, 4)
    assert gap <= 1e-4


def test_open_input_size_needs_image_size():
    kmodel = randomise(headless_with_head("resnet50_keras", None, dropout=False))
    assert match_keras_application(kmodel) == "resnet50_keras"
    with pytest.raises(ModelImportError, match="image_size"):
        import_keras_application(kmodel, "resnet50_keras", "m.keras")
    imp = import_keras_application(kmodel, "resnet50_keras", "m.keras", image_size=(48, 64))
    assert (imp.height, imp.width) == (48, 64) and imp.layer_map["fc"] == "head"
    assert not any("Dropout" in note for note in imp.notes)
    gap, _ = max_logit_gap(linear_head(kmodel, "head"), imp, 2)
    assert gap <= 1e-4


def test_other_heads_and_models_are_not_matched():
    base = app("resnet50_keras", include_top=False, input_shape=(64, 64, 3))
    x = base.output
    assert match_keras_application(base) is None  # no head
    flat = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    assert match_keras_application(keras.Model(base.input, flat)) is None
    gap = keras.layers.GlobalAveragePooling2D()(x)
    two = keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(gap))
    assert match_keras_application(keras.Model(base.input, two)) is None
    gelu = keras.layers.Dense(3, activation="gelu")(gap)
    assert match_keras_application(keras.Model(base.input, gelu)) is None
    pooled = keras.layers.Dense(3)(keras.layers.GlobalMaxPooling2D()(x))
    assert match_keras_application(keras.Model(base.input, pooled)) is None
    one = keras.layers.Dense(3)(gap)
    assert match_keras_application(keras.Model(base.input, one)) == "resnet50_keras"

    base.get_layer("conv3_block2_2_bn").epsilon = 1e-3
    assert match_keras_application(keras.Model(base.input, one)) is None  # another epsilon: not the layout

    inputs = keras.Input((32, 32, 3))
    small = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs)))
    assert match_keras_application(keras.Model(inputs, small)) is None


def test_refusals(r50, r50v2):
    with pytest.raises(ModelImportError, match="height 64, but 32 was asked for"):
        import_keras_application(r50, "resnet50_keras", "m.keras", image_size=32)
    with pytest.raises(ModelImportError, match="ResNet50, not resnet101_keras"):
        import_keras_application(r50, "resnet101_keras", "m.keras")
    layer = r50v2.get_layer("conv3_block2_1_conv")
    kernel = layer.get_weights()[0]
    bad = kernel.copy()
    bad[0, 0, 0, 0] = np.nan
    layer.set_weights([bad])
    try:
        with pytest.raises(ModelImportError, match="layer 'conv3_block2_1_conv' holds NaN or Inf"):
            import_keras_application(r50v2, "resnet50v2_keras", "m.keras")
    finally:
        layer.set_weights([kernel])


# --- parity at 224 x 224 -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_keras", "resnet50v2_keras", "headless"])
def test_logits_parity_at_224(name):
    if name == "headless":
        kmodel, registry, dense = headless_with_head("resnet50_keras", 224), "resnet50_keras", "head"
    else:
        kmodel, registry, dense = app(name), name, "predictions"
    randomise(kmodel, seed=5)
    imp = import_keras_application(kmodel, registry, "m.keras")
    assert (imp.height, imp.width) == (224, 224)
    gap, scale = max_logit_gap(linear_head(kmodel, dense), imp, 32)
    print(f"{name}: max |dlogit| {gap:.3g} over 32 inputs at 224x224 (max |logit| {scale:.3g})")
    assert gap <= 1e-4 and scale > 0.1
