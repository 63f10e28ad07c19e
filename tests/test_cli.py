"""The command line as a new user meets it: bad recipes end with one short message and exit code 2."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from rescompress.cli import app
from tests.conftest import TINY_RECIPE, write_recipe

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def with_(**sections):
    data = copy.deepcopy(TINY_RECIPE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


@pytest.fixture
def weights(tmp_path):
    from rescompress.models import build_model

    files = {}
    torch.save(build_model("resnet32", num_classes=10, in_channels=1).state_dict(), tmp_path / "resnet32.pt")
    files["other_arch"] = tmp_path / "resnet32.pt"
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02not really a checkpoint" * 10)
    files["corrupt"] = tmp_path / "corrupt.pt"
    return files


BAD = {
    "misspelled key": (with_(trian={"epochs": 1}), r"unknown key 'trian' — did you mean 'train'\?"),
    "misspelled nested key": (with_(train={"batchsize": 8}), r"train\.batchsize: unknown key 'batchsize' — did you mean 'batch_size'\?"),
    "wrong type": (with_(train={"epochs": "three"}), r"train\.epochs: Input should be a valid integer"),
    "negative value": (with_(train={"lr": -1}), r"train\.lr: Input should be greater than 0"),
    "fraction above 1": (with_(data={"test_fraction": 2}), r"data\.test_fraction: Input should be less than 1"),
    "unknown model": (with_(model={"name": "resnet19"}), r"unknown model 'resnet19' — did you mean 'resnet18'\?"),
    "unknown dataset": (with_(data={"name": "digit"}), r"unknown dataset 'digit' — did you mean 'digits'\?"),
    "unknown device": (with_(devices=["host-cpuu"]), r"unknown device 'host-cpuu' — did you mean 'host-cpu'\?"),
    "missing weights": (with_(model={"weights": "/nonexistent/w.pt"}), r"weights file not found: /nonexistent/w\.pt"),
    "list for mapping": (with_(data=["digits"]), r"data: expected a mapping, got a list"),
    "unknown stage option": (with_(stages=[{"finetune": {"epoch": 1}}]), r"stages\[0\]\.finetune\.epoch: unknown key"),
    "impossible channels": (with_(model={"in_channels": 3}), r"model\.in_channels is 3 but the data has 1 channels"),
}
TEXT = {
    "yaml syntax error": ("model: {name: resnet20\ndata: [", r"YAML syntax error at line"),
    "empty file": ("", r"the recipe is empty"),
    "scalar file": ("just words\n", r"expected a mapping of sections"),
}


def _check(result, match):
    import re

    output = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    assert re.search(match, " ".join(output.split())), output
    assert len(output.strip().splitlines()) <= 4, output


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe(tmp_path, case, dry_run):
    data, match = BAD[case]
    path = write_recipe(tmp_path / "bad.yaml", data)
    result = invoke("run", str(path), "--out", str(tmp_path / "runs"), *(["--dry-run"] if dry_run else []))
    _check(result, match)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", sorted(TEXT))
def test_unparseable_recipe(tmp_path, case, dry_run):
    text, match = TEXT[case]
    path = write_recipe(tmp_path / "bad.yaml", text)
    _check(invoke("run", str(path), *(["--dry-run"] if dry_run else [])), match)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("kind, match", [
    ("corrupt", r"cannot read weights file .*corrupt\.pt"),
    ("other_arch", r"does not fit resnet_tiny.*seems to hold resnet32"),
])
def test_bad_weights(tmp_path, weights, kind, match, dry_run):
    path = write_recipe(tmp_path / "bad.yaml", with_(model={"weights": str(weights[kind])}))
    _check(invoke("run", str(path), *(["--dry-run"] if dry_run else [])), match)


def test_missing_recipe_file(tmp_path):
    _check(invoke("run", str(tmp_path / "absent.yaml")), r"recipe file not found")


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_recipe, tmp_path):
    result = invoke("run", str(tiny_recipe), "--dry-run", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "resnet_tiny" in result.output and "onnx-fp32" in result.output and "plan is valid" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("what, expected", [
    ("models", "resnet50"), ("datasets", "fashion_mnist"), ("stages", "finetune"), ("targets", "onnx"),
    ("devices", "host-cpu"),
])
def test_list(what, expected):
    result = invoke("list", what)
    assert result.exit_code == 0 and expected in result.output


def test_list_targets_names_the_extras():
    result = invoke("list", "targets")
    text = "".join(ch for ch in result.output if not ch.isspace() and ch != "│")  # the table wraps lines
    assert "rescompress[tflite]" in text and "rescompress[tensorflow]" in text and "rescompress[tensorrt]" in text


def test_exit_code_through_the_real_entry_point(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", with_(modle={}))
    proc = subprocess.run([sys.executable, "-m", "rescompress", "run", str(path), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown key 'modle'" in proc.stderr


def test_report_on_a_directory_without_report(tmp_path):
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 2 and "report.json" in result.output
