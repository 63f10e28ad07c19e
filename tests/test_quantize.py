"""Int8 schemes, QAT and PTQ on the tiny ResNet: the layouts each runtime needs, real onnxruntime runs."""

from __future__ import annotations

import copy
import importlib.util
from collections import Counter

import pytest
import torch

from rescompress.compress import pt2e
from rescompress.compress.quantize import PTQConfig, QATConfig, ptq, qat, quantize_ptq
from rescompress.train import evaluate
from tests.conftest import make_ctx

Q = torch.ops.quantized_decomposed


def _calls(model, op):
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target == op]


def _ptq(model, data, scheme, tmp_path, **kw):
    ctx = make_ctx(data, tmp_path / "w", model)
    return quantize_ptq(model, ctx, PTQConfig(calibration_batches=4), scheme, observer="minmax", **kw)


@pytest.mark.parametrize("scheme, dtype", [("tensorrt", torch.int8), ("onnxruntime", torch.uint8), ("tflite", torch.int8)])
def test_scheme_layouts(trained_tiny, digits_small, tmp_path, scheme, dtype):
    q = _ptq(copy.deepcopy(trained_tiny), digits_small, scheme, tmp_path)
    acts = _calls(q, Q.quantize_per_tensor.default)
    assert acts and all(n.args[-1] == dtype for n in acts)
    zero_points = {n.args[2] for n in acts}
    if scheme == "tensorrt":
        assert zero_points == {0}, "TensorRT needs symmetric activations"
    weights = _calls(q, Q.dequantize_per_channel.default)
    assert len(weights) == 9 + 1  # every conv of resnet_tiny (stem, 3 blocks of 2, 2 downsamples) and the classifier
    for n in weights:
        w = getattr(q, n.args[0].target)
        zp = getattr(q, n.args[2].target)
        assert w.dtype == torch.int8 and n.args[3] == 0 and int(zp.abs().max()) == 0 and int(w.min()) >= -127
    for add in _calls(q, torch.ops.aten.add.Tensor):
        assert all(a.target == Q.dequantize_per_tensor.default for a in add.args[:2]), "both Add inputs need Q/DQ"


def test_keep_float_leaves_layers_unquantized(trained_tiny, digits_small, tmp_path):
    q = _ptq(copy.deepcopy(trained_tiny), digits_small, "onnxruntime", tmp_path, keep_float=("conv1", "fc"))
    assert len(_calls(q, Q.dequantize_per_channel.default)) == 10 - 2


def test_ptq_accuracy_and_onnxruntime_fuses_every_layer(trained_tiny, digits_small, tmp_path):
    import onnx
    import onnxruntime as ort

    from rescompress.export.onnx import OnnxConfig, export_onnx

    spec = digits_small.input_spec
    q = _ptq(copy.deepcopy(trained_tiny), digits_small, "onnxruntime", tmp_path)
    float_top1 = evaluate(trained_tiny, digits_small.test, spec)
    assert evaluate(q, digits_small.test, spec) >= float_top1 - 0.03

    art = export_onnx(q, torch.zeros(2, spec.channels, spec.height, spec.width), OnnxConfig(precision="int8"),
                      tmp_path / "m.onnx", spec=spec, from_stage="ptq")
    x = spec.normalize_numpy(digits_small.test.images.numpy())
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    got = art(x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 9 and ops["QLinearAdd"] == 3 and ops["QGemm"] == 1
    assert not ops["Conv"] and not ops["Add"] and not ops["FusedConv"], ops


def test_ptq_stage_records_random_calibration(trained_tiny, digits_small, tmp_path):
    ctx = make_ctx(digits_small, tmp_path / "w", trained_tiny)
    out = ptq(copy.deepcopy(trained_tiny), PTQConfig(calibration="random", calibration_batches=2), ctx)
    assert pt2e.is_quantized(out)
    assert ctx.record["calibration"] == "random" and ctx.record["scheme"] == "onnxruntime"
    assert any("RANDOM DATA" in n for n in ctx.notes)


def test_scheme_defaults_from_the_first_device(trained_tiny, digits_small, tmp_path):
    ctx = make_ctx(digits_small, tmp_path / "w", trained_tiny, devices=["galaxy-s24", "host-cpu"])
    ptq(copy.deepcopy(trained_tiny), PTQConfig(calibration_batches=2), ctx)
    assert ctx.record["scheme"] == "tflite"


def test_qat_trains_converts_and_resumes(trained_tiny, digits_small, tmp_path):
    spec = digits_small.input_spec
    cfg = QATConfig(scheme="tensorrt", epochs=2, distill=True)
    ctx = make_ctx(digits_small, tmp_path / "w", trained_tiny)
    q = qat(copy.deepcopy(trained_tiny), cfg, ctx)
    assert pt2e.is_quantized(q)
    assert ctx.record == {"precision": "int8", "scheme": "tensorrt"}
    assert "BatchNorm frozen after epoch 1" in ctx.notes[0] and "distilled" in ctx.notes[0]
    assert evaluate(q, digits_small.test, spec) >= evaluate(trained_tiny, digits_small.test, spec) - 0.05
    # the training state of the last epoch is on disk: a rerun resumes from it instead of training again
    again = qat(copy.deepcopy(trained_tiny), cfg, make_ctx(digits_small, tmp_path / "w", trained_tiny))
    x = torch.randn(4, spec.channels, spec.height, spec.width)
    with torch.no_grad():
        assert torch.equal(q(x), again(x))


def test_quantized_checkpoint_round_trip(trained_tiny, digits_small, tmp_path):
    from rescompress.rundir import checkpoint_suffix, load_checkpoint, save_checkpoint

    q = _ptq(copy.deepcopy(trained_tiny), digits_small, "tflite", tmp_path)
    assert checkpoint_suffix(q) == ".pt2" and checkpoint_suffix(trained_tiny) == ".pt"
    path = tmp_path / "q.pt2"
    digest = save_checkpoint(path, q, {}, digits_small.input_spec.to_dict(), "ptq", {})
    back = load_checkpoint(path, digest, {})
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert pt2e.is_quantized(back)


def test_freeze_epochs_default_and_validation():
    assert QATConfig(epochs=3).freeze_epochs() == (2, 2)
    assert QATConfig(epochs=1).freeze_epochs() == (1, 1)
    assert QATConfig(epochs=4, freeze_bn_after=1).freeze_epochs() == (1, 3)
    with pytest.raises(ValueError, match="freeze_bn_after is 5 but QAT runs 2 epochs"):
        QATConfig(epochs=2, freeze_bn_after=5)


needs_inc = pytest.mark.skipif(importlib.util.find_spec("neural_compressor") is None,
                               reason="neural-compressor is not installed (pip install 'rescompress[inc]')")


@pytest.mark.inc
@needs_inc
def test_autotune_stops_at_the_first_config_meeting_the_goal(trained_tiny, digits_small, tmp_path):
    ctx = make_ctx(digits_small, tmp_path / "w", trained_tiny)
    cfg = PTQConfig(calibration_batches=4, autotune={"tolerable_loss": 0.5, "max_trials": 4})
    q = ptq(copy.deepcopy(trained_tiny), cfg, ctx)
    tune = ctx.record["autotune"]
    assert pt2e.is_quantized(q) and tune["met"] and tune["chosen"] == 1 and len(tune["trials"]) == 1
    assert "trial 1 of 1 meets the goal" in ctx.notes[-1]


@pytest.mark.inc
@needs_inc
def test_autotune_keeps_the_best_when_none_meets_the_goal(trained_tiny, digits_small, tmp_path):
    ctx = make_ctx(digits_small, tmp_path / "w", trained_tiny)
    # ranges from one random image clip real activations: no candidate stays within 1e-6 of the float model
    cfg = PTQConfig(calibration="random", calibration_batches=1, batch_size=1,
                    autotune={"tolerable_loss": 1e-6, "max_trials": 3})
    q = ptq(copy.deepcopy(trained_tiny), cfg, ctx)
    tune = ctx.record["autotune"]
    assert not tune["met"] and len(tune["trials"]) == 3
    best = max(tune["trials"], key=lambda t: t["val_top1"])
    assert tune["chosen"] == best["trial"]
    assert evaluate(q, digits_small.val, digits_small.input_spec) == pytest.approx(best["val_top1"])
    assert "NO configuration met the goal" in ctx.notes[-1]


def test_autotune_without_the_extra_names_it(monkeypatch):
    from rescompress.errors import BackendMissingError
    from rescompress.compress.quantize import _check_ptq

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "neural_compressor" else object())
    with pytest.raises(BackendMissingError, match=r"pip install 'rescompress\[inc\]'"):
        _check_ptq(PTQConfig(autotune={}))


def test_int8_checkpoint_with_pickled_payload_is_refused(trained_tiny, digits_small, tmp_path):
    import zipfile

    from rescompress.compress.pt2e import load_quantized, save_quantized
    from rescompress.errors import WeightsError

    q = _ptq(copy.deepcopy(trained_tiny), digits_small, "tensorrt", tmp_path)
    good = tmp_path / "q.pt2"
    save_quantized(good, q, torch.zeros(2, 1, 8, 8), {})
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            dst.writestr(item, data)
    with pytest.raises(WeightsError, match="holds pickled tensors, which are not loaded for safety"):
        load_quantized(bad)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="is not a torch.export archive"):
        load_quantized(tmp_path / "junk.pt2")


def test_qat_keeps_each_batchnorms_own_epsilon(trained_tiny, digits_small):
    """torchao's QAT conv-BatchNorm fusion and its train/eval switch write its pattern's eps (1e-5) into every
    BatchNorm; a Keras model's 1e-3 must survive both, and the converted model must match the prepared one."""
    from rescompress.compress.schemes import ResNetQuantizer

    model = copy.deepcopy(trained_tiny).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-3
            m.running_var.mul_(0.01)  # small variances: where eps decides the scale
    x = digits_small.test.images[:64].float()
    x = digits_small.input_spec.normalize(x) if x.max() > 1.5 else x
    with torch.no_grad():
        reference = model(x)
    prepared = pt2e.prepare(model, x[:2], ResNetQuantizer("tflite", qat=True), qat=True)

    def eps_literals():
        bns = {float(n.args[7]) for n in pt2e._batch_norm_nodes(prepared)}
        adds = {float(n.args[1]) for n in prepared.graph.nodes if str(n.target) == "aten.add.Tensor"
                and getattr(n.args[0], "op", None) == "get_attr" and str(n.args[0].target).endswith("running_var")}
        return bns | adds

    assert eps_literals() == {1e-3}
    prepared.eval()
    assert eps_literals() == {1e-3}
    prepared.train()
    assert eps_literals() == {1e-3}
    prepared.rescompress_freeze_observers = False
    with torch.no_grad():
        prepared.train()
        prepared.rescompress_freeze_bn = True
        prepared.train()  # observers watch the data, BatchNorm keeps its running statistics
        prepared(x)
        prepared.eval()
        fake_quant = prepared(x)
    # fake-quantized eval output tracks the float model (with a wrong eps the BN scales would be off by ~3x)
    assert (fake_quant.argmax(1) == reference.argmax(1)).float().mean() > 0.9
    converted = pt2e.convert(prepared)
    with torch.no_grad():
        assert (converted(x).argmax(1) == reference.argmax(1)).float().mean() > 0.9
