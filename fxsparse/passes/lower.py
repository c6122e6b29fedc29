"""The graph passes of :func:`fxsparse.export_inference`, each a small function over an fx
GraphModule (export.py holds the compressed layer modules, the timing and the entry point):

1. :func:`materialize`: every masked-weight node becomes a constant holding the weight it handed
   its consumer (mask applied, parametrizations computed), and every compact layer's product a
   linear or matmul by its weight as a constant; the prologue goes.
   Invariant: the graph computes what it computed, from constants instead of parameters and masks.
2. :func:`fold_batchnorm`: an eval-mode ``BatchNorm2d`` that is a constant-weight convolution's
   only user folds into that convolution's weight and bias (a per-output-channel scale keeps zeros
   zero). Invariant: same outputs in eval mode; the folded weight has the sparse weight's zeros.
3. :func:`constant_products` lists the linear, conv2d and matmul nodes whose weight is a constant
   (the product kinds of :func:`fxsparse.passes.ops.product_kind`, the table ``find_weights``
   reads too); :func:`inputs_of` records what each receives on an example; :func:`replace_node`
   swaps a node for a module that computes it.
4. :func:`drop_unread_constants` and :func:`freeze`: what no node reads any more goes, and the
   parameters left (biases, norms, opaque leaves) are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse.capture import Runner
from fxsparse.layouts import layout_of_call
from fxsparse.masking import MASKER
from fxsparse.passes.ops import product_kind

__all__ = [
    "Product", "materialize", "fold_batchnorm", "constant_products", "inputs_of", "replace_node",
    "drop_unread_constants", "freeze",
]

_PROLOGUE = ("mask_prologue", "zero_dirty")


def materialize(gm: torch.fx.GraphModule, used: dict[str, torch.Tensor]) -> dict[str, str]:
    """Replaces each masked-weight node by a constant holding the weight it computed with
    (``used``, by weight FQN); drops the prologue. Returns ``{constant attribute: weight FQN}``."""
    graph, constants = gm.graph, {}
    for node in list(graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") in _PROLOGUE:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == MASKER:
            fqn = node.kwargs.get("name", node.args[2] if len(node.args) > 2 else None)
            attribute = _weight_constant(gm, fqn, used[fqn], constants)
            with graph.inserting_before(node):
                constant = graph.get_attr(attribute)
            node.replace_all_uses_with(constant)
            graph.erase_node(node)
    for node in list(graph.nodes):
        layout = layout_of_call(node)
        if layout is not None:  # a weight its layout holds: the dense op it computes, on the dense weight
            x, storage, bias = layout.call_operands(node.args)
            held = gm.get_submodule(storage.target)
            fqn, (op, options) = layout.dense_call(held)
            attribute = _weight_constant(gm, fqn, layout.stored_weight(held), constants)
            with graph.inserting_before(node):
                weight = graph.get_attr(attribute)
                product = graph.call_function(op, (x, weight, bias), options)
            node.replace_all_uses_with(product)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return constants


def _weight_constant(gm: torch.fx.GraphModule, fqn: str, weight: torch.Tensor, constants: dict[str, str]) -> str:
    """The buffer holding the weight ``fqn`` computes with (made on its first use)."""
    attribute = "fxsparse_w_" + fqn.replace(".", "_")
    if not hasattr(gm, attribute):
        gm.register_buffer(attribute, weight.detach().clone())
        constants[attribute] = fqn
    return attribute


def constant(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor ``node`` reads when it is a get_attr of a buffer (not a parameter)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    return gm.get_buffer(node.target) if _is_buffer(gm, node.target) else None


def _is_buffer(gm: torch.fx.GraphModule, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return name in module._buffers


def _bias_value(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    """A bias read from the graph: a buffer or a (frozen, eval-only) parameter."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    return gm.get_buffer(node.target) if _is_buffer(gm, node.target) else gm.get_parameter(node.target).detach()


def conv_args(node: torch.fx.Node) -> tuple[Any, Any, Any, Any, Any, Any, Any]:
    """``(input, weight, bias, stride, padding, dilation, groups)`` of a conv2d call."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    values = list(node.args) + [None] * (7 - len(node.args))
    return tuple(node.kwargs.get(n, v if i < len(node.args) else defaults[i]) for i, (n, v) in enumerate(zip(names, values)))  # type: ignore[return-value]


def fold_batchnorm(gm: torch.fx.GraphModule, constants: dict[str, str]) -> int:
    """Folds eval-mode BatchNorm2d modules that are a constant-weight convolution's only user
    (``constants`` learns which weight FQN each folded constant came from)."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        bn = gm.get_submodule(node.target)
        conv = node.args[0]
        if not (isinstance(conv, torch.fx.Node) and conv.op == "call_function" and product_kind(conv.target) == "conv2d"
                and len(conv.users) == 1 and bn.running_mean is not None and bn.running_var is not None):
            continue
        x, weight_node, bias_node, *rest = conv_args(conv)
        weight = constant(gm, weight_node)
        bias = None if bias_node is None else _bias_value(gm, bias_node)
        if weight is None or (bias_node is not None and bias is None):
            continue
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
        scale = (bn.weight.detach() if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias.detach() if bn.bias is not None else 0.0
        new_weight = weight * scale.reshape(-1, 1, 1, 1).to(weight.dtype)
        new_bias = ((bias - bn.running_mean) * scale + shift).to(weight.dtype)
        stem = f"fxsparse_fold_{folded}"
        gm.register_buffer(stem + "_weight", new_weight)
        if weight_node.target in constants:
            constants[stem + "_weight"] = constants[weight_node.target]
        gm.register_buffer(stem + "_bias", new_bias)
        with gm.graph.inserting_before(conv):
            w_node, b_node = gm.graph.get_attr(stem + "_weight"), gm.graph.get_attr(stem + "_bias")
        conv.args = (x, w_node, b_node, *rest)
        conv.kwargs = {}
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    return folded


@dataclass
class Product:
    """A linear, conv2d or matmul node whose weight (its second operand) is a constant."""

    node: torch.fx.Node
    kind: str  # "linear" | "conv2d" | "matmul"
    weight_node: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    bias_known: bool = True  # False: a bias the graph computes (the node is left as it is)
    conv: tuple[Any, ...] = ()  # stride, padding, dilation, groups


def constant_products(gm: torch.fx.GraphModule) -> list[Product]:
    """The linear, conv2d and matmul nodes of ``gm`` whose weight is a 2-D (4-D for conv2d)
    constant, in graph order, with their bias and convolution arguments."""
    found = []
    for node in gm.graph.nodes:
        kind = product_kind(node.target) if node.op == "call_function" else None
        if kind is None or (kind == "matmul" and len(node.args) != 2):
            continue
        weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        weight = constant(gm, weight_node)
        if weight is None or weight.dim() not in (2, 4) or (kind == "conv2d") != (weight.dim() == 4):
            continue
        product = Product(node, kind, weight_node, weight)
        bias_node = None
        if kind == "linear":
            bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        elif kind == "conv2d":
            _, _, bias_node, *product.conv = conv_args(node)
            product.conv = tuple(product.conv)
        if bias_node is not None:
            product.bias = _bias_value(gm, bias_node)
            product.bias_known = product.bias is not None
        found.append(product)
    return found


def inputs_of(gm: torch.fx.GraphModule, nodes: set[torch.fx.Node], example: tuple[Any, ...]) -> dict[torch.fx.Node, torch.Tensor]:
    """The first tensor argument each of ``nodes`` receives when the graph runs ``example``."""
    seen: dict[torch.fx.Node, torch.Tensor] = {}

    class Recorder(Runner):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n in nodes:
                value = self.env[n.args[0]] if isinstance(n.args[0], torch.fx.Node) else None
                if isinstance(value, torch.Tensor):
                    seen[n] = value
            return super().run_node(n)

    with torch.no_grad():
        Recorder(gm).run(*example)
    return seen


def replace_node(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module, name: str) -> None:
    """Installs ``module`` as ``gm.<name>`` and replaces ``node`` by a call of it on the node's
    first argument."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def drop_unread_constants(gm: torch.fx.GraphModule, constants: dict[str, str]) -> None:
    """Deletes the materialized and folded constants no node reads any more (compressed into a
    layer module now)."""
    gm.graph.eliminate_dead_code()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    folded = (n for n, _ in gm.named_buffers() if n.startswith("fxsparse_fold_"))
    for attribute in dict.fromkeys([*constants, *folded]):
        if hasattr(gm, attribute) and attribute not in read:
            delattr(gm, attribute)


def freeze(gm: torch.fx.GraphModule) -> None:
    """Drops what no node reads (the masker, the sparse weights), and turns the parameters left
    (biases, norms, opaque leaves) into frozen tensors: the module is for inference."""
    if hasattr(gm, MASKER):
        delattr(gm, MASKER)
    gm.delete_all_unused_submodules()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}

    def called(owner: str) -> bool:
        return any(n.op == "call_module" and (n.target == owner or owner.startswith(n.target + ".")) for n in gm.graph.nodes)

    for fqn, _ in list(gm.named_buffers()):
        owner, _, name = fqn.rpartition(".")
        if fqn not in read and not called(owner) and not fqn.startswith("fxsparse_layer_"):
            delattr(gm.get_submodule(owner) if owner else gm, name)  # a mask, the update counter
    for fqn, parameter in list(gm.named_parameters()):
        owner, _, name = fqn.rpartition(".")
        if fqn not in read and not called(owner):
            delattr(gm.get_submodule(owner) if owner else gm, name)  # a weight now held compressed by a layer module
        else:
            parameter.requires_grad_(False)
