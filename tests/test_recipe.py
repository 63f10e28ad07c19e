from __future__ import annotations

import copy

import pytest
import yaml

from rescompress.errors import PlanError, RecipeError
from rescompress.recipe import load_recipe, parse_recipe, save_resolved
from rescompress.stages import check_order
from tests.conftest import TINY_RECIPE, write_recipe


def test_defaults_fill_every_section():
    r = parse_recipe({})
    assert r.model.name == "resnet20" and r.data.name == "digits"
    assert [e.name for e in r.export] == ["onnx-fp32"]
    assert r.devices == ["host-cpu"]


def test_name_defaults_to_file_stem(tmp_path):
    data = copy.deepcopy(TINY_RECIPE)
    del data["name"]
    assert load_recipe(write_recipe(tmp_path / "my_run.yaml", data)).name == "my_run"


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write_recipe(tmp_path / "t.yaml", {**TINY_RECIPE, "stages": [{"finetune": {"epochs": 1}}]}))
    out = save_resolved(r, tmp_path / "resolved.yaml")
    data = yaml.safe_load(out.read_text())
    assert data["schema_version"] == 1
    assert data["stages"] == [{"finetune": {"epochs": 1, "lr": None}}]
    assert data["train"]["optimizer"] == "sgd"  # defaults are written out
    again = parse_recipe(data)
    assert again.digest() == r.digest()


def test_string_shorthands():
    r = parse_recipe({"stages": ["finetune"], "export": ["onnx"], "devices": "host-cpu"})
    assert r.stages[0].kind == "finetune" and r.stages[0].config.epochs == 3
    assert r.export[0].name == "onnx-fp32" and r.devices == ["host-cpu"]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"modle": {}}, r"modle: unknown key 'modle' — did you mean 'model'\?"),
        ({"data": {"nmae": "digits"}}, r"data\.nmae: unknown key 'nmae' — did you mean 'name'\?"),
        ({"train": {"epochs": "ten"}}, r"train\.epochs: Input should be a valid integer.*'ten'"),
        ({"train": {"lr": -0.1}}, r"train\.lr: Input should be greater than 0"),
        ({"data": {"val_fraction": 1.5}}, r"data\.val_fraction: Input should be less than 1"),
        ({"model": ["resnet20"]}, r"model: expected a mapping, got a list"),
        ({"stages": [{"finetune": {"epoch": 2}}]}, r"stages\[0\]\.finetune\.epoch: unknown key 'epoch' — did you mean 'epochs'\?"),
        ({"stages": [{"fintune": {}}]}, r"stages\[0\]: unknown stage 'fintune' — did you mean 'finetune'\?"),
        ({"stages": {"finetune": {}}}, r"stages: expected a list of one-key mappings"),
        ({"stages": [{"finetune": 3}]}, r"stages\[0\]\.finetune: expected a mapping of options"),
        ({"export": [{"onnx": {"precision": "int4"}}]}, r"export\[0\]\.onnx\.precision: Input should be 'fp32'"),
        ({"export": [{"tensorrt": {"opset": 17}}]}, r"export\[0\]\.tensorrt\.opset: Input should be greater than or equal to 18"),
        ({"export": [{"tensorrt": {"opset": 24}}]}, r"export\[0\]\.tensorrt\.opset: Input should be less than or equal to 23"),
        ({"export": [{"onxx": {}}]}, r"export\[0\]: unknown export target 'onxx' — did you mean 'onnx'\?"),
        ({"export": ["onnx", "onnx"]}, r"export: onnx-fp32 listed more than once"),
        ({"train": {"augment": ["rotate"]}}, r"train\.augment"),
        ({"name": "../escape"}, r"name: String should match pattern"),
        ({"schema_version": 7}, r"schema_version 7 is not supported"),
    ],
)
def test_bad_recipes_name_the_field(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data, "r.yaml")


def test_error_names_the_file(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", {"trian": {}})
    with pytest.raises(RecipeError, match=r"bad\.yaml: trian: unknown key 'trian' — did you mean 'train'\?"):
        load_recipe(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", r"the recipe is empty"),
        ("model: {name: resnet20\n", r"YAML syntax error at line"),
        ("- model\n- data\n", r"expected a mapping of sections .* got a list"),
    ],
)
def test_unreadable_recipes(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file not found: .*nope\.yaml"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "kinds, match",
    [
        (["qat", "prune"], r"stages\[1\] prune cannot follow stages\[0\] qat: nothing structural after int8 "
                           r"quantization; move prune before qat"),
        (["ptq", "finetune"], r"stages\[1\] finetune cannot follow stages\[0\] ptq: no finetune after int8"),
        (["ptq", "distill"], r"stages\[1\] distill cannot follow stages\[0\] ptq: no distill after int8"),
        (["prune", "qat", "ptq"], r"stages\[1\] qat and stages\[2\] ptq are exclusive: keep one of them"),
        (["ptq", "qat"], r"stages\[0\] ptq and stages\[1\] qat are exclusive"),
        (["qat", "qat"], r"stages\[1\] qat cannot follow stages\[0\] qat"),
    ],
)
def test_impossible_stage_orders(kinds, match):
    with pytest.raises(PlanError, match=match):
        check_order(kinds)


@pytest.mark.parametrize("kinds", [["prune", "distill", "qat"], ["prune", "ptq"], ["distill", "prune", "finetune", "ptq"],
                                   ["prune", "prune", "distill"]])
def test_legal_stage_orders(kinds):
    check_order(kinds)


def test_file_stem_is_made_safe_for_a_directory_name(tmp_path):
    data = {k: v for k, v in TINY_RECIPE.items() if k != "name"}
    assert load_recipe(write_recipe(tmp_path / "my recipe (v2).yaml", data)).name == "my-recipe-v2"
