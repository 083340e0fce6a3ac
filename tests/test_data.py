"""Tests for latentdiag.data: bundled datasets, IDX / CIFAR-10 readers, formats, errors."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiag.data import (
    BUNDLED,
    FORMATS,
    DataSplit,
    digits,
    load,
    mnist5k,
    read_cifar10,
    read_mnist,
)
from latentdiag.data import bundled as bundled_module

ALL_FORMATS = FORMATS + ("binary-stochastic",)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def _check_format(x: torch.Tensor, format: str, max_level: int) -> None:
    assert x.is_contiguous()
    if format == "levels":
        assert x.dtype == torch.int64
        assert int(x.min()) >= 0 and int(x.max()) <= max_level
        assert int(x.max()) == max_level  # the real data reach full intensity
    elif format == "float":
        assert x.dtype == torch.float32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    else:
        assert x.dtype == torch.float32
        assert set(torch.unique(x).tolist()) == {0.0, 1.0}


# --------------------------------------------------------------------------
# DataSplit
# --------------------------------------------------------------------------


def test_datasplit_unpacks_and_has_length() -> None:
    split = DataSplit(x=torch.zeros(3, 2), y=torch.tensor([0, 1, 1]), name="toy", num_classes=2)
    x, y = split
    assert x is split.x and y is split.y
    assert len(split) == 3
    assert "toy" in repr(split) and "float32[3, 2]" in repr(split)
    with pytest.raises(dataclasses.FrozenInstanceError):
        split.name = "other"  # type: ignore[misc]


def test_datasplit_validates_fields() -> None:
    with pytest.raises(ValueError, match="y must be a 1-D int64 tensor"):
        DataSplit(x=torch.zeros(3, 2), y=torch.zeros(3), name="toy", num_classes=2)
    with pytest.raises(ValueError, match="same number of samples"):
        DataSplit(x=torch.zeros(4, 2), y=torch.zeros(3, dtype=torch.int64), name="toy", num_classes=2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        DataSplit(x=np.zeros((3, 2)), y=torch.zeros(3, dtype=torch.int64), name="t", num_classes=2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# mnist5k
# --------------------------------------------------------------------------


@pytest.mark.parametrize("format", ALL_FORMATS)
def test_mnist5k_formats(format: str) -> None:
    data = mnist5k("test", format=format)
    assert data.x.shape == (1000, 1, 28, 28)
    assert data.y.dtype == torch.int64 and data.y.shape == (1000,)
    assert data.name == "mnist5k" and data.num_classes == 10
    _check_format(data.x, format, 255)


def test_mnist5k_flatten_and_format_consistency() -> None:
    levels = mnist5k("test", format="levels", flatten=True).x
    as_float = mnist5k("test", format="float", flatten=True).x
    binary = mnist5k("test", format="binary", flatten=True).x
    assert levels.shape == as_float.shape == (1000, 784)
    assert torch.equal(as_float, levels.to(torch.float32) / 255)
    assert torch.equal(torch.round(as_float * 255).to(torch.int64), levels)
    assert torch.equal(binary, (levels > 127).to(torch.float32))


def test_mnist5k_split_sizes_and_stratification() -> None:
    train, test, everything = mnist5k("train"), mnist5k("test"), mnist5k("all")
    assert (len(train), len(test), len(everything)) == (4000, 1000, 5000)
    assert torch.bincount(train.y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.y, minlength=10).tolist() == [100] * 10
    # "all" is train followed by test.
    assert torch.equal(everything.x, torch.cat([train.x, test.x]))
    assert torch.equal(everything.y, torch.cat([train.y, test.y]))


def test_mnist5k_train_and_test_are_disjoint() -> None:
    train_rows = _rows(mnist5k("train", format="levels").x)
    test_rows = _rows(mnist5k("test", format="levels").x)
    assert len(train_rows) == 4000 and len(test_rows) == 1000
    assert not train_rows & test_rows


def test_mnist5k_split_is_fixed_and_independent_of_seed() -> None:
    first = mnist5k("train", seed=0)
    other_seed = mnist5k("train", seed=123)
    assert torch.equal(first.x, other_seed.x) and torch.equal(first.y, other_seed.y)
    bundled_module._mnist5k_indices.cache_clear()  # recompute the split from scratch
    again = mnist5k("train")
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)


def test_mnist5k_is_not_sorted_by_label() -> None:
    for split in ("train", "test"):
        y = mnist5k(split).y
        assert bool((y[1:] < y[:-1]).any()), split
        assert int(y[:100].unique().numel()) == 10, split


def test_binary_stochastic_is_reproducible_and_unbiased() -> None:
    a = mnist5k("test", format="binary-stochastic", seed=7)
    b = mnist5k("test", format="binary-stochastic", seed=7)
    c = mnist5k("test", format="binary-stochastic", seed=8)
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    assert torch.equal(a.y, c.y)
    mean_float = float(mnist5k("test").x.mean())
    assert abs(float(a.x.mean()) - mean_float) < 0.005
    # Pixels at 0 stay 0, pixels at 1 stay 1.
    levels = mnist5k("test", format="levels").x
    assert torch.all(a.x[levels == 0] == 0) and torch.all(a.x[levels == 255] == 1)


# --------------------------------------------------------------------------
# digits and load
# --------------------------------------------------------------------------


@pytest.mark.parametrize("format", ALL_FORMATS)
def test_digits_formats(format: str) -> None:
    data = digits("train", format=format)
    assert data.x.shape == (1437, 1, 8, 8)
    assert data.y.dtype == torch.int64
    assert data.name == "digits" and data.num_classes == 10
    _check_format(data.x, format, 16)


def test_digits_split_sizes() -> None:
    train, test = digits("train", flatten=True), digits("test", flatten=True)
    assert train.x.shape == (1437, 64) and test.x.shape == (360, 64)
    assert len(digits("all")) == 1797
    assert torch.bincount(test.y, minlength=10).min() >= 35  # stratified: ~36 per class
    assert not _rows(train.x) & _rows(test.x)
    assert torch.equal(digits("test", seed=5).x, test.x.reshape(360, 1, 8, 8))


def test_digits_float_is_levels_over_16() -> None:
    levels = digits("test", format="levels").x
    assert torch.equal(digits("test").x, levels.to(torch.float32) / 16)
    assert torch.equal(digits("test", format="binary").x, (levels > 8).to(torch.float32))


def test_load_dispatches_by_name() -> None:
    assert BUNDLED == ("mnist5k", "digits")
    direct = digits("test", format="levels", flatten=True)
    loaded = load("digits", "test", format="levels", flatten=True)
    assert torch.equal(direct.x, loaded.x) and torch.equal(direct.y, loaded.y)
    assert len(load("mnist5k", split="test")) == 1000


def test_load_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match=r"name must be one of 'mnist5k', 'digits'; got 'mnist5'\. Did you mean 'mnist5k'\?"):
        load("mnist5")
    with pytest.raises(ValueError, match="got 'cifar'"):
        load("cifar")
    with pytest.raises(TypeError, match="name must be a str"):
        load(3)  # type: ignore[arg-type]


def test_bad_arguments_are_reported() -> None:
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test', 'all'; got 'tran'\."):
        mnist5k("tran")
    with pytest.raises(ValueError, match=r"format must be one of 'float', 'levels', 'binary', 'binary-stochastic'; got 'bin'\."):
        digits(format="bin")
    with pytest.raises(TypeError, match="flatten must be a bool"):
        digits(flatten="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must be an integer >= 0; got -1"):
        digits(seed=-1)
    with pytest.raises(TypeError, match="seed must be an integer >= 0"):
        digits(seed=1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# read_mnist (IDX files written here)
# --------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx(file: Path, array: np.ndarray, *, gz: bool = False) -> None:
    data = _idx_bytes(array)
    file.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def idx_arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[1, 0, 0] = 0, 255
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    return images, labels


def _write_mnist(directory: Path, images: np.ndarray, labels: np.ndarray, *, prefix: str = "train",
                 gz: bool = False, sep: str = "-") -> None:
    suffix = ".gz" if gz else ""
    _write_idx(directory / f"{prefix}-images{sep}idx3-ubyte{suffix}", images, gz=gz)
    _write_idx(directory / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels, gz=gz)


@pytest.mark.parametrize(("gz", "sep"), [(False, "-"), (True, "-"), (False, "."), (True, ".")])
def test_read_mnist_round_trips(tmp_path: Path, idx_arrays, gz: bool, sep: str) -> None:
    images, labels = idx_arrays
    _write_mnist(tmp_path, images, labels, gz=gz, sep=sep)
    data = read_mnist(tmp_path, format="levels")
    assert data.x.shape == (7, 1, 28, 28) and data.x.dtype == torch.int64
    assert np.array_equal(data.x[:, 0].numpy(), images)
    assert np.array_equal(data.y.numpy(), labels) and data.y.dtype == torch.int64
    assert data.name == "mnist" and data.num_classes == 10


def test_read_mnist_test_split_formats_and_flatten(tmp_path: Path, idx_arrays) -> None:
    images, labels = idx_arrays
    _write_mnist(tmp_path, images, labels, prefix="t10k", gz=True)
    as_float = read_mnist(str(tmp_path), "test", flatten=True, name="fashion-mnist")
    assert as_float.x.shape == (7, 784) and as_float.x.dtype == torch.float32
    assert as_float.name == "fashion-mnist"
    assert torch.equal(as_float.x, torch.from_numpy(images.reshape(7, -1)).float() / 255)
    binary = read_mnist(tmp_path, "test", format="binary").x
    assert torch.equal(binary[:, 0], torch.from_numpy(images > 127).float())


def test_read_mnist_rejects_corrupted_files(tmp_path: Path, idx_arrays) -> None:
    images, labels = idx_arrays
    _write_mnist(tmp_path, images, labels)
    image_file = tmp_path / "train-images-idx3-ubyte"
    good = image_file.read_bytes()

    image_file.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="magic bytes 0x00 0x00; got 0x01 0x02"):
        read_mnist(tmp_path)
    image_file.write_bytes(good[:2] + b"\x0d" + good[3:])
    with pytest.raises(ValueError, match="dtype code 0x08"):
        read_mnist(tmp_path)
    image_file.write_bytes(good[:3] + b"\x02" + good[4:])
    with pytest.raises(ValueError, match="must have 3 dimension"):
        read_mnist(tmp_path)
    image_file.write_bytes(good[:-5])
    with pytest.raises(ValueError, match="must hold 5488 values"):
        read_mnist(tmp_path)
    image_file.write_bytes(good)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5])
    with pytest.raises(ValueError, match="same number of items; got 7 images and 5 labels"):
        read_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 5, 10], dtype=np.uint8))
    with pytest.raises(ValueError, match="must lie in 0..9"):
        read_mnist(tmp_path)


def test_read_mnist_missing_files(tmp_path: Path, idx_arrays) -> None:
    with pytest.raises(FileNotFoundError) as info:
        read_mnist(tmp_path, "test")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path) in message

    images, labels = idx_arrays
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    with pytest.raises(FileNotFoundError, match="labels file") as info:
        read_mnist(tmp_path)
    assert "train-labels-idx1-ubyte" in str(info.value)

    with pytest.raises(FileNotFoundError, match="existing directory"):
        read_mnist(tmp_path / "nowhere")


def test_read_mnist_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test'; got 'all'\."):
        read_mnist(tmp_path, "all")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        read_mnist(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# read_cifar10 (pickled batches written here)
# --------------------------------------------------------------------------


def _cifar_batch(n: int, offset: int) -> dict[bytes, object]:
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [(offset + i) % 10 for i in range(n)]
    return {b"batch_label": b"fake", b"data": data, b"labels": labels}


def _write_cifar(directory: Path, *, n: int = 3, protocol: int = 2) -> dict[str, dict[bytes, object]]:
    directory.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _cifar_batch(n, 10 * i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n, 99)
    for name, batch in batches.items():
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("nested", [False, True])
def test_read_cifar10_round_trips(tmp_path: Path, protocol: int, nested: bool) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = _write_cifar(batch_dir, protocol=protocol)
    train = read_cifar10(tmp_path, format="levels")
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert train.x.shape == (15, 3, 32, 32) and train.x.dtype == torch.int64
    assert np.array_equal(train.x.numpy().reshape(15, 3072), expected)
    expected_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.y.tolist() == expected_labels and train.y.dtype == torch.int64
    assert train.name == "cifar10" and train.num_classes == 10
    test = read_cifar10(tmp_path, "test")
    assert test.x.shape == (3, 3, 32, 32) and test.x.dtype == torch.float32
    assert float(test.x.min()) >= 0.0 and float(test.x.max()) <= 1.0


def test_read_cifar10_channel_layout(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path)
    data = batches["test_batch"][b"data"]
    data[:] = 0
    data[1, 0 * 1024 + 5 * 32 + 7] = 200  # red plane, row 5, column 7
    data[1, 1 * 1024 + 2 * 32 + 30] = 150  # green plane, row 2, column 30
    data[2, 2 * 1024 + 31 * 32 + 0] = 100  # blue plane, row 31, column 0
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batches["test_batch"], protocol=2))
    x = read_cifar10(tmp_path, "test", format="levels").x
    assert int(x[1, 0, 5, 7]) == 200
    assert int(x[1, 1, 2, 30]) == 150
    assert int(x[2, 2, 31, 0]) == 100
    assert int(x.sum()) == 450
    flat = read_cifar10(tmp_path, "test", format="levels", flatten=True).x
    assert flat.shape == (3, 3072) and int(flat[1, 5 * 32 + 7]) == 200


class _Evil:
    """Pickles as a call to os.system; must never be loaded unrestricted."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("as_data", [False, True])
def test_read_cifar10_refuses_malicious_pickle(tmp_path: Path, as_data: bool) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil(f"echo pwned > {shlex.quote(str(marker))}")
    payload = {b"data": evil, b"labels": [0]} if as_data else evil
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        read_cifar10(tmp_path, "test")
    assert not marker.exists()


def test_read_cifar10_refuses_other_globals(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _EvalEvil()}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        read_cifar10(tmp_path)


def test_read_cifar10_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        read_cifar10(tmp_path)
    message = str(info.value)
    assert all(f"data_batch_{i}" in message for i in range(1, 6))
    assert "cifar-10-batches-py" in message
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="'data_batch_4'"):
        read_cifar10(tmp_path)
    read_cifar10(tmp_path, "test")  # the test split is still complete


def test_read_cifar10_bad_batches(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    bad = {b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"must be a uint8 array of shape \(n, 3072\)"):
        read_cifar10(tmp_path, "test")
    bad = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match="must be 2 integers, one per image"):
        read_cifar10(tmp_path, "test")
    (tmp_path / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="must hold a dict; got list"):
        read_cifar10(tmp_path, "test")
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test'; got 'valid'\."):
        read_cifar10(tmp_path, "valid")
