"""Checking a SparseGraphModule's state: a state_dict before it loads, its invariants between updates.

Nothing changes unless all of a state_dict loads.
A mask must be of its weight's shape and bool (or 0/1 values, converted); with
``budget="keep"`` the masks must hold the module's parameter budget (the same total active
count, layers budgeted dense still dense); every other tensor must have its parameter's or
buffer's shape. Problems are gathered and raised together as a :class:`StateDictError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxsparse import sharding
from fxsparse.layouts import layout_of

__all__ = ["save_layouts", "take_layouts", "adopt_loaded", "StateDictError", "check_keys", "check_masks", "invariant_problems"]


class StateDictError(ValueError, RuntimeError):
    """A state_dict that cannot be loaded into a SparseGraphModule; nothing was changed."""


def _message(problems: list[str]) -> str:
    return (
        "fxsparse: cannot load this state_dict into the sparse module; nothing was changed:\n  "
        + "\n  ".join(problems)
    )


def check_keys(own: Mapping[str, Any], state_dict: Mapping[str, Any]) -> None:
    """``strict`` loading: raises StateDictError naming every key missing from ``state_dict``
    and every key the module does not have."""
    problems = [f"{k}: missing from the state_dict" for k in own if k not in state_dict]
    problems += [f"{k}: not a key of this module" for k in state_dict if k not in own]
    if problems:
        raise StateDictError(_message(problems))


def check_masks(sparse: nn.Module, state_dict: dict[str, Any], prefix: str, budget: str) -> dict[str, int]:
    """The active count of every mask of ``sparse`` in ``state_dict`` (keys under ``prefix``);
    converts 0/1 masks to bool in it (torch's own copy of the caller's dict). Raises
    StateDictError on a bad mask or shape, or on masks off the module's budget with
    ``budget="keep"``."""
    problems, counts, over_budget = [], {}, False
    sites = sparse._fxsparse.sites
    mask_keys = {site.mask for site in sites.values()}
    for key, mine in nn.Module.state_dict(sparse, keep_vars=True).items():  # torch would load the rest
        value = None if key in mask_keys else state_dict.get(prefix + key)
        if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape != mine.shape:
            problems.append(f"{prefix + key}: shape {tuple(value.shape)}, this module's is {tuple(mine.shape)}")
    for fqn, site in sites.items():
        key = prefix + site.mask
        if key not in state_dict:
            continue
        value, shape = state_dict[key], site.shape
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: expected a bool tensor, got {type(value).__name__}")
        elif tuple(value.shape) != tuple(shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, but the weight {fqn} is {tuple(shape)}")
        elif value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
            problems.append(f"{key}: expected a bool mask (or 0/1 values), got {value.dtype} with other values")
        else:
            state_dict[key] = value.to(torch.bool)
            counts[fqn] = sharding.count_active(state_dict[key])
            if budget == "keep" and site.target_density >= 1.0 and counts[fqn] != math.prod(shape):
                over_budget = True
                problems.append(
                    f"{key}: {counts[fqn]} of {math.prod(shape)} active, but this layer is budgeted dense"
                )
    if budget == "keep" and not problems and counts:
        have = sum(site.active for site in sites.values())
        loaded = sum(counts.get(fqn, site.active) for fqn, site in sites.items())
        if loaded != have:
            over_budget = True
            differ = [prefix + sites[f].mask for f, c in counts.items() if c != sites[f].active]
            problems.append(
                f"the masks hold {loaded} active weights, this module's budget is {have} "
                f"(density {have / sum(math.prod(s.shape) for s in sites.values()):.4f}); masks whose "
                f"count differs: {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}"
            )
    if over_budget:
        problems.append(
            "to take the checkpoint's topology as it is (resuming gradual pruning on sparsify(model, "
            "1.0), another density's masks), pass load_state_dict(..., budget='adopt')"
        )
    if problems:
        raise StateDictError(_message(problems))
    return counts


def invariant_problems(sparse: nn.Module) -> list[str]:
    """What :meth:`SparseGraphModule.verify` finds wrong: masks of the wrong dtype or shape or
    off their budget, inactive weights that are not zero, a parametrized weight an opaque leaf
    reads with non-zero inactive entries. Empty when every invariant holds. Of sharded weights
    (FSDP), each rank checks its shards and the counts are summed over the ranks: a collective,
    every rank calls it."""
    problems = []
    for fqn, site in sparse._fxsparse.sites.items():
        weight, mask = sparse._leaf_weight(fqn), sparse._mask(fqn)
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            problems.append(f"{fqn}: mask {mask.dtype} {tuple(mask.shape)} vs weight {tuple(weight.shape)}")
            continue
        active = sharding.count_active(mask)
        weight, mask = sharding.local(weight), sharding.local(mask)  # a rank checks its own shards
        if active != site.active:
            problems.append(f"{fqn}: {active} active weights, budget {site.active}")
        owner, _, name = fqn.rpartition(".")
        if site.opaque and parametrize.is_parametrized(sparse.get_submodule(owner), name):
            with torch.no_grad():
                computed = getattr(sparse.get_submodule(owner), name)
            if bool(computed[~mask].ne(0).any()):
                problems.append(
                    f"{fqn}: a parametrization computes this weight, which an opaque leaf module "
                    f"reads itself, so its inactive entries reach the output; remove the "
                    f"parametrization or register the leaf's code for tracing"
                )
        if bool(weight.detach()[~mask].ne(0).any()):
            problems.append(
                f"{fqn}: inactive weights are not zero (edited since the last forward, which "
                f"would zero them before use; sparse.rezero() zeroes them now)"
            )
    return problems


def save_layouts(sparse: nn.Module, destination: Any, prefix: str) -> None:
    """Writes each weight the module system does not (a compact layer's) as the masked layout
    does (the dense weight under its FQN, the bool mask under its mask name), so that
    checkpoints move between layouts."""
    state = getattr(sparse, "_fxsparse", None)  # None while GraphModule builds the module
    for fqn in state.sites if state is not None else ():
        layout_of(sparse, fqn).save(sparse, fqn, destination, prefix)


def take_layouts(
    sparse: nn.Module, state_dict: dict[str, Any], prefix: str, missing_keys: list[str] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Takes the weight and mask of each layer whose layout loads them itself out of
    ``state_dict`` (before the submodules see them: the weight's owner holds no such parameter);
    notes absent ones in ``missing_keys``."""
    taken = {}
    for fqn in sparse._fxsparse.sites:
        pair = layout_of(sparse, fqn).take(sparse, fqn, state_dict, prefix, missing_keys)
        if pair is not None:
            taken[fqn] = pair
    return taken


def adopt_loaded(
    sparse: nn.Module, counts: dict[str, int], taken: dict[str, tuple[torch.Tensor, torch.Tensor]], budget: str,
) -> None:
    """After a checked load: the layers whose layout loads them itself take their weights and
    masks, and every layer its loaded count (with ``budget="adopt"`` also as its budget)."""
    sites = sparse._fxsparse.sites
    for fqn, (weight, mask) in taken.items():
        layout_of(sparse, fqn).load(sparse, fqn, weight, mask)
    for fqn, count in counts.items():
        site = sites[fqn]
        if budget == "adopt" and count != site.active:  # the checkpoint's budget is the layer's now
            site.target_density = count / math.prod(site.shape)
        site.active = count
