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


def kill_during_training(recipe: Path, out: Path, *, after: float = 0.0, timeout: float = 300) -> Path:
    """Start `rescompress run recipe --out out`, wait until the baseline has saved its first per-epoch state,
    wait `after` more seconds, SIGKILL the process; returns the state file (asserting it was written)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rescompress", "run", str(recipe), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + timeout
    state = None
    while state is None and time.time() < deadline and proc.poll() is None:
        state = next(iter(out.glob("*/checkpoints/baseline.state.pt")), None)
        time.sleep(0.02)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert state is not None, "training never saved its per-epoch state"
    return state


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe that trains the tiny ResNet on part of digits for two epochs (seconds on 2 cores)."""
    return write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)


@pytest.fixture(scope="session")
def digits_small():
    """Digits with 300 training images (the default 8x8 input): enough to train the tiny ResNet in seconds."""
    from rescompress.data import load_dataset

    return load_dataset("digits", limit_train=300, seed=0)


@pytest.fixture(scope="session")
def trained_tiny(digits_small):
    """The tiny ResNet trained for 15 epochs on `digits_small` (about 90 % test top-1, a few seconds);
    copy it before changing it."""
    import torch
    from rich.console import Console

    from rescompress.models import build_model
    from rescompress.recipe import TrainConfig
    from rescompress.train import fit

    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True)
    fit(model, digits_small, TrainConfig(epochs=15, batch_size=32, lr=0.1), seed=0, console=Console(quiet=True))
    return model.eval()


def make_ctx(data, work_dir: Path, teacher=None, *, index: int = 0, recipe: dict | None = None, devices=()):
    """A StageContext over `data` for calling a stage function directly."""
    import copy

    import torch
    from rich.console import Console

    from rescompress.devices import load_device
    from rescompress.recipe import parse_recipe
    from rescompress.stages import StageContext

    spec = data.input_spec
    work_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        recipe=parse_recipe(copy.deepcopy(recipe or TINY_RECIPE), "test"), data=data, work_dir=work_dir,
        console=Console(quiet=True), seed=0, index=index,
        arch={"name": "resnet_tiny", "num_classes": 10, "in_channels": spec.channels, "small_input": True},
        example=torch.zeros(2, spec.channels, spec.height, spec.width),
        devices=[load_device(d) for d in devices],
        teacher=copy.deepcopy(teacher).eval() if teacher is not None else None)
