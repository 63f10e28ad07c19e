"""Chained compression stages through the real pipeline on the tiny ResNet: every stage checkpointed and
reported, the int8 model exported to QDQ ONNX and run in onnxruntime, and a resume that reloads pruned and
int8 checkpoints instead of recomputing them."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rescompress.errors import PlanError
from rescompress.pipeline import execute, make_plan, prepare_new, prepare_resume
from rescompress.recipe import parse_recipe
from rescompress.report import validate_report
from rescompress.rundir import Manifest
from tests.conftest import TINY_RECIPE, write_recipe

pytestmark = pytest.mark.slow

PRUNE = {"prune": {"macs_reduction": 1.5, "round_to": 8, "epochs": 1}}
CHAINS = {
    "prune-distill-qat": [PRUNE, {"distill": {"epochs": 1}}, {"qat": {"epochs": 1, "scheme": "tensorrt"}}],
    "prune-ptq": [PRUNE, {"ptq": {"calibration_batches": 4}}],
}


@pytest.fixture
def console():
    from rich.console import Console

    return Console(quiet=True)


def _recipe(stages):
    data = copy.deepcopy(TINY_RECIPE)
    data["data"]["limit_train"] = 300
    data["stages"] = stages
    data["export"] = [{"onnx": {"precision": "fp32"}}, {"onnx": {"precision": "int8"}}]
    return data


@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain_runs_end_to_end(tmp_path, console, chain):
    path = write_recipe(tmp_path / f"{chain}.yaml", _recipe(CHAINS[chain]))
    plan, run_dir, manifest = prepare_new(path, tmp_path / "runs")
    report = execute(plan, run_dir, manifest, console)
    validate_report(json.loads((run_dir / "report.json").read_text()))

    kinds = [s["kind"] for s in report["stages"]]
    assert kinds == ["train", *[next(iter(s)) for s in CHAINS[chain]]]
    base, pruned, last = report["stages"][0], report["stages"][1], report["stages"][-1]
    assert base["macs"] / pruned["macs"] >= 1.5
    assert last["precision"] == "int8" and last["checkpoint"].endswith(".pt2")
    assert last["size_bytes"] < pruned["size_bytes"] / 2  # int8 weights
    assert last["macs"] == pruned["macs"]

    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == {"torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8"}
    int8, fp32 = arts["onnx-int8"], arts["onnx-fp32"]
    assert int8["status"] == "ok" and int8["parity"]["reference"] == "torch-int8"
    assert int8["parity"]["top1_agreement"] >= 0.97
    assert fp32["from_stage"] == report["stages"][-2]["name"] and fp32["parity"]["max_abs_diff"] < 1e-4
    assert int8["size_bytes"] < fp32["size_bytes"] * 0.7  # int8 weights; graph structure dominates a tiny model
    assert abs(int8["top1"] - fp32["top1"]) <= 0.05

    # resume of a finished run reloads every checkpoint (pruned .pt and int8 .pt2) and reproduces the report
    plan, _, manifest = prepare_resume(run_dir)
    again = execute(plan, run_dir, manifest, console)
    assert {a["name"]: a["top1"] for a in again["artifacts"]} == {n: a["top1"] for n, a in arts.items()}


def test_pruned_and_int8_checkpoints_reload_without_code(tmp_path, console):
    path = write_recipe(tmp_path / "c.yaml", _recipe(CHAINS["prune-ptq"]))
    plan, run_dir, manifest = prepare_new(path, tmp_path / "runs")
    execute(plan, run_dir, manifest, console)
    payload = torch.load(run_dir / "checkpoints/01-prune.pt", weights_only=True)
    assert payload["arch"]["name"] == "resnet_tiny"
    widths = {k: v.shape[0] for k, v in payload["state_dict"].items() if k.endswith("conv1.weight")}
    assert all(w % 8 == 0 for w in widths.values()) and any(w < 32 and "layer3" in k for k, w in widths.items()), widths
    assert Manifest.load(run_dir).done("02-ptq")["checkpoint"] == "checkpoints/02-ptq.pt2"


def test_int8_export_needs_a_quantizing_stage():
    recipe = parse_recipe({**_recipe([{"finetune": {"epochs": 1}}])}, "r.yaml")
    with pytest.raises(PlanError, match=r"export\[1\] onnx-int8 needs an int8 model, but no stage quantizes: add one of"):
        make_plan(recipe)


@pytest.mark.parametrize("prune, match", [
    ({"macs_reduction": 20.0, "round_to": 8}, r"stages\[0\]\.prune: macs_reduction 20 cannot be reached with round_to 8"),
    ({"channel_ratio": 0.05, "round_to": 32}, r"stages\[0\]\.prune: channel_ratio 0.05 with round_to 32 removes no channel"),
])
def test_unreachable_prune_target_fails_at_plan_time(prune, match):
    recipe = parse_recipe(_recipe([{"prune": prune}, {"ptq": {}}]), "r.yaml")
    with pytest.raises(PlanError, match=match):
        make_plan(recipe)
