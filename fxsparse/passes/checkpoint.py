"""Activation checkpointing of the model's blocks inside a captured graph.

A captured graph has no blocks to wrap: ``torch.fx`` keeps submodules only as containers of the
leaves it calls, so ``model.layers.0`` never runs a ``forward`` of its own. The graph still knows
which module each node came from (``node.meta["nn_module_stack"]``), so this pass cuts each
block's nodes out into a function of its inputs and calls it through
``torch.utils.checkpoint.checkpoint`` (non-reentrant): the block's activations are freed after
the forward and recomputed in the backward, with the same random numbers (dropout), so losses and
gradients are those of the graph without checkpointing.

Invariant: what a block computes from parameters alone (the masked weights the masker hands the
products, their views) is *hoisted*: computed once, before the block, outside the checkpoint, so
the masker never runs twice in a step. The segment function reads no attribute of the module:
parameters, buffers and the leaf modules it calls are its arguments, so it is a graph module with
no state of its own (no key in ``state_dict``, nothing ``.to()`` moves).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch.fx
from torch import nn

from fxsparse.segments import SEGMENT_PREFIX, call_module, run_checkpointed

__all__ = ["checkpoint_blocks", "block_paths", "in_block", "replace_span", "SEGMENT_PREFIX"]



def block_paths(model: nn.Module, every_n_layers: int = 1) -> list[str]:
    """The module paths of ``model``'s repeated blocks, every ``every_n_layers``-th: transformers'
    ``GradientCheckpointingLayer`` instances where the model has them, else the children of every
    innermost ``nn.ModuleList`` / ``nn.Sequential`` whose children are modules of one class with
    submodules of their own (timm's ``blocks``, a ResNet's four stages of blocks, ConvNeXt's
    ``stages.<i>.blocks``), in the model's order."""
    found = [p for p, m in model.named_modules() if any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)]
    if not found:
        lists = [(path, module) for path, module in model.named_modules()
                 if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module)
                 and len({type(child) for child in module.children()}) == 1
                 and any(True for _ in next(iter(module.children())).children())]
        paths = [path for path, _ in lists]
        innermost = [(path, module) for path, module in lists
                     if not any(other != path and (not path or other.startswith(path + ".")) for other in paths)]
        found = [f"{path}.{name}" if path else name for path, module in innermost for name, _ in module.named_children()]
    return found[::max(1, int(every_n_layers))]


def in_block(node: torch.fx.Node, block: str) -> bool:
    """Whether ``node`` was traced inside the module at path ``block`` (its ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path == block or path.startswith(block + "."):
            return True
    return False


def checkpoint_blocks(
    root: nn.Module, graph: torch.fx.Graph, blocks: Iterable[str], options: Mapping[str, Any], *, install: Any,
) -> list[str]:
    """Rewrites ``graph`` (read by ``root``) so that each block in ``blocks`` whose nodes form one
    run of the graph runs as a checkpointed segment; ``install(name, module)`` registers a
    segment's graph module on the module that runs ``graph`` and returns the name it took. Returns the blocks checkpointed."""
    done = []
    derived = _parameter_derived(graph)
    for block in blocks:
        nodes = list(graph.nodes)
        inside = [i for i, n in enumerate(nodes) if in_block(n, block)]
        if not inside:
            continue
        span = nodes[inside[0]: inside[-1] + 1]
        if any(n.op in ("placeholder", "output") for n in span) or any(
                SEGMENT_PREFIX in str(n.target) for n in span):
            continue
        if _segment(root, graph, span, block, options, install, derived):
            done.append(block)
    graph.lint()
    return done


def _parameter_derived(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes computed from the module's attributes alone (get_attr nodes and what only they
    feed: the masker's masked weights, their transposes)."""
    derived: set[torch.fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op in ("call_module", "call_function", "call_method") and inputs
                                     and all(i in derived for i in inputs)):
            derived.add(node)
    return derived


def _is_buffer(root: nn.Module, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return False
    return name in module._buffers


def _segment(
    root: nn.Module, graph: torch.fx.Graph, span: list[torch.fx.Node], block: str, options: Mapping[str, Any], install: Any,
    derived: set[torch.fx.Node],
) -> bool:
    """Cuts ``span`` out of ``graph`` into a checkpointed call; False where nothing in it is
    computed from activations."""
    hoisted = [n for n in span if n in derived]
    body = [n for n in span if n not in derived]
    if not body:
        return False
    body_set = set(body)
    # the leaf modules the body calls come in as arguments
    leaf_targets = list(dict.fromkeys(str(n.target) for n in body if n.op == "call_module"))
    inputs: list[torch.fx.Node] = []
    for node in body:
        for i in node.all_input_nodes:
            if i not in body_set and i not in inputs:
                inputs.append(i)
    outputs = [n for n in body if any(u not in body_set for u in n.users)]
    if not outputs:
        return False
    first = body[0]
    for node in hoisted:  # parameters' computations run before the segment, outside the checkpoint
        first.prepend(node)
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    modules: dict[str, torch.fx.Node] = {}
    for node in inputs:
        env[node] = sub.placeholder(f"in_{node.name}")
    for target in leaf_targets:
        modules[target] = sub.placeholder(f"module_{target.replace('.', '_')}")
    for node in body:
        if node.op == "call_module":
            args = torch.fx.map_arg(node.args, lambda a: env[a])
            kwargs = torch.fx.map_arg(node.kwargs, lambda a: env[a])
            env[node] = sub.call_function(call_module, (modules[str(node.target)], *args), kwargs)
            env[node].meta = dict(node.meta)
        else:
            env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(tuple(env[n] for n in outputs))
    name = SEGMENT_PREFIX + block.replace(".", "_")
    segment = torch.fx.GraphModule(nn.Module(), sub, class_name="CheckpointedBlock")
    # what a recomputation must leave as the forward left it (fxsparse.segments.run_checkpointed):
    # buffers read through get_attr, and every leaf module (its buffers: BatchNorm's statistics)
    segment.state_inputs = [i for i, node in enumerate(inputs) if node.op == "get_attr" and _is_buffer(root, str(node.target))]
    segment.state_inputs += list(range(len(inputs), len(inputs) + len(leaf_targets)))
    name = install(name, segment)
    with graph.inserting_before(first):
        segment_node = graph.get_attr(name)
        module_nodes = [graph.get_attr(t) for t in leaf_targets]
        call = graph.call_function(run_checkpointed, (segment_node, dict(options), *inputs, *module_nodes))
        call.meta["fxsparse.checkpoint"] = block
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    replace_span(graph, body, outputs, results)
    return True


def replace_span(graph: torch.fx.Graph, body: list[torch.fx.Node], outputs: list[torch.fx.Node],
                 results: list[torch.fx.Node]) -> None:
    """Has what ``body`` computed for the rest of ``graph`` (``outputs``) read from ``results``
    instead, then erases ``body``."""
    inside = set(body)
    for node, result in zip(outputs, results):
        result.meta = dict(node.meta)
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
    for node in reversed(body):
        graph.erase_node(node)
