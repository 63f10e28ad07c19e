"""Real workloads on a small scale: the resnet50_imagefolder recipe's chain on a 224x224 RGB image folder
written here, and a streamed run resumed after SIGKILL that ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rescompress.report import validate_report
from tests.conftest import kill_during_training, write_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "resnet50_imagefolder_jetson.yaml"


def write_jpegs(root: Path, per_class: int, size: tuple[int, int] = (288, 256), classes: int = 3) -> None:
    """Smooth class-coloured JPEGs larger than 224, so evaluation resizes and center-crops them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            phase = rng.uniform(0, 6, 3)
            base = np.stack([np.sin(xx * (c + 1) * 4 + phase[0]), np.cos(yy * (c + 2) * 3 + phase[1]),
                             np.sin((xx + yy) * (2 * c + 1) + phase[2])], -1)
            tint = np.eye(3)[c] * 0.35
            img = np.clip((base * 0.3 + 0.5 + tint) * 255, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)


def rescompress(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}  # wide enough that no line wraps
    return subprocess.run([sys.executable, "-m", "rescompress", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_the_recipe_plans_with_only_its_data_root_set(tmp_path):
    """As shipped: ResNet-50 at 224, planned on a folder given from the command line."""
    write_jpegs(tmp_path / "images", per_class=10, size=(64, 48))
    planned = rescompress("run", str(RECIPE), "--dry-run", "--set", f"data.root={tmp_path / 'images'}")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    out = planned.stdout
    assert "model    resnet50" in out and "input 3x224x224" in out
    assert "resize shorter side to 256, center crop 224x224 (bilinear)" in out
    for name in ("onnx-int8", "tensorrt-int8", "tensorrt-fp16", "tflite-int8"):
        assert name in out
    missing = rescompress("run", str(RECIPE), "--dry-run")
    assert missing.returncode == 2 and "needs `data.root" in missing.stdout + missing.stderr


@pytest.mark.tflite
def test_resnet50_imagefolder_recipe_chain_on_a_tiny_folder(tmp_path):
    """The shipped recipe with only its scale changed from the command line: a small model, a few images and
    steps. prune -> distill -> QAT -> ONNX int8, TFLite int8 and deferred TensorRT engines."""
    pytest.importorskip("litert_torch", reason="the tflite extra is not installed: pip install 'rescompress[tflite]'")
    from rescompress.models import build_model

    write_jpegs(tmp_path / "images", per_class=12)
    torch.manual_seed(0)  # an "ImageNet checkpoint" of the small model: a 1000-class head, the 7x7 stem
    weights = tmp_path / "imagenet_tiny.pth"
    torch.save(build_model("resnet_tiny", num_classes=1000, in_channels=3, small_input=False).state_dict(), weights)
    sets = [f"data.root={tmp_path / 'images'}", f"model.weights={weights}", "model.name=resnet_tiny",
            "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=16", "train.warmup_epochs=0",
            "data.workers=2", "stages.0.prune.epochs=1", "stages.0.prune.round_to=8", "stages.0.prune.taylor_batches=2",
            "stages.1.distill.epochs=1", "report.latency.runs=3", "report.latency.warmup=1",
            "data.test_fraction=0.25", "data.val_fraction=0.2"]
    args = [a for s in sets for a in ("--set", s)]
    planned = rescompress("run", str(RECIPE), "--dry-run", *args)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "streamed from disk by 2 worker(s)" in planned.stdout
    assert "resize shorter side to 256, center crop 224x224" in planned.stdout

    done = rescompress("run", str(RECIPE), "--out", str(tmp_path / "runs"), *args)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert [s["name"] for s in report["stages"]] == ["baseline", "01-prune", "02-distill", "03-qat"]
    spec = report["dataset"]["input_spec"]
    assert (spec["channels"], spec["height"], spec["resize"], spec["normalization"]) == (3, 224, 256, "imagenet")
    assert report["dataset"]["streaming"]["workers"] == 2 and report["dataset"]["in_memory"] is False
    arts = {a["name"]: a for a in report["artifacts"]}
    for name in ("onnx-int8", "tflite-int8"):
        assert arts[name]["status"] == "ok" and arts[name]["top1"] is not None, arts[name]
        assert arts[name]["input_spec"]["resize"] == 256
    for name in ("tensorrt-int8", "tensorrt-fp16"):
        assert arts[name]["status"] in ("deferred", "ok")
        assert arts[name]["top1"] is not None  # measured on the engine's ONNX when the engine is deferred
    assert arts["onnx-int8"]["lint_checked"]["tensorrt"]["passed"]
    md = (run_dir / "report.md").read_text()
    assert "Eval transform" in md and "center crop 224x224 (bilinear)" in md and "imagenet statistics" in md
    resolved = (run_dir / "recipe.yaml").read_text()
    assert "model.name=resnet_tiny" in resolved  # the overrides are recorded


STREAM_RECIPE = {
    "name": "stream",
    "seed": 3,
    "model": {"name": "resnet_tiny"},
    "data": {"name": "image_folder", "image_size": 48, "workers": 2, "normalize": "dataset",
             "val_fraction": 0.1, "test_fraction": 0.2},
    "train": {"epochs": 4, "batch_size": 8, "lr": 0.05, "augment": ["random_resized_crop", "flip", "color_jitter"]},
    "export": [{"onnx": {"precision": "fp32"}}],
    "devices": ["host-cpu"],
    "report": {"latency": {"runs": 3, "warmup": 1}},
}


def _baseline_tensors(run_dir: Path) -> dict:
    ckpt = _baseline_done(run_dir)["checkpoint"]
    state = torch.load(run_dir / ckpt, weights_only=True)
    return state.get("state_dict", state)


def _baseline_done(run_dir: Path) -> dict:
    from rescompress.rundir import Manifest

    return Manifest.load(run_dir).done("baseline")


def test_sigkill_mid_epoch_with_workers_then_resume_is_bit_identical(tmp_path):
    write_jpegs(tmp_path / "images", per_class=40, size=(72, 64))
    data = copy.deepcopy(STREAM_RECIPE)
    data["data"]["root"] = str(tmp_path / "images")
    data["data"]["color_jitter"] = 0.2
    recipe = write_recipe(tmp_path / "stream.yaml", data)

    whole = rescompress("run", str(recipe), "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    state = kill_during_training(recipe, tmp_path / "killed", after=0.3)  # into the next epoch, workers busy
    run_dir = state.parent.parent
    saved = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= saved < 4, "the run was not killed mid-training"

    resumed = rescompress("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout + resumed.stderr
    assert "file index read from" in resumed.stdout  # the resumed run did not scan the folder again

    (whole_dir,) = (tmp_path / "whole").iterdir()
    a, b = _baseline_tensors(whole_dir), _baseline_tensors(run_dir)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed run differs in {differ[:5]}"
    ha, hb = _baseline_done(whole_dir)["record"]["history"], _baseline_done(run_dir)["record"]["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
