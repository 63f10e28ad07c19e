from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "resnet_tiny"},
    "data": {"name": "digits", "limit_train": 400},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
    "export": [{"onnx": {"precision": "fp32"}}],
    "devices": ["host-cpu"],
    "report": {"latency": {"warmup": 2, "runs": 10}},
}


def write_recipe(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe that trains the tiny ResNet on part of digits for two epochs (seconds on 2 cores)."""
    return write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)
