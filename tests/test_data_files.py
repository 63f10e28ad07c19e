"""Datasets that stream from disk: image folders and manifests, their index, transforms and failure modes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rescompress.data import FileIndex, InputSpec, StreamOptions, batches, load_dataset
from rescompress.data.transforms import EvalTransform, TrainTransform, random_resized_box
from rescompress.errors import DataError


def write_folder(root: Path, classes: dict[str, list[tuple[int, int, int]]], size: tuple[int, int] = (12, 8),
                 suffix: str = ".png") -> None:
    from PIL import Image

    for name, colours in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (size[0] + i, size[1]), colour).save(root / name / f"{i}{suffix}")


def pixels(split, spec: InputSpec, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split as uint8 values (undoing the spec's normalisation), with labels."""
    xs, ys = zip(*batches(split, spec, 8, **kw))
    x = torch.cat(xs) * torch.tensor(spec.std).view(1, -1, 1, 1) + torch.tensor(spec.mean).view(1, -1, 1, 1)
    return (x * 255).round().to(torch.uint8), torch.cat(ys)


def opts(**kw) -> StreamOptions:
    return StreamOptions(**{"workers": 0, **kw})


def test_flat_layout_is_split_and_streams(tmp_path):
    write_folder(tmp_path, {"cat": [(200, 10, 10)] * 10, "dog": [(10, 10, 200)] * 10})
    bundle = load_dataset("image_folder", root=str(tmp_path), image_size=8, test_fraction=0.2, val_fraction=0.25,
                          options=opts())
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (12, 4, 4)
    assert bundle.class_names == ["cat", "dog"] and bundle.summary()["in_memory"] is False
    x, y = pixels(bundle.train, bundle.input_spec)
    assert x.shape == (12, 3, 8, 8)
    cat = x[y == 0]
    assert (cat[:, 0] == 200).all() and (cat[:, 2] == 10).all()


def test_split_layout_and_default_size(tmp_path):
    colours = {"a": [(0, 0, 0)] * 4, "b": [(255, 255, 255)] * 4}
    write_folder(tmp_path / "train", colours)
    write_folder(tmp_path / "test", {"a": [(0, 0, 0)] * 2, "b": [(255, 255, 255)] * 3})
    bundle = load_dataset("image_folder", root=str(tmp_path), val_fraction=0.25, options=opts())
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 2, 5)
    assert (bundle.input_spec.height, bundle.input_spec.resize) == (224, 256)
    write_folder(tmp_path / "val", {"b": [(255, 255, 255)]})
    bundle = load_dataset("image_folder", root=str(tmp_path), image_size=5, options=opts())
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 1, 5)


def test_rgb_to_grey_is_luminance(tmp_path):
    write_folder(tmp_path, {"red": [(255, 0, 0)] * 3, "blue": [(0, 0, 255)] * 3})
    grey = load_dataset("image_folder", root=str(tmp_path), image_size=4, channels=1, test_fraction=0.34,
                        val_fraction=0.5, normalize="dataset", options=opts())
    values = {}
    for split in (grey.train, grey.val, grey.test):
        x, y = pixels(split, grey.input_spec)
        values.update({grey.class_names[int(label)]: int(img.max()) for img, label in zip(x, y)})
    assert values == {"red": 76, "blue": 29}


def test_eval_transform_resizes_shorter_side_then_center_crops(tmp_path):
    from PIL import Image

    # a 40x20 image: left half black, right half white; the center 8x8 crop of its 16x8 resize straddles both
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 20:] = 255
    Image.fromarray(img).save(tmp_path / "half.png")
    out = EvalTransform(size=8, channels=3, resize=8, interpolation="nearest")(str(tmp_path / "half.png"))
    assert out.shape == (3, 8, 8)
    assert (out[:, :, :4] == 0).all() and (out[:, :, 4:] == 255).all()
    squash = EvalTransform(size=8, channels=3, resize=None, interpolation="nearest")(str(tmp_path / "half.png"))
    assert (squash[:, :, :4] == 0).all() and (squash[:, :, 4:] == 255).all()


def test_jpeg_draft_decoding_matches_full_decode_closely(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((64, 64, 1))).astype(np.uint8)  # 512x512 blocks
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    fast = EvalTransform(size=32, channels=3, resize=36)(str(tmp_path / "big.jpg")).astype(float)
    with Image.open(tmp_path / "big.jpg") as im:  # no draft: decoded at full size
        full = im.convert("RGB").resize((36, 36), Image.Resampling.BILINEAR).crop((2, 2, 34, 34))
    assert np.abs(fast - np.asarray(full, float).transpose(2, 0, 1)).mean() < 6


def test_random_resized_box_stays_inside_and_follows_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_box(300, 200, (0.5, 1.0), (0.75, 4 / 3), rng)
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
        assert w * h >= 0.45 * 300 * 200


def test_training_draws_depend_on_seed_epoch_and_sample_never_on_workers(tmp_path):
    write_folder(tmp_path, {"a": [(i * 20, 0, 250 - i * 20) for i in range(6)],
                            "b": [(0, i * 30, 100) for i in range(6)]}, size=(30, 20), suffix=".jpg")
    kw = dict(image_size=16, val_fraction=0.0, test_fraction=0.25, normalize="imagenet")
    aug = ("random_resized_crop", "flip", "color_jitter")
    one = load_dataset("image_folder", root=str(tmp_path), options=opts(workers=0, color_jitter=0.3), **kw)
    two = load_dataset("image_folder", root=str(tmp_path), options=opts(workers=2, color_jitter=0.3), **kw)

    def epoch(bundle, e):
        return [b for b in batches(bundle.train, bundle.input_spec, 4, shuffle=True, seed=5, epoch=e, augment=aug)]

    a, b = epoch(one, 1), epoch(two, 1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], epoch(one, 2)[0][0])
    two.train.close()


def test_ranks_decode_disjoint_shares(tmp_path):
    write_folder(tmp_path, {"a": [(10, 10, 10)] * 8, "b": [(90, 90, 90)] * 8})
    bundle = load_dataset("image_folder", root=str(tmp_path), image_size=4, val_fraction=0.0, test_fraction=0.25,
                          options=opts())
    whole = [y for _, y in batches(bundle.train, bundle.input_spec, 6, shuffle=True, seed=1)]
    shares = [[y for _, y in batches(bundle.train, bundle.input_spec, 6, shuffle=True, seed=1, rank=r, world=2)]
              for r in (0, 1)]
    for y, y0, y1 in zip(whole, *shares):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_normalize_choices(tmp_path):
    write_folder(tmp_path, {"a": [(255, 0, 0)] * 4, "b": [(0, 0, 255)] * 4})
    kw = dict(root=str(tmp_path), image_size=4, val_fraction=0.0, test_fraction=0.25, options=opts())
    assert load_dataset("image_folder", normalize="imagenet", **kw).input_spec.mean == (0.485, 0.456, 0.406)
    given = load_dataset("image_folder", normalize={"mean": [0.5] * 3, "std": [0.25] * 3}, **kw).input_spec
    assert (given.mean, given.std, given.normalization) == ((0.5,) * 3, (0.25,) * 3, "recipe")
    stats = load_dataset("image_folder", normalize="dataset", **kw).input_spec
    assert stats.normalization == "dataset" and stats.mean[1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DataError, match="needs 3 mean and 3 std values"):
        load_dataset("image_folder", normalize={"mean": [0.5], "std": [0.25]}, **kw)
    with pytest.raises(DataError, match="imagenet needs RGB input"):
        load_dataset("image_folder", normalize="imagenet", channels=1, **{k: v for k, v in kw.items()})


def test_spec_and_summary_state_the_whole_eval_transform(tmp_path):
    write_folder(tmp_path, {"a": [(1, 2, 3)] * 4, "b": [(4, 5, 6)] * 4})
    bundle = load_dataset("image_folder", root=str(tmp_path), image_size=224, normalize="imagenet",
                          val_fraction=0.0, test_fraction=0.25, options=opts(interpolation="bicubic"))
    text = bundle.summary()["eval_transform"]
    for part in ("RGB", "shorter side to 256", "center crop 224x224", "bicubic", "0.4850", "0.2290",
                 "imagenet statistics", "NCHW float32"):
        assert part in text
    spec = bundle.input_spec
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ---------------------------------------------------------------- manifests and the index


def test_manifest_csv_and_json_with_splits(tmp_path):
    write_folder(tmp_path / "img", {"cat": [(200, 0, 0)] * 6, "dog": [(0, 0, 200)] * 6})
    rows = [(f"img/{c}/{i}.png", c, "test" if i >= 4 else "train") for c in ("cat", "dog") for i in range(6)]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(",".join(r) for r in rows) + "\n")
    bundle = load_dataset("manifest", root=str(tmp_path / "m.csv"), image_size=4, val_fraction=0.25, options=opts())
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 2, 4)
    assert bundle.class_names == ["cat", "dog"]
    (tmp_path / "m.json").write_text(json.dumps([{"path": p, "label": c} for p, c, _ in rows]))
    bundle = load_dataset("manifest", root=str(tmp_path / "m.json"), image_size=4, val_fraction=0.0,
                          test_fraction=0.25, options=opts())
    assert (len(bundle.train), len(bundle.test)) == (9, 3)


def test_manifest_errors(tmp_path):
    write_folder(tmp_path, {"cat": [(200, 0, 0)] * 2})
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("manifest", root=str(tmp_path / "none.csv"))
    (tmp_path / "m.csv").write_text("file,class\ncat/0.png,cat\n")
    with pytest.raises(DataError, match="header row with columns path,label"):
        load_dataset("manifest", root=str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("path,label\ncat/0.png,cat\ncat/1.png,cat\n")
    with pytest.raises(DataError, match=r"1 class\(es\) \(cat: 2\); a classifier needs at least two"):
        load_dataset("manifest", root=str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("path,label\ncat/0.png,cat\ngone.png,dog\n")
    with pytest.raises(DataError, match="1 of the first 2 listed files do not exist, e.g. .*gone.png"):
        load_dataset("manifest", root=str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("path,label,split\ncat/0.png,cat,train\ncat/1.png,dog,holdout\n")
    with pytest.raises(DataError, match="split must be one of train, val, test"):
        load_dataset("manifest", root=str(tmp_path / "m.csv"))


def test_folder_errors_give_class_counts(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("image_folder", root=str(tmp_path), image_size=4)
    write_folder(tmp_path, {"full": [(1, 1, 1)] * 3})
    with pytest.raises(DataError, match=r"has 1 class\(es\) \(full: 3\); a classifier needs at least two"):
        load_dataset("image_folder", root=str(tmp_path), image_size=4)
    (tmp_path / "empty").mkdir()
    write_folder(tmp_path, {"other": [(9, 9, 9)] * 2})
    with pytest.raises(DataError, match=r"class\(es\) empty have no images \(class counts: empty: 0, full: 3, other: 2\)"):
        load_dataset("image_folder", root=str(tmp_path), image_size=4)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("image_folder", root=str(tmp_path / "missing"), image_size=4)


def test_index_is_cached_and_checked(tmp_path):
    write_folder(tmp_path / "data", {"a": [(1, 1, 1)] * 4, "b": [(2, 2, 2)] * 4})
    cache = tmp_path / "index.json"
    kw = dict(root=str(tmp_path / "data"), image_size=4, val_fraction=0.0, test_fraction=0.25)
    first = load_dataset("image_folder", options=opts(index_cache=cache), **kw)
    assert cache.is_file() and first.streaming["index"] == "scanned"
    write_folder(tmp_path / "data", {"c": [(3, 3, 3)] * 4})  # a new class: the cached index still rules
    again = load_dataset("image_folder", options=opts(index_cache=cache), **kw)
    assert again.streaming["index"].startswith("file index read from") and again.class_names == ["a", "b"]
    assert FileIndex.load(cache).digest() == first.streaming["index_digest"]
    doc = json.loads(cache.read_text())
    doc["labels"][0] = 1
    cache.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="does not match its digest"):
        load_dataset("image_folder", options=opts(index_cache=cache), **kw)


# ---------------------------------------------------------------- unreadable files and dying workers


def _with_broken(tmp_path: Path) -> Path:
    write_folder(tmp_path, {"a": [(10, 10, 10)] * 6, "b": [(200, 200, 200)] * 6})
    (tmp_path / "b" / "9.png").write_bytes(b"not a png at all")
    return tmp_path / "b" / "9.png"


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_mid_epoch_names_the_file(tmp_path, workers):
    broken = _with_broken(tmp_path)
    bundle = load_dataset("image_folder", root=str(tmp_path), image_size=4, val_fraction=0.0, test_fraction=0.25,
                          normalize="imagenet", options=opts(workers=workers))
    split = next(s for s in (bundle.train, bundle.test) if str(broken) in set(os.path.join(s.root, p) for p in s.paths))
    with pytest.raises(DataError, match=rf"cannot read image {broken}: .*data.on_corrupt: skip"):
        list(batches(split, bundle.input_spec, 4, shuffle=True, augment=("random_resized_crop",)))
    split.close()


def test_corrupt_image_skipped_and_counted(tmp_path):
    broken = _with_broken(tmp_path)
    bundle = load_dataset("image_folder", root=str(tmp_path), image_size=4, val_fraction=0.0, test_fraction=0.25,
                          normalize="imagenet", options=opts(workers=2, on_corrupt="skip"))
    seen = sum(len(y) for s in (bundle.train, bundle.test) for _, y in batches(s, bundle.input_spec, 4))
    assert seen == 12
    summary = bundle.summary()["streaming"]
    assert summary["skipped_files"] == 1 and summary["skipped_examples"][0].startswith(str(broken))
    bundle.train.close()
    bundle.test.close()


def test_a_dying_worker_ends_the_epoch_with_an_error(tmp_path, monkeypatch):
    write_folder(tmp_path, {"a": [(10, 10, 10)] * 6, "b": [(200, 200, 200)] * 6})
    bundle = load_dataset("image_folder", root=str(tmp_path), image_size=4, val_fraction=0.0, test_fraction=0.25,
                          normalize="imagenet", options=opts(workers=2))
    real = EvalTransform.__call__

    def die_on_b(self, path):  # the forked workers inherit this
        if "/b/" in path:
            os._exit(3)
        return real(self, path)

    monkeypatch.setattr(EvalTransform, "__call__", die_on_b)
    import multiprocessing

    import rescompress.data.files as files

    monkeypatch.setattr(files, "worker_context", lambda: multiprocessing.get_context("fork"))  # inherit the patch
    with pytest.raises(DataError, match="a data loader worker failed.*data.workers: 0"):
        list(batches(bundle.train, bundle.input_spec, 2))


def test_train_transform_validates_its_options():
    base = EvalTransform(size=8)
    with pytest.raises(DataError, match="crop_scale"):
        TrainTransform(base, scale=(0.0, 1.0))
    with pytest.raises(DataError, match="unknown augmentation"):
        TrainTransform(base, augment=("rotate",))


def test_workers_start_from_a_fork_server_once_a_threaded_runtime_is_loaded(tmp_path, monkeypatch):
    """After a TFLite conversion has loaded JAX or TensorFlow, forking would copy a process with their threads
    (which can deadlock); the workers then start from a fork server, and give the same batches."""
    import sys
    import types

    from rescompress.data.files import worker_context

    write_folder(tmp_path, {"a": [(i * 30, 10, 10) for i in range(6)], "b": [(10, 10, i * 30) for i in range(6)]},
                 size=(20, 16), suffix=".jpg")
    kw = dict(root=str(tmp_path), image_size=8, val_fraction=0.0, test_fraction=0.25, normalize="imagenet")
    aug = ("random_resized_crop", "flip")
    forked = load_dataset("image_folder", options=opts(workers=2), **kw)
    assert worker_context() is None or any(m in sys.modules for m in ("jax", "tensorflow"))
    a = list(batches(forked.train, forked.input_spec, 4, shuffle=True, seed=2, augment=aug))
    forked.train.close()
    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))
    assert worker_context().get_start_method() == "forkserver"
    served = load_dataset("image_folder", options=opts(workers=2), **kw)
    b = list(batches(served.train, served.input_spec, 4, shuffle=True, seed=2, augment=aug))
    served.train.close()
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
