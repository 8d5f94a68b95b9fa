"""Datasets: Fashion-MNIST lookup from IDX files, clear errors, FakeData, evaluation shards."""

from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import pytest
import torch

import kse.data
from kse.data import DatasetError, ShardSampler, dataset_info, get_dataset, list_datasets


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fmnist(folder, n_train: int = 12, n_test: int = 4, seed: int = 0):
    """Small gzipped IDX files with the official names; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """No Debian package, no download: only what a test puts in $KSE_DATA is visible."""
    empty = tmp_path / "debian-empty"
    empty.mkdir()
    monkeypatch.setattr(kse.data, "DEBIAN_FMNIST", str(empty))
    calls = []

    def no_download(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("downloads are disabled in tests")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_download)
    monkeypatch.setattr(torchvision.datasets, "MNIST", no_download)
    return empty, calls


def test_fashion_mnist_from_kse_data(tmp_path, monkeypatch, no_system_data):
    arrays = _write_fmnist(tmp_path / "data")
    monkeypatch.setenv("KSE_DATA", str(tmp_path / "data"))
    train, info = get_dataset("fashion-mnist", train=True)
    test, _ = get_dataset("fashion-mnist", train=False)
    assert (len(train), len(test)) == (12, 4)
    assert (info.num_classes, info.in_channels, info.input_size) == (10, 1, 28)

    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    images, labels = arrays["t10k"]
    for i in range(4):  # the test split is not augmented: exactly the normalised pixels
        x, y = test[i]
        expected = (torch.from_numpy(images[i]).float()[None] / 255 - 0.2860) / 0.3530
        torch.testing.assert_close(x, expected)
        assert y == int(labels[i])
    assert no_system_data[1] == []  # found on disk: no download attempted


def test_data_dir_wins_over_kse_data_and_subfolders_are_searched(tmp_path, monkeypatch, no_system_data):
    _write_fmnist(tmp_path / "env", n_train=5)
    _write_fmnist(tmp_path / "given" / "FashionMNIST" / "raw", n_train=7)  # torchvision's layout
    monkeypatch.setenv("KSE_DATA", str(tmp_path / "env"))
    assert len(get_dataset("fashion-mnist", data_dir=str(tmp_path / "given"))[0]) == 7
    assert len(get_dataset("fashion-mnist")[0]) == 5


def test_truncated_idx_names_the_file(tmp_path, monkeypatch, no_system_data):
    folder = tmp_path / "data"
    _write_fmnist(folder)
    bad = folder / "train-images-idx3-ubyte.gz"
    full = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(full[: 16 + 5 * 28 * 28]))  # header says 12 images, 5 present
    monkeypatch.setenv("KSE_DATA", str(folder))
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + r" is truncated: expected 9408 values, found 3920"):
        get_dataset("fashion-mnist", train=True)
    get_dataset("fashion-mnist", train=False)  # the other split is intact


@pytest.mark.parametrize("damage, match", [
    (lambda raw: gzip.compress(raw)[:-30], r"cannot be read \(EOFError"),  # download cut off
    (lambda raw: gzip.compress(raw[:10]), r"is truncated: its header names 3 dimensions but the file has 10 bytes"),
    (lambda raw: gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]), r"is not an IDX file of unsigned bytes"),
    (lambda raw: b"not gzip at all", r"cannot be read \(BadGzipFile"),
])
def test_damaged_idx_raises_dataset_error(tmp_path, monkeypatch, no_system_data, damage, match):
    folder = tmp_path / "data"
    _write_fmnist(folder)
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(damage(gzip.decompress(bad.read_bytes())))
    monkeypatch.setenv("KSE_DATA", str(folder))
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + ".*" + match):
        get_dataset("fashion-mnist", train=False)


def test_image_and_label_counts_must_agree(tmp_path, monkeypatch, no_system_data):
    folder = tmp_path / "data"
    _write_fmnist(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(3, np.uint8))))
    monkeypatch.setenv("KSE_DATA", str(folder))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz has 4 images but .*t10k-labels-idx1-ubyte.gz has 3"):
        get_dataset("fashion-mnist", train=False)


def test_missing_fashion_mnist_says_where_it_looked(tmp_path, monkeypatch, no_system_data):
    debian, download_calls = no_system_data
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("KSE_DATA", str(empty))
    with pytest.raises(DatasetError) as info:
        get_dataset("fashion-mnist", train=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("fashion-mnist train files not found (looked in: ")
    assert str(empty) in message and str(debian) in message
    assert "apt-get install dataset-fashion-mnist" in message and "$KSE_DATA" in message
    assert "download failed: RuntimeError" in message and len(download_calls) == 1
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_cifar_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10 not found under .*; download it there or pass --data-dir"):
        get_dataset("cifar10", data_dir=str(tmp_path))


def test_unknown_dataset_lists_the_choices():
    choices = ", ".join(list_datasets())
    assert "fashion-mnist" in choices and "fake" in choices
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar11'; choose one of: " + re.escape(choices) + "$"):
        get_dataset("cifar11")
    with pytest.raises(ValueError, match="unknown dataset"):  # DatasetError is a ValueError: the CLI prints it
        dataset_info("")


@pytest.mark.parametrize("size", [16, 32])
def test_fake_data_shapes(size):
    train, info = get_dataset("fake", train=True, fake_size=32, input_size=size)
    test, test_info = get_dataset("fake", train=False, fake_size=32, input_size=size)
    assert (len(train), len(test)) == (32, 8)
    assert (info.in_channels, info.input_size, info.num_classes) == (3, size, 10) == (
        test_info.in_channels, test_info.input_size, test_info.num_classes)
    x, y = train[5]
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and 0 <= y < 10
    torch.testing.assert_close(test[3][0], test[3][0])  # evaluation images are deterministic
    assert not torch.equal(test[0][0], train[0][0])  # and differ from the training images
    assert info.preprocess()["input_size"] == [3, size, size]


def test_shard_sampler_covers_every_index_once():
    data = list(range(7))
    shards = [list(ShardSampler(data, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(data, r, 3)) for r in range(3)] == [3, 2, 2]
    assert sorted(i for s in shards for i in s) == data
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\) = \[0, 2\), got 2"):
        ShardSampler(data, 2, 2)


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_a_data_dir_that_does_not_exist_is_an_error_not_a_fallback(tmp_path, name):
    # fashion-mnist would otherwise be found in the system copy, whatever --data-dir said
    with pytest.raises(DatasetError, match=f"--data-dir {tmp_path / 'typo'} is not a folder; give the folder holding {name}"):
        get_dataset(name, data_dir=str(tmp_path / "typo"))
