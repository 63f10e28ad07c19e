"""Planning runs on real-sized data: normalisation from the weights, the cached file index, and settings that
would exhaust memory refused before anything is allocated."""

from __future__ import annotations

import pytest
import torch

from rescompress.errors import DataError, RecipeError
from rescompress.pipeline import index_path, make_plan
from rescompress.recipe import parse_recipe
from tests.test_data_files import write_folder


def _recipe(root, **data):
    return parse_recipe({"model": {"name": "resnet_tiny"},
                         "data": {"name": "image_folder", "root": str(root), "image_size": 32, "workers": 0,
                                  "val_fraction": 0.0, "test_fraction": 0.25, **data},
                         "export": [{"onnx": {"precision": "fp32"}}]})


@pytest.fixture
def folder(tmp_path):
    write_folder(tmp_path / "images", {"a": [(200, 20, 20)] * 4, "b": [(20, 20, 200)] * 4})
    return tmp_path / "images"


def test_normalize_auto_follows_the_weights(folder, tmp_path):
    from rescompress.models import build_model

    assert make_plan(_recipe(folder)).data.input_spec.normalization == "dataset"
    torch.save(build_model("resnet_tiny", num_classes=1000, in_channels=3).state_dict(), tmp_path / "in1k.pth")
    recipe = _recipe(folder)
    recipe.model.weights = str(tmp_path / "in1k.pth")
    spec = make_plan(recipe).data.input_spec
    assert (spec.normalization, spec.mean) == ("imagenet", (0.485, 0.456, 0.406))
    torch.save(build_model("resnet_tiny", num_classes=2, in_channels=3).state_dict(), tmp_path / "own.pth")
    recipe.model.weights = str(tmp_path / "own.pth")
    assert make_plan(recipe).data.input_spec.normalization == "dataset"


def test_the_index_is_scanned_once_per_cache_dir(folder, tmp_path):
    recipe = _recipe(folder)
    first = make_plan(recipe, cache_dir=tmp_path)
    assert first.data.streaming["index"] == "scanned" and index_path(recipe, tmp_path).is_file()
    again = make_plan(recipe, cache_dir=tmp_path)
    assert again.data.streaming["index"].startswith("file index read from")
    assert "streamed from disk by 0 worker(s)" in first.describe()
    assert "eval transform: RGB, resize shorter side to 37, center crop 32x32" in first.describe()
    other = _recipe(tmp_path / "elsewhere")  # another root never reads this index
    assert index_path(other, tmp_path) != index_path(recipe, tmp_path)


def test_a_batch_that_cannot_fit_is_refused_before_loading(folder, monkeypatch):
    import rescompress.data.base as base

    monkeypatch.setattr(base, "available_memory", lambda: 2 * 2**30)
    with pytest.raises(DataError, match=r"a batch of 256 images at 2048x2048 with 0 loader worker\(s\) needs about "
                                        r"\d+\.\d GiB .* only 2\.0 GiB is available; lower data.image_size"):
        make_plan(_recipe(folder, image_size=2048))


def test_an_in_memory_dataset_larger_than_free_memory_is_refused(monkeypatch):
    import rescompress.data.base as base

    monkeypatch.setattr(base, "available_memory", lambda: 1 * 2**30)
    recipe = parse_recipe({"model": {"name": "resnet_tiny"}, "data": {"name": "digits", "image_size": 1024}})
    with pytest.raises(DataError, match=r"dataset 'digits' at 1024x1024 with 1 channel\(s\) would hold 1,797 images "
                                        r"in memory: about 2\.3 GiB, but only 1\.0 GiB is available.*image_folder or "
                                        r"manifest"):
        make_plan(recipe)


def test_an_absurd_image_size_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"data.image_size: Input should be less than or equal to 4096"):
        parse_recipe({"data": {"name": "image_folder", "root": "/x", "image_size": 100000}})
