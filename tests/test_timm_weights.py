"""timm's plain resnet18/34/50 use torchvision's key names, so their checkpoints load as they are: a training
checkpoint (state_dict, state_dict_ema, optimizer, the run's argparse.Namespace) or a model.safetensors."""

from __future__ import annotations

import argparse

import pytest
import torch

from rescompress.errors import WeightsError
from rescompress.models import build_model, load_weights, read_state_dict


def timm_resnet_keys(depths: tuple[int, ...], bottleneck: bool) -> set[str]:
    """The state_dict keys timm's ResNet (`timm/models/resnet.py`, stem 'conv1'/'bn1', stages 'layer1'..,
    blocks 'conv1..3'/'bn1..3', shortcut 'downsample.0'/'downsample.1', head 'fc') has, written from its naming
    scheme rather than from our model."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{k}" for k in bn)}
    convs = 3 if bottleneck else 2
    for s, depth in enumerate(depths, start=1):
        for b in range(depth):
            p = f"layer{s}.{b}."
            for i in range(1, convs + 1):
                keys.add(f"{p}conv{i}.weight")
                keys |= {f"{p}bn{i}.{k}" for k in bn}
            if b == 0 and (s > 1 or bottleneck):
                keys.add(f"{p}downsample.0.weight")
                keys |= {f"{p}downsample.1.{k}" for k in bn}
    return keys


@pytest.mark.parametrize("name,depths,bottleneck", [("resnet18", (2, 2, 2, 2), False),
                                                    ("resnet34", (3, 4, 6, 3), False),
                                                    ("resnet50", (3, 4, 6, 3), True)])
def test_timm_key_names_equal_ours(name, depths, bottleneck):
    assert set(build_model(name, num_classes=1000).state_dict()) == timm_resnet_keys(depths, bottleneck)


def _timm_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """resnet18 weights under timm's key names, with values that are not ours."""
    ours = build_model("resnet18", num_classes=1000).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(ours[k].shape, generator=g) if ours[k].is_floating_point() else ours[k].clone())
            for k in sorted(timm_resnet_keys((2, 2, 2, 2), False))}


def test_a_timm_training_checkpoint_and_a_safetensors_file_load(tmp_path):
    from safetensors.torch import save_file

    sd = _timm_state_dict(0)
    ckpt = {"epoch": 12, "arch": "resnet18", "state_dict": sd, "state_dict_ema": _timm_state_dict(1),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "version": 2,
            "metric": 71.2, "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=100)}
    torch.save(ckpt, tmp_path / "checkpoint-12.pth.tar")  # what timm's CheckpointSaver writes
    save_file(sd, tmp_path / "model.safetensors")  # what timm pushes to the Hugging Face hub
    for path in (tmp_path / "checkpoint-12.pth.tar", tmp_path / "model.safetensors"):
        model = build_model("resnet18", num_classes=10)
        report = load_weights(model, path, model_name="resnet18")
        assert report.head_replaced and report.source_classes == 1000
        assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], sd["layer3.0.conv1.weight"])  # not the EMA


def test_a_damaged_safetensors_file_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10" * 64)
    with pytest.raises(WeightsError, match=r"is not a safetensors file"):
        read_state_dict(tmp_path / "model.safetensors")
