"""Back to the user's model: the class ``sparsify`` was given, holding the trained sparse weights.

``sparsify`` keeps a *skeleton* of the model it was given: a deep copy whose parameters and
buffers are on the meta device (no memory), so it holds everything else the model is, its class,
its ``config``, its plain attributes, its hooks, at no cost in weights. :func:`unwrap` copies the
skeleton and gives it the sparse module's tensors by their names (every parameter and buffer of
the sparse module keeps its original FQN): the trained weights with inactive entries exactly
zero, compact layers materialized as dense weights, the trained buffers (BatchNorm statistics),
ties kept. The masks travel with it as ``model.fxsparse_masks`` (``{fqn: bool tensor}``), for
:func:`fxsparse.serialization.save_masks` and ``sparsify(model, None, init=masks)``.

The result is the ecosystem's own model: ``save_pretrained`` / ``from_pretrained`` and
``generate`` for transformers, ``timm``'s checkpoint loading, ``torch.save`` of its
``state_dict``. It computes what the sparse module computes in eval mode, since the sparse
module's forward computes with exactly these weights (masked entries zero).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fxsparse.capture import resolve
from fxsparse.kernels import unwrap_kernels

__all__ = ["skeleton_of", "unwrap", "MASKS_ATTRIBUTE"]

MASKS_ATTRIBUTE = "fxsparse_masks"  # the unwrapped model's masks, {fqn: bool tensor}


def skeleton_of(model: nn.Module, copy_model: Any) -> nn.Module:
    """``model`` copied (by ``copy_model``, sparsify's deep copy) with every parameter and
    buffer replaced by a meta tensor of its shape and dtype: the model without its weights."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for tensor in table.values():
                if tensor is None or id(tensor) in memo:
                    continue
                meta = torch.empty_like(tensor, device="meta")
                if isinstance(tensor, nn.Parameter):
                    meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                memo[id(tensor)] = meta
    return copy_model(model, memo)


def unwrap(sparse: Any, *, share: bool = False) -> nn.Module:
    """The model ``sparse`` was made from (same class, config and attributes) holding its
    current weights and buffers; see :meth:`fxsparse.SparseGraphModule.unwrap`."""
    skeleton = getattr(sparse._fxsparse, "skeleton", None)
    if skeleton is None:
        raise TypeError(
            f"expected a SparseGraphModule made by fxsparse.sparsify, which keeps the model's skeleton; "
            f"{type(sparse).__name__} has none (made by another function, or unpickled from an older fxsparse): "
            f"rebuild the model, then model.load_state_dict(sparse.state_dict(), strict=False)"
        )
    sparse.rezero()  # exact zeros at inactive entries, whatever edited the weights
    # weights their layout holds outside the model's modules (compact layers): dense copies
    outside = {fqn: sparse._leaf_weight(fqn) for fqn in sparse._fxsparse.sites if not sparse.layout_of(fqn).keeps_parameter}
    model = copy.deepcopy(skeleton)
    made: dict[int, torch.Tensor] = {}
    missing: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for name, meta in list(table.items()):
                if meta is None:
                    continue
                fqn = f"{path}.{name}" if path else name
                if id(meta) not in made:
                    found = _tensor_at(sparse, fqn, outside)
                    if found is None:
                        missing.append(fqn)
                        continue
                    made[id(meta)] = _adopt(found, meta, share)
                table[name] = made[id(meta)]
    if missing:
        raise RuntimeError(f"fxsparse: the sparse module holds no tensor under {missing[:5]}: cannot unwrap it")
    unwrap_kernels(model, sparse._fxsparse.sites, sparse.masks, share=share)
    model.train(sparse.training)
    setattr(model, MASKS_ATTRIBUTE, {fqn: mask.detach().clone() for fqn, mask in sparse.masks.items()})
    return model


def _tensor_at(sparse: nn.Module, fqn: str, outside: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if fqn in outside:
        return outside[fqn]
    found = resolve(sparse, fqn)
    return found if isinstance(found, torch.Tensor) else None


def _adopt(tensor: torch.Tensor, meta: torch.Tensor, share: bool) -> torch.Tensor:
    """``tensor`` itself (``share``) or a copy, a Parameter where the model had one."""
    if isinstance(meta, nn.Parameter):
        if share and isinstance(tensor, nn.Parameter):
            return tensor
        return nn.Parameter(tensor.detach().clone(), requires_grad=meta.requires_grad)
    return tensor if share else tensor.detach().clone()
