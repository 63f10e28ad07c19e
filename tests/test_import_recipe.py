"""A recipe whose model.weights is a Keras model: imported at plan time with parity on the recipe's own images,
run through prune → distill → QAT → TFLite int8, and reported beside the Keras model's own top-1; and the
`rescompress import` command."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from rescompress.cli import app
from tests.conftest import TINY_RECIPE, write_recipe
from tests.test_bench_tools import load_tool

runner = CliRunner()
needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow")
                                 is None, reason="needs the 'tensorflow' extra: pip install 'rescompress[tensorflow]'")


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained_keras(tmp_path_factory):
    """The tutorial-style Keras ResNet trained for 2 epochs in Keras on digits (32x32 grey), and its Keras
    top-1 on the test split."""
    tool = load_tool("keras_resnet")
    model = tool.build(size=32)
    top1 = tool.train_on_digits(model, epochs=2, seed=0, size=32)
    path = tmp_path_factory.mktemp("keras") / "digits_resnet.keras"
    model.save(path)
    return path, top1


def recipe_for(weights, **data):
    r = copy.deepcopy(TINY_RECIPE)
    r["model"] = {"weights": str(weights)}
    r["data"] = {"name": "digits", **data}
    r["train"]["epochs"] = 0
    return r


@pytest.mark.tensorflow
@needs_keras
def test_a_keras_model_plans_with_parity_on_the_recipes_images(trained_keras, tmp_path):
    path, _ = trained_keras
    recipe = write_recipe(tmp_path / "k.yaml", recipe_for(path))
    result = invoke("run", str(recipe), "--dry-run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "input 1x32x32" in text  # the model's input size and channels, as the recipe left them unset
    assert "(model statistics)" in text  # its Rescaling layer is the normalisation
    assert "on 32 real inputs; top-1 agreement 100.00 %" in text


@pytest.mark.tensorflow
@needs_keras
def test_a_mismatched_input_size_or_channel_count_is_refused(trained_keras, tmp_path):
    path, _ = trained_keras
    for data, message in (({"image_size": 16}, "takes 32x32 inputs, but image_size 16 was asked for"),
                          ({"channels": 3}, "takes 1-channel inputs, but the data has 3 channels")):
        recipe = write_recipe(tmp_path / "k.yaml", recipe_for(path, **data))
        result = invoke("run", str(recipe), "--dry-run")
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    r = recipe_for(path)
    r["model"]["name"] = "resnet18"
    result = invoke("run", str(write_recipe(tmp_path / "k.yaml", r)), "--dry-run")
    assert result.exit_code == 2 and "drop model.name" in " ".join(result.output.split())


def test_weights_holding_nan_are_refused_at_dry_run_naming_the_tensor(tmp_path):
    from rescompress.models import build_model

    sd = build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True).state_dict()
    sd["layer2.0.bn1.running_var"][3] = float("inf")
    sd["layer1.0.conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "diverged.pt")
    r = copy.deepcopy(TINY_RECIPE)
    r["model"]["weights"] = str(tmp_path / "diverged.pt")
    result = invoke("run", str(write_recipe(tmp_path / "r.yaml", r)), "--dry-run")
    assert result.exit_code == 2
    assert "tensor 'layer1.0.conv2.weight' holds NaN (1 of 576 values)" in " ".join(result.output.split())


@pytest.mark.tensorflow
@needs_keras
def test_import_command_json_and_checkpoint(trained_keras, tmp_path):
    path, _ = trained_keras
    out = tmp_path / "digits.pth"
    result = invoke("import", str(path), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output[result.output.index("{"):])
    assert record["max_abs_diff"] <= 1e-4 and record["top1_agreement"] is None
    assert record["input"]["channels"] == 1 and record["architecture"] == "graph"
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["import"]["parity"]["max_abs_diff"] == record["max_abs_diff"]
    again = invoke("import", str(path), "--out", str(out))
    assert again.exit_code == 2 and "exists; choose another --out, or pass --force" in again.output
    # the imported checkpoint is itself a recipe's model.weights (no TensorFlow needed to plan it)
    result = invoke("run", str(write_recipe(tmp_path / "r.yaml", recipe_for(out))), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "on 32 random inputs" in " ".join(result.output.split())


@pytest.mark.slow
@pytest.mark.tensorflow
@pytest.mark.tflite
@needs_keras
@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None, reason="needs the 'tflite' extra")
def test_the_keras_users_loop_closes(trained_keras, tmp_path):
    """prune → distill → QAT → TFLite int8 from a Keras model; the report puts the Keras model's own top-1,
    measured in TensorFlow, beside each artifact's."""
    path, keras_top1 = trained_keras
    r = recipe_for(path)
    r["train"].update(epochs=1, lr=0.01)
    r["stages"] = [{"prune": {"macs_reduction": 1.5, "round_to": 8, "epochs": 1}},
                   {"distill": {"teacher": "baseline", "epochs": 1}},
                   {"qat": {"epochs": 1, "scheme": "tflite"}}]
    r["export"] = [{"tflite": {"precision": "fp32"}}, {"tflite": {"precision": "int8"}}]
    r["devices"] = ["galaxy-s24"]
    r["report"] = {"accuracy_budget_pt": 100.0, "latency": {"batch": 1, "warmup": 2, "runs": 10}}  # one epoch each
    result = invoke("run", str(write_recipe(tmp_path / "k.yaml", r)), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "runs").iterdir())
    report = json.loads((run_dir / "report.json").read_text())
    source = report["model"]["import"]
    assert source["format"] == "keras" and source["top1_status"] == "ok"
    assert source["top1"] == pytest.approx(keras_top1["test"], abs=1e-9)  # TensorFlow's own figure
    assert source["parity"]["max_abs_diff"] <= 1e-4 and source["parity"]["inputs"] == "real"
    names = {a["name"]: a for a in report["artifacts"]}
    assert names["tflite-int8"]["status"] == "ok" and names["tflite-int8"]["top1"] is not None
    md = (run_dir / "report.md").read_text()
    assert "Δ vs Keras pt" in md and "Source model top-1" in md
    rec = report["devices"][0].get("recommendation")
    assert rec is not None and rec["artifact"].startswith("tflite")


def test_import_of_a_torchvision_state_dict_loads_it_as_is(tmp_path):
    from rescompress.models import build_model

    torch.save(build_model("resnet18", num_classes=1000).state_dict(), tmp_path / "resnet18.pth")
    result = invoke("import", str(tmp_path / "resnet18.pth"), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["architecture"] == "resnet18" and record["max_abs_diff"] is None
    assert record["parity"]["status"].startswith("not measured")
    assert record["input"]["normalization"]["mean"] == [0.485, 0.456, 0.406]  # a 1000-class ImageNet head
    assert (tmp_path / "resnet18-imported.pth").is_file()  # never over the input file
    torch.save({"conv.weight": torch.zeros(2, 2, 1, 1)}, tmp_path / "other.pt")
    result = invoke("import", str(tmp_path / "other.pt"))
    assert result.exit_code == 2 and "not of a ResNet rescompress builds" in " ".join(result.output.split())


def test_an_imported_checkpoint_holding_nan_is_refused(tmp_path):
    from rescompress.models import build_model

    torch.save(build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True).state_dict(),
               tmp_path / "tiny.pth")
    assert invoke("import", str(tmp_path / "tiny.pth"), "--image-size", "8").exit_code == 0
    payload = torch.load(tmp_path / "tiny-imported.pth", weights_only=True)
    payload["state_dict"]["fc.bias"][0] = float("nan")
    torch.save(payload, tmp_path / "tiny-imported.pth")
    r = copy.deepcopy(TINY_RECIPE)
    r["model"] = {"weights": str(tmp_path / "tiny-imported.pth")}
    result = invoke("run", str(write_recipe(tmp_path / "r.yaml", r)), "--dry-run")
    assert result.exit_code == 2 and "tensor 'fc.bias' holds NaN" in " ".join(result.output.split()), result.output
