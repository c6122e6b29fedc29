"""Masks on computed kernels: products whose weight operand is computed from the parameter.

Weight standardization (timm's ``StdConv2d`` / ``ScaledStdConv2d``: the NFNet family, BiT, the
ResNetV2 hybrids) computes the kernel a convolution reads from its parameter on every forward,
``K = gain * (w - mean(w)) / std(w)``. A mask on ``w`` does not make ``K`` sparse: the mean shift
makes every entry nonzero. fxsparse therefore masks the kernel:
``K = standardize(w * m) * m``.

- The parameter is a sparse weight like any other: the prologue zeroes its inactive entries and
  masks its gradient (so ``w`` holds exactly the active count, and the statistics see zeros
  there), and drop ranks ``|w|``.
- A masked-weight node on the kernel, ``masker(K, m, name=fqn, kernel=True)``, computes
  ``where(m, K, 0)``: the product reads exactly the mask's support, in train and eval mode, with
  or without gradient. Its hook records the growth gradient ``dL/dK``, the dense gradient of what
  the product reads (RigL's grow criterion for this layer).
- A grown entry starts at ``w = 0``, which standardization maps to ``-mean/std``: its kernel
  entry starts there, not at zero.

Two places hold such kernels:

- the graph (a symbolic trace goes through ``StdConv2d``; ``torch.export`` through everything):
  :func:`fxsparse.passes.mask_weights.mask_weights` puts the node before the product
  (:func:`fxsparse.passes.find_weights.kernel_operands` finds them, in every graph the module
  runs: train, eval, each call signature);
- a layer inside an opaque leaf module (timm's ``NormFreeBlock`` holds ``ScaledStdConv2d``):
  :func:`swap_layers` replaces the layer by :func:`masked_layer`, its own trace with the same
  node, under the layer's name and holding the layer's parameters, its mask and its plain
  attributes, so the leaf's code calls it as before.

:func:`unwrap_kernels` gives the unwrapped model the same layers (with a mask that is not in
its ``state_dict``), so that it computes what the sparse module computes. A kernel computed
outside any layer that traces alone cannot be carried over; unwrapping warns then.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch.fx
from torch import nn

from fxsparse.masking import MASKER, Masker
from fxsparse.passes.find_weights import canonical_names, kernel_operands

__all__ = ["GRAPH", "site_groups", "mask_kernels", "masked_layer", "is_masked_layer", "swap_layers", "unwrap_kernels"]

GRAPH = "graph"  # a site's ``kernel`` when the graph computes the kernel (else the layer's path)


def site_groups(sites: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``(masked, hooked, kernels)``: the mask names of the weights read as they are, of those an
    opaque leaf uses (the module-level fallback) and of those products read through a computed
    kernel, by weight FQN."""
    masked, hooked, kernels = {}, {}, {}
    for fqn, site in sites.items():
        group = kernels if getattr(site, "kernel", "") else hooked if site.opaque else masked
        group[fqn] = site.mask
    return masked, hooked, kernels


def mask_kernels(
    gm: torch.fx.GraphModule, kernels: Mapping[str, str], names: Mapping[str, str], masker: str,
) -> int:
    """Puts ``masker(K, mask, name=fqn, kernel=True)`` between each kernel computed from a weight
    of ``kernels`` (FQN -> mask name) and the products reading it; returns how many."""
    graph = gm.graph
    found = kernel_operands(gm, kernels, dict(names))
    masked: dict[tuple[torch.fx.Node, str], torch.fx.Node] = {}
    for product, operand, fqn in found:
        if (operand, fqn) not in masked:
            with graph.inserting_after(operand):
                mask = graph.get_attr(kernels[fqn])
            with graph.inserting_after(mask):
                node = graph.call_module(masker, (operand, mask), {"name": fqn, "kernel": True})
            node.meta["fxsparse.masked"] = fqn
            node.meta["fxsparse.kernel"] = fqn
            masked[operand, fqn] = node
        product.replace_input_with(operand, masked[operand, fqn])
    return len(masked)


def masked_layer(layer: nn.Module, mask: torch.Tensor, fqn: str, masker: Masker, *, persistent: bool = True) -> torch.fx.GraphModule:
    """``layer`` as its own trace whose computed kernel is masked (``masker``'s node, named
    ``fqn``), holding the same parameters, ``mask`` as the buffer ``weight_mask`` and the layer's
    plain attributes (``stride``, ``out_channels`` ... that the code around it may read).

    Raises:
        ValueError: the layer's trace computes no kernel from ``weight``.
    """
    from fxsparse.tracing import trace

    gm = trace(layer)
    root: dict[str, Any] = {MASKER: masker, "weight_mask": mask}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and str(node.target) not in root:
            root[str(node.target)] = gm.get_submodule(str(node.target)) if node.op == "call_module" else _attr(gm, str(node.target))
    names = canonical_names(gm)
    probe = torch.fx.GraphModule(root, gm.graph)
    probe.add_module(MASKER, masker)
    probe.register_buffer("weight_mask", mask)
    if not mask_kernels(probe, {"weight": "weight_mask"}, names, MASKER):
        raise ValueError(f"fxsparse: {type(layer).__name__} computes no kernel from its weight")
    for node in probe.graph.nodes:
        if node.op == "call_module" and node.target == MASKER:
            node.kwargs = {**node.kwargs, "name": fqn}
    out = torch.fx.GraphModule(root, probe.graph, class_name=f"Masked{type(layer).__name__}")
    if not persistent:
        out._non_persistent_buffers_set.add("weight_mask")
    for key, value in vars(layer).items():
        if not key.startswith("_") and key != "training" and key not in vars(out):
            setattr(out, key, value)
    out.train(layer.training)
    return out


def is_masked_layer(module: Any) -> bool:
    """Whether ``module`` is a layer :func:`masked_layer` made (its own trace calling a masker)."""
    return isinstance(module, torch.fx.GraphModule) and isinstance(getattr(module, MASKER, None), Masker)


def _attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def swap_layers(sparse: nn.Module, sites: Mapping[str, Any]) -> None:
    """Replaces each layer inside an opaque leaf whose computed kernel a site's mask goes on
    (``site.kernel`` is its path) by :func:`masked_layer`, calling ``sparse``'s masker."""
    masker = sparse.get_submodule(MASKER)
    for fqn, site in sites.items():
        path = getattr(site, "kernel", "")
        if not path or path == GRAPH:
            continue
        layer = sparse.get_submodule(path)
        if isinstance(layer, torch.fx.GraphModule):
            continue  # already swapped (a copy)
        mask_owner, _, mask_name = site.mask.rpartition(".")
        if mask_owner != path or mask_name != "weight_mask":
            raise AssertionError(f"fxsparse: the mask of {fqn} is not {path}.weight_mask")
        _replace(sparse, path, masked_layer(layer, layer._buffers["weight_mask"], fqn, masker))


def unwrap_kernels(model: nn.Module, sites: Mapping[str, Any], masks: Mapping[str, torch.Tensor], *,
                   share: bool = False) -> None:
    """Gives the unwrapped ``model`` a masked layer (:func:`masked_layer`, the mask not in its
    ``state_dict``: a copy, or with ``share`` the sparse module's own mask, which its updates
    change) for each weight whose mask the sparse module puts on a computed kernel; warns for a
    kernel computed outside a layer that traces alone."""
    masker = Masker()
    masker.armed = False
    lost = []
    for fqn, site in sites.items():
        if not getattr(site, "kernel", ""):
            continue
        path, _, name = fqn.rpartition(".")
        layer = model.get_submodule(path)
        try:
            if name != "weight":
                raise ValueError(name)
            mask = masks[fqn] if share else masks[fqn].detach().clone()
            _replace(model, path, masked_layer(layer, mask, fqn, masker, persistent=False))
        except Exception:  # noqa: BLE001 - a kernel this layer does not compute alone
            lost.append(fqn)
    if lost:
        warnings.warn(
            f"fxsparse: the sparse module masks the kernels computed from {lost[:3]} (weight standardization); "
            f"the unwrapped model computes them from the masked weights without that mask, so its outputs differ. "
            f"Use the sparse module, or export_inference(), to compute exactly", stacklevel=3,
        )
