"""End to end on the tiny ResNet: a real recipe runs, writes a complete report, and resumes after SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rescompress.errors import ResumeError
from rescompress.pipeline import RESUME_REDOES, execute, prepare_new, prepare_resume
from rescompress.rundir import MANIFEST, Manifest
from rescompress.report import validate_report
from tests.conftest import TINY_RECIPE, kill_during_training, write_recipe

pytestmark = pytest.mark.slow


def _run(recipe: Path, out: Path, console):
    plan, run_dir, manifest = prepare_new(recipe, out)
    return execute(plan, run_dir, manifest, console), run_dir


@pytest.fixture
def console():
    from rich.console import Console

    return Console(quiet=True)


def test_tiny_recipe_end_to_end(tmp_path, console):
    data = copy.deepcopy(TINY_RECIPE)
    data["stages"] = [{"finetune": {"epochs": 1}}]
    plan, run_dir, manifest = prepare_new(write_recipe(tmp_path / "tiny.yaml", data), tmp_path / "runs")
    t0 = time.monotonic()
    report = execute(plan, run_dir, manifest, console)
    wall = time.monotonic() - t0

    for name in ("report.json", "report.md", "report.html", "plots/accuracy_vs_latency.png", "recipe.yaml",
                 "recipe.original.yaml", MANIFEST, "checkpoints/00-baseline.pt", "checkpoints/01-finetune.pt",
                 "artifacts/onnx-fp32.onnx"):
        assert (run_dir / name).is_file(), name
    assert not list((run_dir / "checkpoints").glob("*.state.pt")), "partial training state left behind"
    on_disk = json.loads((run_dir / "report.json").read_text())
    validate_report(on_disk)
    assert [s["name"] for s in on_disk["stages"]] == ["baseline", "01-finetune"]
    for s in on_disk["stages"]:
        assert 0.0 <= s["top1"] <= 1.0 and s["params"] > 0 and s["macs"] > 0 and s["size_bytes"] > 0

    arts = {a["name"]: a for a in on_disk["artifacts"]}
    assert set(arts) == {"torch-fp32", "onnx-fp32"}
    onnx = arts["onnx-fp32"]
    assert onnx["status"] == "ok" and onnx["runtime"].startswith("onnxruntime")
    assert onnx["parity"]["max_abs_diff"] < 1e-4
    assert onnx["parity"]["top1_agreement"] == 1.0
    assert abs(onnx["top1"] - arts["torch-fp32"]["top1"]) <= 0.002
    # the exported torch model is the last stage's model
    assert arts["torch-fp32"]["top1"] == pytest.approx(on_disk["stages"][-1]["top1"])

    (device,) = on_disk["devices"]
    assert device["name"] == "host-cpu"
    for row in device["results"]:
        lat = row["latency"]
        assert lat["source"] == "measured" and lat["runs"] == 10
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert device["recommendation"]["artifact"] in arts
    md = (run_dir / "report.md").read_text()
    assert "onnx-fp32" in md and "measured" in md

    # where the time went: every step, training epochs counted inside the training steps only
    steps = {s["step"]: s for s in on_disk["run"]["steps"]}
    assert list(steps) == ["baseline", "01-finetune", "export", "measure"]
    for name in ("baseline", "01-finetune"):
        assert 0 < steps[name]["train_seconds"] <= steps[name]["seconds"]
        stage = next(s for s in on_disk["stages"] if s["name"] == name)
        assert stage["train_seconds"] == steps[name]["train_seconds"]
    assert steps["export"]["train_seconds"] == 0 and steps["export"]["seconds"] > 0
    # the step times are clocked, not made up: together they are the run's time, which the wall clock
    # around it bounds (it adds only writing the report and plots)
    assert sum(s["seconds"] for s in steps.values()) == pytest.approx(on_disk["run"]["seconds"], abs=0.1)
    assert 0.5 * wall <= on_disk["run"]["seconds"] <= wall + 0.1
    assert "## Time" in md and "outside training epochs" in md


def test_same_seed_same_result(tmp_path, console):
    path = write_recipe(tmp_path / "tiny.yaml", {**TINY_RECIPE, "export": []})
    r1, d1 = _run(path, tmp_path / "runs", console)
    r2, d2 = _run(path, tmp_path / "runs", console)
    assert d1 != d2, "a second run must not reuse the first run's directory"
    assert r1["stages"][0]["top1"] == r2["stages"][0]["top1"]
    s1 = torch.load(d1 / "checkpoints/00-baseline.pt", weights_only=True)["state_dict"]
    s2 = torch.load(d2 / "checkpoints/00-baseline.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_resume_skips_finished_steps_and_rejects_tampering(tmp_path, console):
    path = write_recipe(tmp_path / "tiny.yaml", {**TINY_RECIPE, "stages": [{"finetune": {"epochs": 1}}]})
    report, run_dir = _run(path, tmp_path / "runs", console)
    before = (run_dir / "checkpoints/00-baseline.pt").stat().st_mtime_ns
    exported = (run_dir / "artifacts/onnx-fp32.onnx").stat().st_mtime_ns
    plan, _, manifest = prepare_resume(run_dir)
    again = execute(plan, run_dir, manifest, console)
    assert (run_dir / "checkpoints/00-baseline.pt").stat().st_mtime_ns == before
    # as documented (pipeline.RESUME_REDOES): finished exports are kept when their hash matches ...
    assert (run_dir / "artifacts/onnx-fp32.onnx").stat().st_mtime_ns == exported
    assert again["artifacts"] == report["artifacts"] and "finished exports are kept" in RESUME_REDOES
    # ... and exported again when the file changed
    onnx_file = run_dir / "artifacts/onnx-fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    plan, _, manifest = prepare_resume(run_dir)
    third = execute(plan, run_dir, manifest, console)
    assert onnx_file.stat().st_mtime_ns != exported
    assert next(a for a in third["artifacts"] if a["name"] == "onnx-fp32")["status"] == "ok"
    assert third["artifacts"][1]["top1"] == report["artifacts"][1]["top1"]
    assert again["stages"][0]["top1"] == report["stages"][0]["top1"]

    with (run_dir / "checkpoints/01-finetune.pt").open("ab") as f:
        f.write(b"tampered")
    plan, _, manifest = prepare_resume(run_dir)
    with pytest.raises(ResumeError, match=r"does not match the hash"):
        execute(plan, run_dir, manifest, console)

    other = write_recipe(tmp_path / "other.yaml", {**TINY_RECIPE, "seed": 1})
    with pytest.raises(ResumeError, match=r"differs from the recipe"):
        prepare_resume(run_dir, other)
    with pytest.raises(ResumeError, match=r"not a rescompress run directory"):
        prepare_resume(tmp_path)


def test_sigkill_during_training_then_resume(tmp_path):
    data = copy.deepcopy(TINY_RECIPE)
    data["train"]["epochs"] = 6
    data["data"]["limit_train"] = 1000
    recipe = write_recipe(tmp_path / "long.yaml", data)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    state = kill_during_training(recipe, tmp_path / "runs", timeout=240)
    run_dir = state.parent.parent
    assert not (run_dir / "report.json").exists()
    saved_epoch = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= saved_epoch < 6

    done = subprocess.run([sys.executable, "-m", "rescompress", "run", "--resume", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming after epoch" in done.stdout + done.stderr
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    manifest = Manifest.load(run_dir)
    history = manifest.done("baseline")["record"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert report["stages"][0]["top1"] > 0.5
    assert (run_dir / "report.html").is_file() and (run_dir / "plots/accuracy_vs_latency.png").is_file()
    log = (run_dir / "logs/run.log").read_text()
    assert "baseline epoch 1/6" in log and "resuming after epoch" in log  # both attempts appended


def test_transfer_from_imagenet_style_weights(tmp_path, console):
    """A torchvision-layout resnet18 file with a 1000-class head: the head is replaced, the backbone frozen,
    the 7x7 stem is kept (stem: auto follows the file), and the new head is fine-tuned."""
    from rescompress.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("resnet18", num_classes=1000, in_channels=3).state_dict(), tmp_path / "r18.pth")
    data = copy.deepcopy(TINY_RECIPE)
    data["model"] = {"name": "resnet18", "weights": str(tmp_path / "r18.pth"), "freeze": "backbone"}
    data["data"] = {"name": "digits", "channels": 3, "image_size": 32, "limit_train": 200}
    data["train"] = {"epochs": 1, "batch_size": 50}
    data["export"] = []
    report, run_dir = _run(write_recipe(tmp_path / "transfer.yaml", data), tmp_path / "runs", console)
    (stage,) = report["stages"]
    assert report["model"]["arch"] == {"name": "resnet18", "num_classes": 10, "in_channels": 3, "small_input": False}
    notes = " ".join(stage["notes"])
    assert "1000" in notes and "frozen" in notes
    ckpt = torch.load(run_dir / "checkpoints/00-baseline.pt", weights_only=True)
    original = torch.load(tmp_path / "r18.pth", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["layer4.1.conv2.weight"], original["layer4.1.conv2.weight"])
    assert ckpt["state_dict"]["fc.weight"].shape == (10, 512)
    assert ckpt["input_spec"]["channels"] == 3


def test_report_command_rerenders(tmp_path, console):
    from typer.testing import CliRunner

    from rescompress.cli import app

    _, run_dir = _run(write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE), tmp_path / "runs", console)
    (run_dir / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "onnx-fp32" in (run_dir / "report.md").read_text()
