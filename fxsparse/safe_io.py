"""Loading files without running code from them.

A file saved with ``torch.save`` is a pickle, and unpickling an arbitrary pickle runs whatever
functions it names: a checkpoint directory from someone else could run code the moment a run
resumes from it. Everything fxsparse reads back (the topology scheduler's state, the recipes'
checkpoints, CIFAR's batches, the masks of a saved model) is read by one of these loaders, which
only rebuild data:

- :func:`load_torch`: ``torch.load(..., weights_only=True)`` (tensors, numbers, strings, bools,
  None and containers of them; torch's allow-list), with an error that names the file and what
  it asked to run;
- :func:`load_arrays_pickle`: a pickle of numpy arrays and plain containers (CIFAR's python
  batches), through an unpickler that rebuilds arrays and refuses every other global;
- masks are safetensors (:mod:`fxsparse.serialization`), which holds no code at all.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import IO, Any

import torch

__all__ = ["UnsafeFileError", "load_torch", "load_arrays_pickle"]


class UnsafeFileError(ValueError):
    """A file asked to run code (or rebuild an object that is not plain data) while loading:
    nothing of it was run, nothing was loaded."""


def load_torch(path: str | os.PathLike[str] | IO[bytes], map_location: Any = None, *, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only.

    Raises:
        UnsafeFileError: the file names a global that ``weights_only`` loading does not allow
            (a function or class to call: a file that would run code); nothing was run.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        name = path if isinstance(path, (str, os.PathLike)) else "the stream"
        raise UnsafeFileError(
            f"fxsparse refused to load {what} {str(name)!r}: unpickling it would call or rebuild something that is not "
            f"plain data (tensors, numbers, strings and containers), so it could run code; nothing of it was run. "
            f"A file you wrote yourself with an older version: convert it once, where you trust it, by saving "
            f"only its tensors and plain values again. Detail: {_first_line(e)}"
        ) from None


# numpy arrays pickled by numpy 1.x or 2.x (protocol 2 to 5), and the byte strings of a python-2 pickle
_ARRAY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_arrays_pickle(handle: IO[bytes], *, what: str = "file", encoding: str = "bytes") -> Any:
    """Unpickles ``handle`` allowing numpy arrays, dtypes and plain containers only (CIFAR's
    python batches), never a function call of the file's choosing.

    Raises:
        UnsafeFileError: the pickle names any other global; nothing was run.
    """
    data = handle.read()
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"fxsparse refused to load {what}: it is a pickle that names something other than numpy arrays and plain "
            f"containers ({_first_line(e)}), so it could run code; nothing of it was run. Replace it with the "
            f"dataset's original files."
        ) from None


def _first_line(error: Exception) -> str:
    """The line of an unpickling error that names what the file asked for (torch's message
    leads with advice to turn ``weights_only`` off, which is what must not be done)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line]
    return (named or lines or [type(error).__name__])[0]
