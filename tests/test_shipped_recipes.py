"""Every recipe under recipes/ is valid: it plans (data loaded, stage order and exports checked) without
training anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from tests import ci

from rescompress.data.sources import FASHION_MNIST_ROOT
from rescompress.export import TARGETS
from rescompress.pipeline import make_plan
from rescompress.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_the_documented_recipes_ship():
    assert {p.stem for p in RECIPES} >= {"quickstart", "int8_jetson", "tflite_phone", "fashion_mnist_int8"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_plans(path, tmp_path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if data["data"]["name"] == "fashion_mnist" and not Path(FASHION_MNIST_ROOT).is_dir():
        ci.missing(f"Fashion-MNIST is not installed in {FASHION_MNIST_ROOT} (make fashion-mnist)")
    overrides = []
    if data["data"]["name"] == "image_folder" and not data["data"].get("root"):  # the user's folder: --set data.root
        from tests.test_data_files import write_folder

        write_folder(tmp_path / "images", {"a": [(200, 30, 30)] * 6, "b": [(30, 30, 200)] * 6}, size=(40, 32))
        overrides = [f"data.root={tmp_path / 'images'}"]
    weights = (data.get("model") or {}).get("weights")
    if weights and weights.endswith(".keras") and not Path(weights).exists():  # made by tools/keras_resnet.py
        if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
            ci.missing("the recipe imports a Keras model: needs the 'tensorflow' extra")
        from tests.test_bench_tools import load_tool

        load_tool("keras_resnet").build(size=32).save(tmp_path / "model.keras")
        overrides.append(f"model.weights={tmp_path / 'model.keras'}")
    recipe = load_recipe(path, overrides)
    for entry in recipe.export:
        needed = TARGETS.get(entry.target).requires(entry.config)
        if needed and importlib.util.find_spec(needed[0]) is None:
            pytest.skip(f"{entry.name} needs the '{needed[1]}' extra: pip install 'rescompress[{needed[1]}]'")
    plan = make_plan(recipe, source=path)
    kinds = [s.kind for s in recipe.stages]
    # the whole chain: prune, recover (distil or fine-tune), QAT; something distils from a float model
    assert kinds[0] == "prune" and kinds[1] in {"distill", "finetune"} and kinds[2] == "qat", kinds
    assert "distill" in kinds or recipe.stages[2].config.distill, f"{kinds}: no stage distils"
    assert {"fp32", "int8"} <= {e.config.precision for e in recipe.export}
    assert plan.devices
    device_runtimes = {r for d in plan.devices for r in d.runtimes}
    assert {TARGETS.get(e.target).runtime for e in recipe.export} <= device_runtimes, "an export no device runs"
