"""Data loading: splits, preprocessing, batching, and each source on small files written here."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rescompress.data import (
    DATASETS,
    InputSpec,
    Split,
    batches,
    default_root,
    load_dataset,
    read_idx,
    stratified_split,
)
from rescompress.errors import DataError, UnknownNameError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ---------------------------------------------------------------- digits and splitting


def test_digits_split_sizes_and_types(digits):
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == 1797
    assert len(digits.test) == round(1797 * 0.2)
    assert digits.train.images.dtype == torch.uint8 and digits.train.labels.dtype == torch.int64
    assert tuple(digits.train.images.shape[1:]) == (1, 8, 8)
    assert digits.train.images.max() == 255
    assert digits.num_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    assert digits.augmentations == ("crop",)
    assert digits.summary()["sizes"] == {"train": sizes[0], "val": sizes[1], "test": sizes[2]}


def test_digits_splits_are_stratified_and_disjoint(digits):
    overall = np.bincount(np.concatenate([s.labels.numpy() for s in (digits.train, digits.val, digits.test)]))
    for split in (digits.train, digits.val, digits.test):
        counts = np.bincount(split.labels.numpy(), minlength=10)
        assert (counts > 0).all()
        np.testing.assert_allclose(counts / counts.sum(), overall / overall.sum(), atol=0.01)
    labels = np.repeat(np.arange(5), [3, 10, 20, 40, 27])
    keep, held = stratified_split(labels, 20, seed=0)
    assert len(held) == 20 and np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))
    assert np.bincount(labels[held]).tolist() == [1, 2, 4, 8, 5]


def test_digits_split_is_deterministic_and_follows_seed(digits):
    again = load_dataset("digits")
    other = load_dataset("digits", seed=1)
    assert torch.equal(digits.test.images, again.test.images) and torch.equal(digits.val.labels, again.val.labels)
    assert not torch.equal(digits.test.images, other.test.images)


def test_empty_split_and_bad_fraction_raise():
    with pytest.raises(DataError, match="empty split"):
        load_dataset("digits", val_fraction=0.0001)
    with pytest.raises(DataError, match=r"test_fraction must be in \(0, 1\)"):
        load_dataset("digits", test_fraction=1.0)


def test_limit_train_keeps_stratified_subset():
    small = load_dataset("digits", limit_train=100)
    assert len(small.train) == 100
    assert (np.bincount(small.train.labels.numpy(), minlength=10) >= 9).all()
    assert len(small.test) == round(1797 * 0.2)


def test_resize_and_channels_and_stats(digits):
    big = load_dataset("digits", image_size=16, channels=3)
    assert tuple(big.train.images.shape[1:]) == (3, 16, 16) and big.train.images.dtype == torch.uint8
    assert torch.equal(big.train.images[:, 0], big.train.images[:, 2])
    spec = big.input_spec
    assert (spec.channels, spec.height, spec.width) == (3, 16, 16)
    x = big.train.images.double() / 255
    np.testing.assert_allclose(spec.mean, x.mean(dim=(0, 2, 3)).tolist(), rtol=1e-9)
    np.testing.assert_allclose(spec.std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), rtol=1e-6)
    # mean/std come from train only
    x = digits.train.images.double() / 255
    assert digits.input_spec.mean[0] == pytest.approx(x.mean().item())


# ---------------------------------------------------------------- input spec


def test_input_spec_round_trip_and_normalize_agree():
    spec = InputSpec(channels=3, height=4, width=5, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 1.0))
    assert InputSpec.from_dict(spec.to_dict()) == spec
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = spec.normalize(images)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), spec.normalize_numpy(images.numpy()), atol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0, 0].item(), (images[0, 1, 0, 0].item() / 255 - 0.2) / 0.25, atol=1e-6)
    with pytest.raises(DataError, match="2 channels"):
        spec.normalize(images[:, :2])
    with pytest.raises(DataError, match="3 mean and std"):
        InputSpec(channels=3, height=4, width=4, mean=(0.5,), std=(0.5,))


# ---------------------------------------------------------------- batching


def test_batches_shapes_dtypes_and_last_partial(digits):
    out = list(batches(digits.val, digits.input_spec, 64))
    assert [len(y) for _, y in out] == [64, 64, 16]  # 144 val images; the partial batch is kept
    x, y = out[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.cat([y for _, y in out]), digits.val.labels)


def test_batches_deterministic_from_seed_and_epoch(digits):
    def run(seed: int, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        augment = ("crop", "flip")
        return list(batches(digits.train, digits.input_spec, 100, shuffle=True, seed=seed, epoch=epoch, augment=augment))

    a, b, c, d = run(0), run(0), run(1), run(0, epoch=1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    assert not torch.equal(a[0][1], d[0][1])  # each epoch draws a new order


def test_ranks_get_disjoint_shares_of_each_batch(digits):
    whole = list(batches(digits.train, digits.input_spec, 64, shuffle=True, seed=3))
    shares = [list(batches(digits.train, digits.input_spec, 64, shuffle=True, seed=3, rank=r, world=2)) for r in (0, 1)]
    for (_, y), (_, y0), (_, y1) in zip(whole, *shares):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_augment_changes_pixels_not_shape(digits):
    plain = next(batches(digits.train, digits.input_spec, 256))[0]
    for aug in (("crop",), ("flip",)):
        x = next(batches(digits.train, digits.input_spec, 256, seed=0, augment=aug))[0]
        assert x.shape == plain.shape and not torch.equal(x, plain)
    with pytest.raises(DataError, match="unknown augmentation"):
        next(batches(digits.train, digits.input_spec, 8, augment=("rotate",)))


def test_crop_pads_with_zero_pixels():
    split = Split(torch.full((64, 1, 8, 8), 200, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64))
    spec = InputSpec(channels=1, height=8, width=8, mean=(0.0,), std=(1.0,))
    x = next(batches(split, spec, 64, seed=0, augment=("crop",)))[0]
    values = torch.unique(x)
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(200 / 255)
    assert ((x == 0).flatten(1).sum(1) > 0).float().mean() > 0.5  # most images were shifted


# ---------------------------------------------------------------- Fashion-MNIST / IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, compress: bool, n_train: int = 40, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = _idx_bytes(array)
        (folder / (name + ".gz" if compress else name)).write_bytes(gzip.compress(data) if compress else data)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    arrays = _write_fashion(tmp_path, compress)
    suffix = ".gz" if compress else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    assert images.dtype == np.uint8 and np.array_equal(images, arrays["train-images-idx3-ubyte"])
    bundle = load_dataset("fashion_mnist", root=str(tmp_path), val_fraction=0.25)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 10)
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.uint8)))
    assert bundle.class_names[0] == "T-shirt/top" and bundle.source == str(tmp_path)


def test_idx_wider_dtype(tmp_path):
    values = np.array([[1, -2], [300, 4]], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 2, 2) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)


def test_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match=r"bad-idx is not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(_idx_bytes(np.zeros((4, 3, 3)))[:-5])
    with pytest.raises(DataError, match=r"short-idx has 47 bytes, its header promises 52 \(truncated"):
        read_idx(short)


def test_fashion_missing_root_names_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset("fashion_mnist", root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value) and "data.root" in str(err.value)
    assert default_root("fashion_mnist") == "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, per_batch: int = 10, meta: bool = True, protocol: int = 2) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    if meta:
        names = [f"c{i}".encode() for i in range(10)]
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_from_pickle_batches(tmp_path, protocol):
    _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    bundle = load_dataset("cifar10", root=str(tmp_path), val_fraction=0.2)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 10)
    assert tuple(bundle.train.images.shape[1:]) == (3, 32, 32)
    assert bundle.class_names == [f"c{i}" for i in range(10)] and bundle.augmentations == ("crop", "flip")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(bundle.test.images.flatten(1), torch.from_numpy(raw[b"data"]))


def test_cifar10_missing_batch_and_unsafe_pickle(tmp_path):
    _write_cifar(tmp_path, meta=False)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match="missing .*data_batch_3, test_batch"):
        load_dataset("cifar10", root=str(tmp_path))
    _write_cifar(tmp_path, meta=False)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Path("x")}))
    with pytest.raises(DataError, match="cannot read CIFAR batch .*data_batch_1"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="needs `data.root"):
        load_dataset("cifar10")


# ---------------------------------------------------------------- registry


def test_unknown_dataset_suggests_nearest():
    assert set(DATASETS.names()) == {"cifar10", "digits", "fashion_mnist", "image_folder", "manifest"}
    with pytest.raises(UnknownNameError, match="did you mean 'digits'"):
        load_dataset("digit")
    with pytest.raises(DataError, match="takes no root"):
        load_dataset("digits", root="/tmp")


def test_val_fraction_zero_means_no_validation_split():
    from rescompress.data import load_dataset

    bundle = load_dataset("digits", val_fraction=0.0)
    assert len(bundle.val) == 0 and len(bundle.train) + len(bundle.test) == 1797
