"""Tests for rescompress.models: architectures, weight loading, freezing."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from rescompress.errors import UnknownNameError, WeightsError
from rescompress.models import (
    CLASSIFIER,
    FREEZE_MODES,
    MODELS,
    apply_freeze,
    build_model,
    guess_architecture,
    load_weights,
    read_state_dict,
    set_train_mode,
)

ALL = ["resnet101", "resnet101_keras", "resnet101v2_keras", "resnet152", "resnet152_keras", "resnet152v2_keras",
       "resnet18", "resnet20", "resnet32", "resnet34", "resnet50", "resnet50_keras", "resnet50v2_keras", "resnet56",
       "resnet_tiny"]


class NotWeights:
    """A custom class: pickling it needs code, which weights_only refuses."""


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert MODELS.names() == ALL
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        build_model("resnet81")


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_arch(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1, small_input=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10)
    assert model.rescompress_arch == {"name": name, "num_classes": 10, "in_channels": 1, "small_input": True}


def test_imagenet_stem_forward() -> None:
    model = build_model("resnet50", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)


def test_small_input_stem() -> None:
    model = build_model("resnet18", small_input=True, in_channels=1)
    assert model.conv1.weight.shape == (64, 1, 3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


@pytest.mark.parametrize(
    ("name", "count"), [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)]
)
def test_torchvision_param_counts(name: str, count: int) -> None:
    assert n_params(build_model(name)) == count


def test_cifar_param_counts() -> None:
    assert n_params(build_model("resnet20", num_classes=10)) == 272_474  # option-B shortcuts
    assert n_params(build_model("resnet56", num_classes=10)) == 855_770


def test_torchvision_keys_and_shapes() -> None:
    sd18 = build_model("resnet18").state_dict()
    assert len(sd18) == 122  # torchvision resnet18: 62 params + 60 BN buffers
    assert sd18["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd18["layer2.0.downsample.1.num_batches_tracked"].shape == ()
    assert sd18["layer4.1.bn2.running_var"].shape == (512,)
    assert sd18["fc.weight"].shape == (1000, 512)
    assert "layer1.0.downsample.0.weight" not in sd18
    assert not any("relu" in k or "maxpool" in k for k in sd18)

    sd50 = build_model("resnet50").state_dict()
    assert len(sd50) == 320
    assert sd50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd50["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert sd50["fc.weight"].shape == (1000, 2048)

    sd20 = build_model("resnet20", num_classes=10).state_dict()
    assert sd20["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd20["layer3.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    assert "layer3.2.conv2.weight" in sd20 and not any(k.startswith("layer4") for k in sd20)


def test_init_conventions() -> None:
    model = build_model("resnet_tiny", num_classes=10)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    std = model.layer3[0].conv2.weight.std().item()
    assert abs(std - (2 / (32 * 9)) ** 0.5) < 0.02  # kaiming normal, fan_out


@pytest.mark.parametrize(("name", "size"), [("resnet18", 32), ("resnet50", 32), ("resnet20", 16), ("resnet_tiny", 16),
                                            ("resnet50_keras", 64), ("resnet50v2_keras", 64)])
def test_each_relu_module_called_once(name: str, size: int) -> None:
    model = build_model(name, num_classes=10).eval()
    calls: Counter[str] = Counter()
    relus = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    for n, m in relus.items():
        m.register_forward_hook(lambda *_, n=n: calls.update([n]))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    assert relus and calls == Counter({n: 1 for n in relus})
    assert len({id(m) for m in relus.values()}) == len(relus)


def test_strict_torch_export_tiny() -> None:
    model = build_model("resnet_tiny", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,), strict=True)
    targets = Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert targets["aten.add.Tensor"] == 3 and targets["aten.relu.default"] == 7
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))


def test_round_trip(tmp_path: Path) -> None:
    src = build_model("resnet_tiny", num_classes=10)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = build_model("resnet_tiny", num_classes=10)
    report = load_weights(dst, path, model_name="resnet_tiny")
    assert report.loaded == len(src.state_dict()) and not report.head_replaced
    assert report.source_classes == 10 and report.path == str(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_wrapped_and_dataparallel_checkpoints(tmp_path: Path) -> None:
    sd = build_model("resnet_tiny", num_classes=10).state_dict()
    wrapped = {
        "ckpt.pth": {"format": "rescompress-checkpoint", "state_dict": sd, "epoch": 3},
        "model.pth": {"model": sd, "optimizer": {"lr": 0.1}},
        "dp.pth": {f"module.{k}": v for k, v in sd.items()},
    }
    for name, obj in wrapped.items():
        torch.save(obj, tmp_path / name)
        got = read_state_dict(tmp_path / name)
        assert got.keys() == sd.keys(), name
        assert torch.equal(got["fc.weight"], sd["fc.weight"])


def test_head_replaced(tmp_path: Path) -> None:
    src = build_model("resnet_tiny", num_classes=100)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = build_model("resnet_tiny", num_classes=10)
    fresh_fc = dst.fc.weight.detach().clone()
    report = load_weights(dst, path, model_name="resnet_tiny")
    assert report.head_replaced and report.source_classes == 100
    assert report.loaded == len(src.state_dict()) - 2
    assert "100 classes" in report.note
    assert torch.equal(dst.fc.weight, fresh_fc)
    assert torch.equal(dst.layer3[0].conv2.weight, src.layer3[0].conv2.weight)


def test_mismatch_lists_entries_and_guesses(tmp_path: Path) -> None:
    path = tmp_path / "r20.pth"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), path)
    guess = r"the file seems to hold resnet20-like \(CIFAR-style, BasicBlock blocks 3/3/3, 10 classes, 3 input"
    with pytest.raises(WeightsError, match=r"does not fit resnet32: missing in file: layer1\.3\.conv1\.weight") as e:
        load_weights(build_model("resnet32", num_classes=10), path, model_name="resnet32")
    assert re.search(guess, str(e.value)) and re.search(r"\(\+\d+ more\)", str(e.value))
    with pytest.raises(WeightsError, match=r"conv1\.weight: file \[16, 3, 3, 3\] vs model \[64, 3, 7, 7\]") as e:
        load_weights(build_model("resnet18", num_classes=10), path, model_name="resnet18")
    assert re.search(guess, str(e.value))
    assert str(e.value).count("\n") <= 3


def test_backbone_mismatch_is_not_a_head_swap(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(build_model("resnet_tiny", num_classes=10, in_channels=1).state_dict(), path)
    with pytest.raises(WeightsError, match=r"conv1\.weight: file \[8, 1, 3, 3\] vs model \[8, 3, 3, 3\]"):
        load_weights(build_model("resnet_tiny", num_classes=5), path, model_name="resnet_tiny")


def test_guess_architecture() -> None:
    sd50 = build_model("resnet50").state_dict()
    assert guess_architecture(sd50) == "resnet50-like (Bottleneck blocks 3/4/6/3, 1000 classes, 3 input channels)"
    sd18 = build_model("resnet18", num_classes=10, small_input=True).state_dict()
    assert guess_architecture(sd18) == "resnet18-like (BasicBlock blocks 2/2/2/2, 3x3 stem, 10 classes, 3 input channels)"
    assert guess_architecture({"encoder.weight": torch.ones(2)}) == "not a ResNet (first keys: encoder.weight)"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize("content", [b"", b"hello, not weights\n"] + [random.Random(seed).randbytes(2048) for seed in range(16)])
def test_corrupt_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"cannot read weights file .*bad\.pth: it is not a PyTorch checkpoint \("):
        read_state_dict(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(build_model("resnet_tiny", num_classes=10).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="it is not a PyTorch checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("obj", [NotWeights(), nn.Linear(2, 2)])
def test_pickled_code_refused(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "code.pth"
    torch.save(obj, path)
    with pytest.raises(WeightsError, match=r"needs pickled Python code .*only tensors and state_dicts are accepted"):
        read_state_dict(path)


def test_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(WeightsError, match=r"holds no tensors \(top-level keys: epoch, lr\)"):
        read_state_dict(path)


def test_freeze_modes() -> None:
    assert FREEZE_MODES == ("none", "backbone", "stages_1_2")
    model = build_model("resnet_tiny", num_classes=10)
    total = n_params(model)
    fc = model.fc.weight.numel() + model.fc.bias.numel()
    assert apply_freeze(model, "none") == 0
    assert all(p.requires_grad for p in model.parameters())

    assert apply_freeze(model, "backbone") == total - fc
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{CLASSIFIER}.weight", f"{CLASSIFIER}.bias"]

    model = build_model("resnet_tiny", num_classes=10)
    early = sum(n_params(m) for m in (model.conv1, model.bn1, model.layer1, model.layer2))
    assert apply_freeze(model, "stages_1_2") == early
    assert all(p.requires_grad for p in model.layer3.parameters()) and not model.layer2[0].conv1.weight.requires_grad

    with pytest.raises(ValueError, match="unknown freeze mode 'backbon' — did you mean 'backbone'"):
        apply_freeze(model, "backbon")


def test_set_train_mode_keeps_frozen_bn_in_eval() -> None:
    model = build_model("resnet_tiny", num_classes=10)
    apply_freeze(model, "stages_1_2")
    set_train_mode(model)
    assert not model.bn1.training and not model.layer2[0].bn2.training
    assert model.layer3[0].bn1.training and model.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)
