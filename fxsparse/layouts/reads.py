"""Editing pass for layouts that compute a product themselves: a masked weight whose every read
is a linear layer, a product ``x @ W`` (``addmm`` included) or a convolution of one group is
taken over by a layout's product function (the compact layout's :func:`compact_linear`).

Invariant: after :func:`replace_reads`, no node of the graph reads the weight or its mask; each
former ``F.linear(x, masker(w, m), b)``, ``x @ masker(w, m)``, ``addmm(b, x, masker(w, m))``
(transformers' ``Conv1D``) or ``conv2d(x, masker(w, m), b, ...)`` is ``fn(x, storage, masker,
b)`` (bias None where there is none; the layout knows from :func:`product_reads`' kind how to
compute it); the prologue no longer names the weight. :func:`product_reads` says whether a
weight qualifies (and how it is read) before anything changes. Run after ``mask_weights``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx

from fxsparse.masking import mask_prologue, masked_nodes
from fxsparse.passes.ops import packet, product_kind

__all__ = ["product_reads", "replace_reads", "operands", "conv_geometry"]


_CONV_DEFAULTS = (None, 1, 0, 1, 1)  # conv2d(input, weight, bias, stride, padding, dilation, groups)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(isinstance(v, int) for v in value):
        return (value[0], value[-1])
    return None


def conv_geometry(user: torch.fx.Node) -> tuple[tuple[int, int], str, tuple[int, int]] | None:
    """``(stride, padding, dilation)`` of a ``conv2d`` call of one group, padding as ``"P0xP1"``
    (``"0x0"`` for ``"valid"``) or ``"same"``; None for grouped convolutions or arguments this
    does not read."""
    names = ("bias", "stride", "padding", "dilation", "groups")
    if not set(user.kwargs) <= set(names) or len(user.args) > 7:
        return None
    given = dict(zip(names, user.args[2:]))
    given.update(user.kwargs)
    padding, groups = given.get("padding", 0), given.get("groups", 1)
    stride, dilation = _pair(given.get("stride", 1)), _pair(given.get("dilation", 1))
    if groups != 1 or stride is None or dilation is None or min(stride) < 1:
        return None
    if padding in ("valid", "same"):
        return stride, "0x0" if padding == "valid" else "same", dilation
    pair = _pair(padding)
    return None if pair is None or min(pair) < 0 else (stride, "{}x{}".format(*pair), dilation)


def product_reads(graphs: Iterable[torch.fx.Graph], masker: str, fqn: str) -> str | None:
    """``"linear"`` when every read of ``fqn`` in every graph is the weight of a linear call,
    ``"matmul"`` when every read is the right operand of ``x @ W``, ``"conv2d:S0xS1:P:D0xD1"``
    when every read is the weight of a one-group ``conv2d`` of that stride, padding
    (:func:`conv_geometry`) and dilation (the caller checks which the kernel's shape allows);
    None otherwise (a weight read elsewhere, through a view, under another name or by several
    kinds stays masked)."""
    kinds = set()
    for graph in graphs:
        nodes = masked_nodes(graph, masker, fqn)
        if not nodes:
            return None
        for node in nodes:
            source = node.args[0]
            if not (isinstance(source, torch.fx.Node) and source.op == "get_attr" and source.target == fqn):
                return None  # a parametrized or tied-under-another-name read
            for user in node.users:
                kind = product_kind(user.target) if user.op == "call_function" else None
                if kind == "linear" and len(user.args) >= 2 and user.args[1] is node and user.args[0] is not node \
                        and set(user.kwargs) <= {"bias"} and (len(user.args) < 3 or user.args[2] is not node):
                    kinds.add("linear")
                elif kind == "matmul" and len(user.args) == 2 and user.args[1] is node and user.args[0] is not node \
                        and not user.kwargs:
                    kinds.add("matmul")
                elif _is_addmm(user) and len(user.args) == 3 and user.args[2] is node and node not in user.args[:2] \
                        and not user.kwargs:
                    kinds.add("matmul")  # addmm(bias, x, W): x @ W + bias (transformers' Conv1D)
                elif kind == "conv2d" and len(user.args) >= 2 and user.args[1] is node and node not in user.args[:1] \
                        and node not in user.args[2:] and node not in user.kwargs.values() \
                        and conv_geometry(user) is not None:
                    (s0, s1), padding, (d0, d1) = conv_geometry(user)  # type: ignore[misc]
                    kinds.add(f"conv2d:{s0}x{s1}:{padding}:{d0}x{d1}")
                else:
                    return None
    return kinds.pop() if len(kinds) == 1 else None


def replace_reads(graph: torch.fx.Graph, masker: str, fqn: str, storage: str, fn: Callable[..., Any]) -> None:
    """Rewrites the reads of ``fqn`` (qualified by :func:`product_reads`) into calls
    ``fn(x, storage, masker, bias)`` of the layout's function on its storage module at
    ``storage``, and drops the weight from the prologue."""
    for node in masked_nodes(graph, masker, fqn):
        for user in list(node.users):
            x, bias = operands(user)
            with graph.inserting_before(user), warnings.catch_warnings():
                # the graph's owning module may be the one it was traced from: the layer is
                # installed on the SparseGraphModule that runs it
                warnings.simplefilter("ignore", UserWarning)
                args = (x, graph.get_attr(storage), graph.get_attr(masker), bias)
                new = graph.call_function(fn, args)
            new.meta["fxsparse.layout"] = fqn
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        sources = [a for a in node.args if isinstance(a, torch.fx.Node)]
        graph.erase_node(node)
        _erase_unused(graph, sources)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is mask_prologue and fqn in node.args[1]:
            at = node.args[1].index(fqn)
            names, weights, masks, *rest = node.args[1:]
            dropped = [weights[at], masks[at]]
            node.args = (node.args[0], tuple(n for i, n in enumerate(names) if i != at),
                         [w for i, w in enumerate(weights) if i != at], [m for i, m in enumerate(masks) if i != at], *rest)
            _erase_unused(graph, dropped)


def operands(user: torch.fx.Node) -> tuple[Any, Any]:
    """``(x, bias)`` of a product :func:`product_reads` accepts (bias None where it has none)."""
    if _is_addmm(user):
        return user.args[1], user.args[0]
    if product_kind(user.target) == "matmul":
        return user.args[0], None
    if product_kind(user.target) == "conv2d":
        return user.args[0], user.kwargs.get("bias", user.args[2] if len(user.args) > 2 else None)
    return user.args[0], user.kwargs.get("bias", user.args[2] if len(user.args) > 2 else None)


def _is_addmm(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and (node.target is torch.addmm or packet(node.target) is torch.ops.aten.addmm)


def _erase_unused(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node]) -> None:
    for node in nodes:
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
