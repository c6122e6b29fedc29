"""Editing pass: conv/linear leaf calls whose weight is sparsified become functional calls.

Invariant: every ``call_module`` node on an ``nn.Linear`` / ``nn.Conv*`` / ``nn.ConvTranspose*``
(or a plain ``nn.Embedding`` whose table is a tied, sparsified product weight) whose weight FQN is in ``fqns`` is replaced by the ``torch.nn.functional`` call the module's own
forward makes, with its weight (and bias) read by ``get_attr`` nodes; the graph computes exactly
what it computed before. The mask pass can then treat every use of a weight as a ``get_attr``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["functionalize", "plain_call"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def plain_call(node: torch.fx.Node) -> bool:
    """True when the leaf is called with its input alone (no ``output_size`` and the like)."""
    if node.args:
        return len(node.args) == 1 and not node.kwargs
    return set(node.kwargs) == {"input"}


def _functional(
    graph: torch.fx.Graph, node: torch.fx.Node, module: nn.Module, weight: torch.fx.Node
) -> torch.fx.Node:
    x: Any = node.args[0] if node.args else node.kwargs["input"]
    if isinstance(module, nn.Embedding):  # a tied table, sparsified with embeddings=True
        return graph.call_function(
            F.embedding,
            (x, weight, module.padding_idx, module.max_norm, module.norm_type,
             module.scale_grad_by_freq, module.sparse),
        )
    bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    if isinstance(module, nn.Linear):
        return graph.call_function(F.linear, (x, weight, bias))
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        n = len(module.kernel_size)
        return graph.call_function(
            _CONV_TRANSPOSE[n],
            (x, weight, bias, module.stride, module.padding, module.output_padding,
             module.groups, module.dilation),
        )
    assert isinstance(module, nn.modules.conv._ConvNd), type(module)
    n = len(module.kernel_size)
    padding: Any = module.padding
    if module.padding_mode != "zeros":
        x = graph.call_function(
            F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode}
        )
        padding = (0,) * n
    return graph.call_function(
        _CONV[n], (x, weight, bias, module.stride, padding, module.dilation, module.groups)
    )


def functionalize(gm: torch.fx.GraphModule, fqns: Collection[str]) -> None:
    """Rewrites the leaf calls whose ``fxsparse.weight`` is in ``fqns``, in place."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.meta.get("fxsparse.weight") not in fqns:
            continue
        module = gm.get_submodule(str(node.target))
        try:
            with graph.inserting_before(node):
                weight = graph.get_attr(f"{node.target}.weight")
                call = _functional(graph, node, module, weight)
        except Exception as e:
            raise RuntimeError(f"fxsparse: cannot rewrite {node.format_node()}") from e
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
