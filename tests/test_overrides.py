"""`rescompress run --set PATH=VALUE` and keys given twice: an override is read like a `sweep --grid` value,
applied to the recipe's data before validation and recorded in the resolved recipe; a key repeated in a
recipe file, or a path repeated in the overrides, is refused with what and where."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

from rescompress.cli import app
from rescompress.errors import RecipeError
from rescompress.pipeline import RESOLVED
from rescompress.recipe import load_recipe, parse_overrides, save_resolved
from tests.conftest import TINY_RECIPE, write_recipe

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, " ".join(result.output.split())  # stdout and stderr


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)


def test_an_override_takes_effect_in_the_dry_run(recipe, tmp_path):
    code, out = invoke("run", str(recipe), "--dry-run", "--out", str(tmp_path / "runs"),
                       "--set", "train.epochs=3", "--set", "stages=[finetune]", "--set", "report.latency.runs=7")
    assert code == 0, out
    assert "--set train.epochs=3, stages=[finetune], report.latency.runs=7" in out
    assert "train 3 epochs" in out and "01-finetune" in out and "7 runs" in out and "plan is valid" in out
    assert not (tmp_path / "runs").exists()


def test_overrides_are_typed_like_grid_values_and_validated_with_the_recipe(recipe):
    r = load_recipe(recipe, ["train.lr=0.1", "data.root=null", "devices=[host-cpu]", "train.augment=[crop]",
                             "stages=[{finetune: {epochs: 1}}]", "export.0.onnx.precision=int8"])
    assert r.train.lr == 0.1 and r.data.root is None and r.train.augment == ["crop"]
    assert r.stages[0].config.epochs == 1 and r.export[0].config.precision == "int8"
    assert r.overrides == ["train.lr=0.1", "data.root=null", "devices=[host-cpu]", "train.augment=[crop]",
                           "stages=[{finetune: {epochs: 1}}]", "export.0.onnx.precision=int8"]
    assert load_recipe(recipe, ["train.lr=0.05"]).digest() == load_recipe(recipe).digest()  # the record is not hashed


@pytest.mark.parametrize("option, match", [
    ("train.lrr=0.1", r"tiny\.yaml with --set train\.lrr=0\.1: train\.lrr: unknown key 'lrr' — did you mean 'lr'\?"),
    ("trian.epochs=1", r"unknown key 'trian' — did you mean 'train'\?"),
    ("stages.0.prune.epochs=1", r"--set stages\.0\.prune\.epochs: stages has 0 entries; stages\.0 is not one of them"),
    ("export.0.tflite.precision=fp32", r"--set export\.0\.tflite\.precision: export\.0 is a onnx entry, not tflite"),
    ("train.epochs.x=1", r"--set train\.epochs\.x: train\.epochs is a value, not a section"),
    ("train.epochs=three", r"train\.epochs: Input should be a valid integer.*\(got 'three'\)"),
    ("train.lr=-1", r"train\.lr: Input should be greater than 0"),
    ("train.epochs", r"--set 'train\.epochs': expected PATH=VALUE"),
    ("train.epochs=", r"--set 'train\.epochs=': expected PATH=VALUE"),
])
def test_a_bad_override_fails_like_a_recipe_error(recipe, tmp_path, option, match):
    for dry_run in (["--dry-run"], []):
        code, out = invoke("run", str(recipe), "--out", str(tmp_path / "runs"), "--set", option, *dry_run)
        assert code == 2 and "Traceback" not in out, out
        assert re.search(match, out), out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("options, match", [
    (["train.lr=1", "train.lr=2"], r"--set train\.lr is given twice \(train\.lr=1 and train\.lr=2\); keep one"),
    (["train={epochs: 1}", "train.epochs=2"],
     r"--set train=\{epochs: 1\} and --set train\.epochs=2 overlap \(both set train\.epochs\); keep one"),
    (["train.epochs=2", "train={epochs: 1}"], r"overlap \(both set train\.epochs\)"),
    (["train={lr: 1, lr: 2}"], r"the key 'lr' appears twice \(line 1, columns 2 and 9\)"),
])
def test_an_override_given_twice_is_refused(recipe, options, match):
    with pytest.raises(RecipeError, match=match):
        parse_overrides(options)
    code, out = invoke("run", str(recipe), "--dry-run", *[a for o in options for a in ("--set", o)])
    assert code == 2 and re.search(match, out), out
    assert parse_overrides(["train.lr=1", "train.lrs=2"]) == {"train.lr": 1, "train.lrs": 2}  # a prefix of a name


DUPLICATES = {
    "key in a section": ("name: tiny\ntrain:\n  epochs: 2\n  lr: 0.1\n  batch_size: 8\n  lr: 0.2\n",
                         r"tiny\.yaml: train\.lr: the key 'lr' appears twice \(lines 4 and 6\)"),
    "section": ("data:\n  name: digits\ntrain:\n  epochs: 1\ndata:\n  limit_train: 100\n",
                r"tiny\.yaml: data: the key 'data' appears twice \(lines 1 and 5\)"),
    "stage option": ("stages:\n  - finetune: {epochs: 1}\n  - prune:\n      epochs: 1\n      round_to: 8\n      epochs: 2\n",
                     r"stages\[1\]\.prune\.epochs: the key 'epochs' appears twice \(lines 4 and 6\)"),
    "flow mapping": ("report: {latency: {runs: 5, warmup: 1, runs: 6}}\n",
                     r"report\.latency\.runs: the key 'runs' appears twice \(line 1, columns 20 and 40\)"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_a_key_given_twice_in_a_recipe_file_names_both_lines(tmp_path, case):
    text, match = DUPLICATES[case]
    path = write_recipe(tmp_path / "tiny.yaml", text)
    with pytest.raises(RecipeError, match=match + r"; YAML would keep only the last one"):
        load_recipe(path)
    code, out = invoke("run", str(path), "--dry-run")
    assert code == 2 and re.search(match, out), out


def test_merge_keys_are_not_duplicates(tmp_path):
    text = yaml.safe_dump({k: v for k, v in TINY_RECIPE.items() if k != "train"}, sort_keys=False)
    path = write_recipe(tmp_path / "tiny.yaml", "train: &t {epochs: 1, lr: 0.1}\n" + text
                        + "stages:\n- finetune: {<<: *t, lr: 0.01}\n")
    r = load_recipe(path)
    assert r.stages[0].config.epochs == 1 and r.stages[0].config.lr == 0.01 and r.train.lr == 0.1


def test_the_resolved_recipe_records_the_overrides_and_resumes_without_applying_them(recipe, tmp_path):
    from rescompress.rundir import Manifest

    r = load_recipe(recipe, ["train.epochs=3", "data.limit_train=200"])
    run_dir = tmp_path / "runs" / "tiny-1"
    run_dir.mkdir(parents=True)
    save_resolved(r, run_dir / RESOLVED)
    Manifest.create(run_dir, r)
    text = (run_dir / RESOLVED).read_text(encoding="utf-8")
    assert "# overrides: the --set options it was run with" in text
    data = yaml.safe_load(text)
    assert list(data)[:2] == ["schema_version", "overrides"]
    assert data["overrides"] == ["train.epochs=3", "data.limit_train=200"]
    assert data["train"]["epochs"] == 3 and data["data"]["limit_train"] == 200

    code, out = invoke("run", "--resume", str(run_dir), "--dry-run")  # the record is read, not applied again
    assert code == 0 and "train 3 epochs" in out and "train 200 /" in out, out

    again = load_recipe(run_dir / RESOLVED, ["train.epochs=4", "seed=1"])  # running a resolved recipe again
    assert again.overrides == ["data.limit_train=200", "train.epochs=4", "seed=1"]
    assert again.train.epochs == 4 and load_recipe(run_dir / RESOLVED).digest() == r.digest()
    # a recipe without --set is saved as before
    save_resolved(load_recipe(recipe), tmp_path / "plain.yaml")
    assert "overrides" not in (tmp_path / "plain.yaml").read_text(encoding="utf-8")


def test_set_with_resume_is_refused(recipe, tmp_path):
    for dry_run in (["--dry-run"], []):
        code, out = invoke("run", "--resume", str(tmp_path / "runs" / "tiny-1"), "--set", "train.epochs=3", *dry_run)
        assert code == 2, out
        assert re.search(r"--set cannot change a resumed run: it goes on with the recipe it started with "
                         r"\(.*tiny-1/recipe\.yaml\); drop --set, or start a new run with it", out), out


def test_a_hand_written_overrides_list_is_refused(tmp_path):
    path = write_recipe(tmp_path / "tiny.yaml", {**TINY_RECIPE, "overrides": ["train.epochs=3"]})
    with pytest.raises(RecipeError, match=r"tiny\.yaml: overrides: is the record of --set options a resolved recipe "
                                          r"keeps \(they are applied already\)"):
        load_recipe(path)


@pytest.mark.slow
def test_a_run_uses_its_overrides_records_them_and_resumes(recipe, tmp_path):
    code, out = invoke("run", str(recipe), "--out", str(tmp_path / "runs"), "--set", "train.epochs=1",
                       "--set", "report.latency.runs=3")
    assert code == 0, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    resolved = yaml.safe_load((run_dir / RESOLVED).read_text(encoding="utf-8"))
    assert resolved["overrides"] == ["train.epochs=1", "report.latency.runs=3"]
    assert resolved["train"]["epochs"] == 1 and resolved["report"]["latency"]["runs"] == 3
    assert (run_dir / "recipe.original.yaml").read_text(encoding="utf-8") == recipe.read_text(encoding="utf-8")
    code, out = invoke("run", "--resume", str(run_dir))  # everything finished: the recorded recipe resumes
    assert code == 0 and "resuming" in out, out
