"""Activation checkpointing of a sparse module's blocks: what ``Trainer(gradient_checkpointing=
True)`` and ``model.gradient_checkpointing_enable()`` turn on.

The blocks are the model's own (:func:`fxsparse.passes.checkpoint.block_paths` on the skeleton
``sparsify`` kept: transformers' decoder and encoder layers, timm's ``blocks``); each graph of
the module (one per mode where they differ) is rewritten by
:func:`fxsparse.passes.checkpoint.checkpoint_blocks`, and the graphs as captured are kept so that
:func:`disable` restores them exactly. Masks, topology updates, state dicts and ``unwrap`` are
unaffected: segments hold no state, and the masked weights are computed outside them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch.fx
from torch import nn

from fxsparse.passes.checkpoint import block_paths, checkpoint_blocks
from fxsparse.segments import SEGMENT_PREFIX

__all__ = ["enable", "disable", "options", "checkpointed_blocks", "SEGMENT_PREFIX"]

def enable(sparse: Any, options: Mapping[str, Any] | None = None, every_n_layers: int = 1, offload: bool = False) -> list[str]:
    """Checkpoints every ``every_n_layers``-th block of ``sparse``; ``options`` go to
    ``torch.utils.checkpoint.checkpoint`` (``use_reentrant`` must be False or absent: the
    segments are always non-reentrant). Returns the blocks checkpointed."""
    options = dict(options or {})
    options.pop("use_reentrant", None)  # segments are always non-reentrant (the reentrant kind drops kwargs and hooks)
    if offload:
        raise ValueError("fxsparse: offloading checkpointed activations is not supported; pass offload=False")
    state = sparse._fxsparse
    if state.checkpointing is not None:
        disable(sparse)
    if state.skeleton is None:
        raise TypeError("activation checkpointing needs the model's skeleton, which modules made by sparsify keep")
    blocks = block_paths(state.skeleton, every_n_layers)
    if not blocks:
        raise ValueError(
            f"fxsparse found no repeated blocks in {type(state.skeleton).__name__} to checkpoint (a ModuleList or "
            f"Sequential of modules, or transformers' GradientCheckpointingLayer)"
        )
    originals = dict(state.mode_graphs) if state.mode_graphs else {None: sparse.graph}
    rewritten: dict[Any, torch.fx.Graph] = {}
    done: set[str] = set()
    for mode, graph in originals.items():
        new = copy.deepcopy(graph)
        done |= set(checkpoint_blocks(sparse, new, blocks, options, install=lambda name, m: _add(sparse, name, m)))
        rewritten[mode] = new
    if not done:
        for name in [n for n in sparse._modules if n.startswith(SEGMENT_PREFIX)]:
            del sparse._modules[name]
        raise ValueError(f"fxsparse could not find the nodes of any of the blocks {blocks[:3]}... in the graph")
    state.checkpointing = {"graphs": originals, "blocks": sorted(done),
                           "enable": {"options": options, "every_n_layers": every_n_layers, "offload": offload}}
    _install(sparse, rewritten)
    return sorted(done)


def disable(sparse: Any) -> None:
    """Restores the graphs as captured and removes the segments."""
    state = sparse._fxsparse
    if state.checkpointing is None:
        return
    originals = state.checkpointing["graphs"]
    state.checkpointing = None
    _install(sparse, originals)
    for name in [n for n in sparse._modules if n.startswith(SEGMENT_PREFIX)]:
        del sparse._modules[name]


def options(sparse: Any) -> dict[str, Any] | None:
    """The arguments :func:`enable` was given, or None when checkpointing is off."""
    state = sparse._fxsparse
    return dict(state.checkpointing["enable"]) if state.checkpointing else None


def checkpointed_blocks(sparse: Any) -> list[str]:
    """The blocks whose activations are recomputed in the backward (empty when off)."""
    state = sparse._fxsparse
    return list(state.checkpointing["blocks"]) if state.checkpointing else []


def _add(sparse: Any, name: str, module: nn.Module) -> str:
    """Registers a segment under ``name`` or, taken (the other mode's graph), a free variant."""
    while name in sparse._modules:
        name += "_"
    sparse.add_module(name, module)
    return name


def _install(sparse: Any, graphs: dict[Any, torch.fx.Graph]) -> None:
    if None in graphs:
        sparse.graph = graphs[None]
    else:
        sparse._fxsparse.mode_graphs = dict(graphs)
        sparse.graph = graphs[bool(sparse.training)]
    sparse.recompile()
