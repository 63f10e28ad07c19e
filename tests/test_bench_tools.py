"""The `make bench` scripts: the results collector on hand-written part files, and the pipeline-cost and
default-paths benchmarks on a real tiny run (onnxruntime's quantize_static and torch-pruning really run)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import TINY_RECIPE, write_recipe

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pruning_part(model: str, size: int, efficiency_2x: float) -> dict:
    rows = [{"runtime": "onnxruntime", "model": "dense", "macs": 100, "macs_reduction": 1.0, "p50_ms": 2.0,
             "p90_ms": 2.2, "speedup": 1.0, "efficiency": None},
            {"runtime": "onnxruntime", "model": "2x", "macs": 50, "macs_reduction": 2.0, "p50_ms": 2.0 / (2 * efficiency_2x),
             "p90_ms": 1.5, "speedup": 2 * efficiency_2x, "efficiency": efficiency_2x}]
    return {"model": model, "size": size, "threads": 2, "rounds": 3, "runs": 10, "results": rows,
            "provenance": {"onnxruntime": "1.0"}}


def test_results_collects_the_parts_states_the_machine_and_checks_the_claims(tmp_path):
    results = load_tool("bench_results")
    (tmp_path / "pruning_resnet18_224.json").write_text(json.dumps(_pruning_part("resnet18", 224, 0.9)))
    (tmp_path / "pruning_resnet20_32.json").write_text(json.dumps(_pruning_part("resnet20", 32, 0.6)))
    row = {"model": "(c) rescompress int8", "how": "qat", "top1": 0.9, "delta_top1_pt": -0.1, "p50_ms": 0.5,
           "p90_ms": 0.6, "speedup_vs_baseline": 2.0, "macs": 10, "size_bytes": 1000}
    defaults = {"dataset": {"name": "fashion_mnist", "sizes": {"test": 10000}}, "recipe": "fm", "threads": 2,
                "rounds": 5, "runs": 200, "calibration_images": 512, "finetune_epochs": 6, "results": [row],
                "verdict": {"speedup_vs_ort_default": 1.7, "delta_top1_pt_vs_ort_default": -0.2,
                            "at_least_as_fast_and_accurate": False}}
    (tmp_path / "defaults_fashion_mnist.json").write_text(json.dumps(defaults))

    assert results.main(["--dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["machine"]["cores"] >= 1 and out["machine"]["cpu"]
    holds = {c["claim"]: c["holds"] for c in out["checks"]}
    assert holds == {
        "rescompress int8 is at least as fast as onnxruntime's default quantize_static path and at least as "
        "accurate (Fashion-MNIST, onnxruntime)": False,
        "pruning efficiency at 2x fewer MACs ≥ 0.8 in onnxruntime (resnet18 224²)": True,
        "pruning efficiency at 2x fewer MACs ≥ 0.8 in onnxruntime (resnet20 32²)": False,
    }
    md = (tmp_path / "results.md").read_text()
    assert f"**Machine:** {out['machine']['cpu']}, {out['machine']['cores']} cores" in md
    assert "1.70x the speed, -0.20 pt top-1" in md and "| **no** |" in md
    assert "Not run: int8_onnxruntime_resnet18.json missing." in md
    assert "Not run: pipeline_cost.json missing." in md
    assert "| (c) rescompress int8 | 90.00 | -0.10 | 0.500 | 0.600 | 2.00× |" in md


@pytest.mark.slow
def test_pipeline_cost_and_default_paths_on_a_tiny_run(tmp_path):
    data = copy.deepcopy(TINY_RECIPE)
    data["stages"] = [{"prune": {"macs_reduction": 1.5, "round_to": 8, "epochs": 1}}, {"qat": {"epochs": 1}}]
    data["export"] = [{"onnx": {"precision": "fp32"}}, {"onnx": {"precision": "int8"}}]
    recipe = write_recipe(tmp_path / "tiny.yaml", data)

    pipeline_json = tmp_path / "pipeline_cost.json"
    assert load_tool("bench_pipeline").main([str(recipe), "--runs-dir", str(tmp_path / "runs"),
                                             "--out", str(pipeline_json)]) == 0
    (cost,) = json.loads(pipeline_json.read_text())["recipes"]
    steps = {s["step"]: s for s in cost["steps"]}
    assert list(steps) == ["baseline", "01-prune", "02-qat", "export", "measure"]
    assert steps["baseline"]["train_seconds"] > 0 and steps["export"]["train_seconds"] == 0
    assert cost["command_seconds"] >= cost["steps_seconds"] >= cost["train_seconds"] > 0
    assert 0 < cost["outside_training_share"] < 1

    out = tmp_path / "defaults.json"
    assert load_tool("bench_defaults").main(["--run", cost["run_dir"], "--runs", "3", "--rounds", "1",
                                             "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["results"]}
    assert list(rows) == ["baseline fp32", "(a) ort quantize_static defaults",
                          "(a') ort quantize_static U8S8 per-channel", "(b) torch-pruning magnitude + fine-tune",
                          "(c) rescompress fp32", "(c) rescompress int8"]
    base = rows["baseline fp32"]
    for row in rows.values():
        assert 0.0 <= row["top1"] <= 1.0 and 0 < row["p50_ms"] and row["size_bytes"] > 0
        assert row["delta_top1_pt"] == pytest.approx((row["top1"] - base["top1"]) * 100)
    assert rows["(a) ort quantize_static defaults"]["macs"] == base["macs"]
    assert rows["(a) ort quantize_static defaults"]["size_bytes"] < base["size_bytes"] / 2  # int8 weights
    assert rows["(b) torch-pruning magnitude + fine-tune"]["macs_reduction"] >= 1.5
    assert rows["(c) rescompress int8"]["macs_reduction"] >= 1.5
    assert result["finetune_epochs"] == 2  # as many as the recipe's stages train
    v = result["verdict"]
    assert v["at_least_as_fast_and_accurate"] == (v["speedup_vs_ort_default"] >= 1
                                                  and v["delta_top1_pt_vs_ort_default"] >= 0)
