"""A trained sparse model as files the ecosystem reads, and its masks beside them.

:func:`save_pretrained` writes the unwrapped model (:mod:`fxsparse.unwrap`): a transformers
model through its own ``save_pretrained`` (``config.json``, ``model.safetensors`` holding the
weights with their zeros, the generation config), any other model as ``model.safetensors`` of
its ``state_dict`` (what ``timm.create_model(..., checkpoint_path=...)`` loads); and the masks
as ``fxsparse_masks.safetensors`` beside it (:func:`save_masks`).

Why a masks file, and not the zeros: a weight grown by the last topology update starts at 0 and
a trained weight can be exactly 0, so the zeros of a checkpoint can lose active connections
(``sparsify(model, None, "zeros")`` is for pruned checkpoints that have no masks). The file is
bool tensors, 1 byte an entry (a quarter of fp32 weights' size), and like
every safetensors file it holds no code. ``sparsify(model, None, init=load_masks(directory))``
continues training with exactly the saved topology.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MASKS_FILE", "WEIGHTS_FILE", "save_masks", "load_masks", "save_pretrained", "save_state_dict",
           "untie_shared_tensors"]

MASKS_FILE = "fxsparse_masks.safetensors"
WEIGHTS_FILE = "model.safetensors"  # transformers' and timm's name for a safetensors state dict
_FORMAT = "fxsparse-masks"


def save_masks(masks: Mapping[str, torch.Tensor] | Any, path: str | os.PathLike[str], **metadata: Any) -> Path:
    """Writes masks (a ``{fqn: bool tensor}`` dict, or a SparseGraphModule's) as safetensors.

    ``path``: a directory (the file is ``fxsparse_masks.safetensors`` in it) or a file name.
    ``metadata``: JSON-serializable values stored in the file's header. Returns the file's path.
    """
    from safetensors.torch import save_file

    if isinstance(masks, nn.Module):  # a SparseGraphModule
        sparse = masks
        metadata = {"density": sparse.density, "init": sparse._fxsparse.init, "seed": sparse._fxsparse.seed,
                    "updates": int(sparse.get_buffer("fxsparse_updates")), **metadata}
        masks = sparse.masks
    target = Path(path)
    if target.is_dir() or not target.suffix:
        target.mkdir(parents=True, exist_ok=True)
        target = target / MASKS_FILE
    tensors = {fqn: mask.detach().to("cpu", torch.bool).contiguous() for fqn, mask in masks.items()}
    header = {"format": _FORMAT, "version": "1", "metadata": json.dumps(metadata)}
    save_file(tensors, str(target), metadata=header)
    return target


def load_masks(path: str | os.PathLike[str], *, with_metadata: bool = False) -> Any:
    """The masks :func:`save_masks` wrote (``{fqn: bool tensor}``), from the file or the
    directory holding ``fxsparse_masks.safetensors``; with ``with_metadata``, ``(masks,
    metadata)``. Pass them to ``sparsify(model, None, init=masks)`` to continue with that topology.

    Raises:
        FileNotFoundError: no masks file there (says where it looked).
        ValueError: the file is not an fxsparse masks file.
    """
    from safetensors import safe_open

    source = Path(path)
    if source.is_dir():
        source = source / MASKS_FILE
    if not source.is_file():
        raise FileNotFoundError(
            f"expected fxsparse's masks at {str(source)!r} (written by sparse.save_pretrained or fxsparse.save_masks); "
            f"for a pruned checkpoint without masks use fxsparse.sparsify(model, None, 'zeros')"
        )
    with safe_open(str(source), framework="pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != _FORMAT:
            raise ValueError(f"expected an fxsparse masks file (format {_FORMAT!r}) at {str(source)!r}, got format "
                             f"{header.get('format')!r}")
        masks = {key: handle.get_tensor(key).to(torch.bool) for key in handle.keys()}
    if with_metadata:
        return masks, json.loads(header.get("metadata") or "{}")
    return masks


def save_pretrained(sparse: Any, directory: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Writes the unwrapped model and the masks into ``directory``; see
    :meth:`fxsparse.SparseGraphModule.save_pretrained`."""
    directory = Path(directory)
    model = sparse.unwrap(share=True)  # no copy of the weights
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(str(directory), **kwargs)
    else:
        if kwargs:
            raise TypeError(f"{type(model).__name__} has no save_pretrained of its own to take {sorted(kwargs)}")
        save_state_dict(model, directory / WEIGHTS_FILE)
    save_masks(sparse, directory)
    return directory


def save_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """``model.state_dict()`` as safetensors, each tensor a second name shares (tied weights)
    stored as a copy, since safetensors refuses shared memory."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    untie_shared_tensors(model, state, "", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def untie_shared_tensors(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A state-dict post-hook: every tensor of ``state_dict`` whose storage an earlier entry
    already holds (tied weights: an LM head and its input embedding) becomes a copy, so that
    safetensors, which refuses shared memory, can save it; loading it back writes the same
    values into the one parameter both names refer to. Module-level, so a module holding it
    still pickles."""
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        storage = value.untyped_storage().data_ptr()
        if storage in seen:
            state_dict[key] = value.detach().clone()
        else:
            seen.add(storage)
