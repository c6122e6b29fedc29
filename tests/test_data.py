"""Tests for fxsparse.data: the IDX reader/writer and the Fashion-MNIST loader's checks."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from fxsparse.data import (
    FASHION_MNIST_ENV,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    write_idx,
)

__all__: list[str] = []


def _write_split(
    root: Path, prefix: str, images: np.ndarray, labels: np.ndarray
) -> tuple[Path, Path]:
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    write_idx(images_path, images)
    write_idx(labels_path, labels)
    return images_path, labels_path


def _synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("train", [True, False])
def test_round_trip(tmp_path: Path, train: bool) -> None:
    images, labels = _synthetic(5)
    _write_split(tmp_path, "train" if train else "t10k", images, labels)
    x, y = load_fashion_mnist(tmp_path, train=train)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5,) and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    pixels = x * FASHION_MNIST_STD + FASHION_MNIST_MEAN
    torch.testing.assert_close(pixels.squeeze(1) * 255, torch.from_numpy(images).float())


def test_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _synthetic(3, seed=1)
    _write_split(tmp_path, "t10k", images, labels)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    _, y = load_fashion_mnist(train=False)
    assert y.tolist() == labels.tolist()


def test_accepts_torch_tensor(tmp_path: Path) -> None:
    images, labels = _synthetic(2)
    _write_split(tmp_path, "train", torch.from_numpy(images), torch.from_numpy(labels))
    assert load_fashion_mnist(tmp_path)[0].shape == (2, 1, 28, 28)


def test_bad_magic_raises(tmp_path: Path) -> None:
    images, labels = _synthetic(2)
    images_path, _ = _write_split(tmp_path, "train", images, labels)
    raw = bytearray(gzip.decompress(images_path.read_bytes()))
    raw[3] = 4  # claim four dimensions: magic 0x00000804
    images_path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist(tmp_path)


def test_labels_in_images_slot_raises(tmp_path: Path) -> None:
    images, labels = _synthetic(2)
    _write_split(tmp_path, "train", labels, labels)  # a 1-d file where images belong
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist(tmp_path)


def test_truncated_file_raises(tmp_path: Path) -> None:
    images, labels = _synthetic(2)
    images_path, _ = _write_split(tmp_path, "train", images, labels)
    raw = gzip.decompress(images_path.read_bytes())
    images_path.write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_not_gzip_raises(tmp_path: Path) -> None:
    images, labels = _synthetic(2)
    images_path, _ = _write_split(tmp_path, "train", images, labels)
    images_path.write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match="gzip"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), "28x28"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.uint8), "as many labels"),
        (np.zeros((2, 28, 28), np.uint8), np.array([0, 10], np.uint8), "labels in"),
    ],
)
def test_inconsistent_split_raises(
    tmp_path: Path, images: np.ndarray, labels: np.ndarray, match: str
) -> None:
    _write_split(tmp_path, "train", images, labels)
    with pytest.raises(ValueError, match=match):
        load_fashion_mnist(tmp_path)


def test_missing_directory_raises_with_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert FASHION_MNIST_ENV in str(info.value)


def test_missing_file_raises_with_fix(tmp_path: Path) -> None:
    images, labels = _synthetic(2)
    _write_split(tmp_path, "train", images, labels)
    with pytest.raises(FileNotFoundError, match="apt-get") as info:
        load_fashion_mnist(tmp_path, train=False)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.int16).reshape(2, 3),
        np.arange(4, dtype=">i4"),
        np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 2, 2),
        np.linspace(0, 1, 3, dtype=np.float64),
    ],
)
def test_write_idx_header_and_body(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "a.gz"
    write_idx(path, array)
    raw = gzip.decompress(path.read_bytes())
    assert raw[:2] == b"\x00\x00" and raw[3] == array.ndim
    dims = np.frombuffer(raw, dtype=">u4", count=array.ndim, offset=4)
    assert tuple(dims) == array.shape
    body = np.frombuffer(raw, dtype=array.dtype.newbyteorder(">"), offset=4 + 4 * array.ndim)
    np.testing.assert_array_equal(body.reshape(array.shape), array)


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="dtype"):
        write_idx(tmp_path / "a.gz", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "b.gz", np.zeros((), dtype=np.uint8))
