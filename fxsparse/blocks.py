"""A sparse module's blocks as modules whose own forward runs: what per-block ``fully_shard``
(FSDP2) and other per-block wrappers need.

``sparse.keep_blocks()`` cuts the model's repeated blocks (:func:`fxsparse.passes.checkpoint.
block_paths` on the skeleton ``sparsify`` kept: transformers' decoder layers, timm's ``blocks``,
ResNet stages' blocks; or the paths given) out of every graph of the module
(:func:`fxsparse.passes.blocks.cut_block`) and installs each as a
:class:`~fxsparse.passes.blocks.SparseBlock` at its path; a container the model had as a
``ModuleList`` / ``Sequential`` becomes one again, so ``for block in sparse.model.layers`` works.
Names, ``state_dict`` keys, masks, outputs and gradients are unchanged. The graphs as captured
are kept: :func:`release` puts them back, and a pickle holds them (the blocks are cut again when
it loads).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch.fx
from torch import nn

from fxsparse import checkpointing
from fxsparse.masking import MASKER
from fxsparse.passes.blocks import SparseBlock, cut_block, demote, is_wrapped, promote
from fxsparse.passes.checkpoint import block_paths

__all__ = ["keep", "release", "kept_blocks", "keep_wrapped", "restore_containers"]


def keep(sparse: Any, blocks: Iterable[str] | None = None) -> list[str]:
    """Makes each block of ``sparse`` (the model's repeated blocks, or the paths ``blocks``) a
    module whose forward runs, in place (the same module objects: what ``fully_shard`` already
    wrapped stays wrapped); blocks kept before stay kept. Returns the paths kept. Raises
    ValueError naming a path that is not a submodule, or when no block could be cut out."""
    state = sparse._fxsparse
    paths = _paths(sparse, blocks)
    kept = list(state.blocks["paths"]) if state.blocks else []
    new = [p for p in paths if p not in kept]
    if not new:
        return kept
    checkpoint = checkpointing.options(sparse)
    if checkpoint is not None:
        checkpointing.disable(sparse)
    current = dict(state.mode_graphs) if state.mode_graphs else {None: sparse.graph}
    originals = state.blocks["graphs"] if state.blocks else current
    cut: dict[str, dict[Any, torch.fx.Graph]] = {}
    rewritten = {}
    for mode, graph in current.items():
        graph = copy.deepcopy(graph)
        for path in sorted(new, key=lambda p: -p.count(".")):  # inner blocks first
            found = cut_block(graph, path, MASKER)
            if found is not None:
                cut.setdefault(path, {})[mode] = found[0]
        rewritten[mode] = graph
    if cut:
        for path in sorted(cut, key=lambda p: -p.count(".")):
            _install_block(sparse, path, cut[path])
        state.blocks = {"graphs": originals, "paths": kept + [p for p in new if p in cut]}
        checkpointing._install(sparse, rewritten)
    if checkpoint is not None:
        checkpointing.enable(sparse, **checkpoint)
    if not cut:
        raise ValueError(f"fxsparse could not find the nodes of any of the blocks {new[:3]} in the graph")
    return list(state.blocks["paths"])


def _paths(sparse: Any, blocks: Iterable[str] | None) -> list[str]:
    state = sparse._fxsparse
    if blocks is None:
        if state.skeleton is None:
            raise TypeError("fxsparse: finding the model's blocks needs its skeleton, which modules made by sparsify keep; pass blocks=[...]")
        paths = block_paths(state.skeleton)
    else:
        paths = [blocks] if isinstance(blocks, str) else list(blocks)
    for path in paths:
        try:
            sparse.get_submodule(path)
        except AttributeError:
            raise ValueError(f"fxsparse: {path!r} is not a submodule of the sparse module; blocks are module paths "
                             f"such as {', '.join(repr(p) for p in block_paths(state.skeleton)[:2]) or 'layers.0'}") from None
    if not paths:
        raise ValueError(f"fxsparse found no repeated blocks in {type(state.skeleton).__name__}; name them: keep_blocks(['layers.0', ...])")
    return paths


def release(sparse: Any) -> None:
    """Puts the graphs as captured back: the blocks are plain containers again (their state
    stays). Raises ValueError for blocks ``fully_shard`` wrapped (their forward must run)."""
    state = sparse._fxsparse
    if state.blocks is None:
        return
    wrapped = [p for p in state.blocks["paths"] if is_wrapped(sparse.get_submodule(p))]
    if wrapped:
        raise ValueError(f"fxsparse: fully_shard wrapped the block {wrapped[0]!r}, whose forward must run; its blocks stay kept")
    checkpoint = checkpointing.options(sparse)
    if checkpoint is not None:
        checkpointing.disable(sparse)
    originals = state.blocks["graphs"]
    for path in state.blocks["paths"]:
        demote(sparse.get_submodule(path))
    state.blocks = None
    checkpointing._install(sparse, originals)
    if checkpoint is not None:
        checkpointing.enable(sparse, **checkpoint)


def keep_wrapped(sparse: Any) -> list[str]:
    """Keeps the blocks ``fully_shard`` wrapped while the graph inlined them (the FSDP recipe run
    without :func:`keep` first): the wrapped containers become blocks in place, their FSDP
    state and hooks untouched. Returns the paths it kept (empty when none was inlined)."""
    stray = [name for name, module in sparse.named_modules()
             if name and is_wrapped(module) and not isinstance(module, SparseBlock)]
    if not stray:
        return []
    try:
        keep(sparse, stray)
    except ValueError:
        return []  # fxsparse.sharding refuses what stays inlined, with the remedy
    return stray


def kept_blocks(sparse: Any) -> list[str]:
    """The paths of the blocks whose forward runs (empty when none)."""
    state = sparse._fxsparse
    return list(state.blocks["paths"]) if state.blocks else []


def _set(sparse: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = sparse.get_submodule(parent_path) if parent_path else sparse
    parent._modules[name] = module


def _install_block(sparse: Any, path: str, graphs: dict[Any, torch.fx.Graph]) -> None:
    container = sparse.get_submodule(path)
    skeleton = sparse._fxsparse.skeleton
    try:
        kind = type(skeleton.get_submodule(path)) if skeleton is not None else None
    except AttributeError:
        kind = None
    promote(container, graphs, path, kind)
    parent_path = path.rpartition(".")[0]
    if parent_path:
        _restore(sparse, parent_path)


def restore_containers(sparse: Any) -> None:
    """Gives every container the model had as an ``nn.ModuleList`` / ``nn.Sequential`` that type
    back (torch.fx keeps plain ``nn.Module`` containers), with the same children: iterable and
    indexable as in the model (``for layer in sparse.model.layers``). The graph never calls them."""
    skeleton = sparse._fxsparse.skeleton
    if skeleton is None:
        return
    for path, module in skeleton.named_modules():
        if path and isinstance(module, (nn.ModuleList, nn.Sequential)):
            _restore(sparse, path)


def _restore(sparse: Any, path: str) -> None:
    skeleton = sparse._fxsparse.skeleton
    try:
        kind = type(skeleton.get_submodule(path)) if skeleton is not None else nn.Module
        parent = sparse.get_submodule(path)
    except AttributeError:
        return
    if type(parent) is not nn.Module:  # already a list, or a module of the model's own class
        return
    for list_kind in (nn.ModuleList, nn.Sequential):
        if issubclass(kind, list_kind):
            replacement = list_kind()
            replacement._modules = parent._modules
            replacement._parameters, replacement._buffers = parent._parameters, parent._buffers
            replacement._non_persistent_buffers_set = parent._non_persistent_buffers_set
            replacement.training = parent.training
            _set(sparse, path, replacement)
            return
