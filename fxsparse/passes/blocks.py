"""The model's blocks as modules of their own inside a captured graph.

A captured graph inlines its submodules: ``model.layers.0`` keeps the leaves and parameters the
graph reads, but its own ``forward`` never runs, so what frameworks install on a block (FSDP2's
``fully_shard``, which gathers a block's parameters in its pre-forward hook and frees them after)
never fires. This pass cuts each block's nodes (``node.meta["nn_module_stack"]``) out of the
graph into a graph module that *is* the block: it is installed at the block's path in place of
the container, owns the same submodules, parameters and buffers under the same names (no
``state_dict`` key changes), reads its own parameters and masks inside its forward, and is
called by the parent graph through ``call_module``. So ``fully_shard(sparse.layers[0])`` gathers
and frees that block's weights around its forward, as it does for the model itself.

A block's graph reads only its own attributes: the masked weights of the block (get_attr, the
masker's node) are computed inside it; everything else it reads (activations, the root's
parameters and buffers, shared leaf modules outside it, the masker) comes in as arguments.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx
from torch import nn

from fxsparse.capture import graph_from_state, graph_state
from fxsparse.passes.checkpoint import in_block, replace_span
from fxsparse.segments import call_module

__all__ = ["cut_block", "SparseBlock", "block_class", "make_block", "promote", "demote", "is_wrapped"]


class SparseBlock(nn.Module):
    """A block of a sparse module with its own forward: the block's nodes of each graph of the
    module (one per mode where the modes compute differently), run on the block's own state.
    Its parameters, buffers and submodules are those of the container it replaced, under the same
    names. Blocks of one model class share one class named as the model's (a subclass of this
    one, :func:`block_class`), so wrappers that pick blocks by class (FSDP auto-wrap policies by
    ``transformer_layer_cls``, ``_no_split_modules``) find every one of them."""

    fxsparse_block = True  # what fxsparse.sharding checks (it does not import this module)

    def __init__(self, container: nn.Module, graphs: dict[Any, torch.fx.Graph], path: str, kind: type | None = None) -> None:
        super().__init__()
        self._modules = container._modules
        self._parameters = container._parameters
        self._buffers = container._buffers
        self._non_persistent_buffers_set = container._non_persistent_buffers_set
        self.training = container.training
        self.block_graphs = dict(graphs)
        self.block_path = path
        self.block_kind = kind
        self._forwards: dict[Any, Any] = {}

    def _forward_of(self, mode: Any) -> Any:
        # the graph's code as a function of the block: compiled by a GraphModule (which copies
        # references to what the graph reads), called with this block as `self`
        if mode not in self._forwards:
            self._forwards[mode] = type(torch.fx.GraphModule(self, self.block_graphs[mode])).forward
        return self._forwards[mode]

    @property
    def graph(self) -> torch.fx.Graph:
        """The graph of the block's current mode."""
        return self.block_graphs[self._mode()]

    def _mode(self) -> Any:
        return bool(self.training) if bool(self.training) in self.block_graphs else next(iter(self.block_graphs))

    def forward(self, *args: Any) -> Any:
        return self._forward_of(self._mode())(self, *args)

    def __reduce__(self) -> Any:
        # the compiled functions do not pickle or copy: the graphs do, as data, and compile again
        state = {key: self.__dict__[key] for key in _MODULE_STATE if key in self.__dict__}
        graphs = {mode: graph_state(graph) for mode, graph in self.block_graphs.items()}
        return (_rebuild_block, (state, graphs, self.block_path, self.block_kind))

    def extra_repr(self) -> str:
        return f"block of {self.block_kind.__name__ if self.block_kind else 'a model'} at {self.block_path!r}"


_MODULE_STATE = tuple(nn.Module().__dict__)  # what every nn.Module holds: parameters, buffers, modules, hooks, mode
_CLASSES: dict[type, type] = {}


def block_class(kind: type | None) -> type:
    """The :class:`SparseBlock` subclass of the blocks of model class ``kind``, named as it."""
    if kind is None:
        return SparseBlock
    if kind not in _CLASSES:
        _CLASSES[kind] = type(kind.__name__, (SparseBlock,), {"__module__": __name__, "__qualname__": kind.__name__})
    return _CLASSES[kind]


def make_block(container: nn.Module, graphs: dict[Any, torch.fx.Graph], path: str, kind: type | None = None) -> SparseBlock:
    """The block of model class ``kind`` at ``path`` (see :class:`SparseBlock`)."""
    return block_class(kind)(container, graphs, path, kind)


def _fsdp_class(cls: type, wrapped: type) -> type:
    """``cls`` as ``fully_shard`` would have made it (``FSDP<name>``, FSDPModule first), with what
    the class ``wrapped`` (the one FSDP made for the plain container) added."""
    from torch.distributed.fsdp import FSDPModule

    key = (cls, wrapped)
    if key not in _FSDP_CLASSES:
        extra = {k: v for k, v in vars(wrapped).items() if k not in ("__module__", "__qualname__", "__doc__", "__dict__", "__weakref__")}
        _FSDP_CLASSES[key] = type(f"FSDP{cls.__name__}", (FSDPModule, cls), extra)
    return _FSDP_CLASSES[key]


_FSDP_CLASSES: dict[tuple[type, type], type] = {}


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``fully_shard`` wrapped ``module``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def promote(module: nn.Module, graphs: dict[Any, torch.fx.Graph], path: str, kind: type | None = None) -> SparseBlock:
    """Makes the container ``module`` (a plain ``nn.Module`` the graph inlines, maybe wrapped by
    ``fully_shard``) the block of model class ``kind`` at ``path`` in place: the same object, so
    whatever holds it (its parent, FSDP's state and hooks) holds the block."""
    cls = block_class(kind)
    current = type(module)
    if not is_wrapped(module) and (current is nn.Module or isinstance(module, SparseBlock)):
        module.__class__ = cls
    elif is_wrapped(module) and (current.__mro__[2] is nn.Module or isinstance(module, SparseBlock)):
        module.__class__ = _fsdp_class(cls, current)  # FSDP made FSDP<container>: FSDP<block> now
    else:
        raise TypeError(f"fxsparse: the block {path!r} is a {current.__name__}, not a container of the graph's")
    module.block_graphs = dict(graphs)
    module.block_path = path
    module.block_kind = kind
    module._forwards = {}
    return module  # type: ignore[return-value]


def demote(module: nn.Module) -> None:
    """Undoes :func:`promote` of a block ``fully_shard`` did not wrap: a plain container again."""
    if isinstance(module, SparseBlock) and not is_wrapped(module):
        for name in ("block_graphs", "block_path", "block_kind", "_forwards"):
            module.__dict__.pop(name, None)
        module.__class__ = nn.Module


def _rebuild_block(state: dict[str, Any], graphs: dict[Any, Any], path: str, kind: type | None = None) -> SparseBlock:
    container = nn.Module()
    block = make_block(container, {mode: graph_from_state(g) for mode, g in graphs.items()}, path, kind)
    block.__dict__.update(state)  # parameters, buffers, modules, hooks, mode
    return block


def _under(target: Any, block: str) -> bool:
    return isinstance(target, str) and target.startswith(block + ".")


def _body(graph: torch.fx.Graph, block: str, masker: str) -> list[torch.fx.Node]:
    """The nodes the block computes, in graph order: those its module stack places in it, and
    the masked weights of its own parameters (the masker's nodes reading only its attributes)."""
    own = {n for n in graph.nodes if n.op == "get_attr" and _under(n.target, block)}
    body = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or node in own:
            continue
        if node.op == "call_module" and node.target == masker:
            attrs = node.all_input_nodes
            if attrs and all(i in own for i in attrs):
                body.append(node)
            continue
        if in_block(node, block):
            body.append(node)
    return body


def cut_block(graph: torch.fx.Graph, block: str, masker: str) -> tuple[torch.fx.Graph, torch.fx.Node] | None:
    """Rewrites ``graph`` so that ``block``'s nodes run as one ``call_module(block, ...)``;
    returns the block's own graph (its get_attr and call_module targets relative to the block)
    and the call node, or None where the block's nodes cannot be cut out (none found, or
    interleaved with what depends on them)."""
    body = _body(graph, block, masker)
    if not body:
        return None
    body_set = set(body)
    order = {n: i for i, n in enumerate(graph.nodes)}
    prefix = block + "."
    inputs: list[torch.fx.Node] = []  # what the block reads from outside (activations, foreign attributes)
    leaves: list[str] = []  # leaf modules outside the block that it calls
    for node in body:
        if node.op == "call_module" and not _under(node.target, block) and node.target not in (*leaves, masker):
            leaves.append(str(node.target))
        for i in node.all_input_nodes:
            if i not in body_set and not (i.op == "get_attr" and _under(i.target, block)) and i not in inputs:
                inputs.append(i)
    outputs = [n for n in body if any(u not in body_set for u in n.users)]
    if not outputs:
        return None
    # the call goes before the first of its nodes that comes after its last input, and every
    # outside use of what it computes must come after that
    after = max((order[i] for i in inputs), default=-1)
    later = [order[n] for n in body if order[n] > after]
    if not later:
        return None
    where = min(later)
    if any(order[u] <= where for n in outputs for u in n.users if u not in body_set):
        return None
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in inputs:
        env[node] = sub.placeholder(f"in_{node.name}")
    modules = {target: sub.placeholder(f"module_{target.replace('.', '_')}") for target in [masker, *leaves]}

    def read(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:  # one of the block's own attributes, read inside it
            assert node.op == "get_attr" and _under(node.target, block)
            env[node] = sub.get_attr(str(node.target)[len(prefix):])
            env[node].meta = dict(node.meta)
        return env[node]

    for node in body:
        args = torch.fx.map_arg(node.args, read)
        kwargs = torch.fx.map_arg(node.kwargs, read)
        if node.op == "call_module" and not _under(node.target, block):
            env[node] = sub.call_function(call_module, (modules[str(node.target)], *args), kwargs)
        elif node.op == "call_module":
            env[node] = sub.call_module(str(node.target)[len(prefix):], args, kwargs)
        else:
            env[node] = sub.node_copy(node, read)
        env[node].meta = dict(node.meta)
    sub.output(tuple(env[n] for n in outputs))
    sub.lint()
    anchor = next(n for n in graph.nodes if order[n] == where)
    with graph.inserting_before(anchor):
        module_nodes = [_attr(graph, anchor, t) for t in [masker, *leaves]]
        call = graph.call_module(block, (*inputs, *module_nodes))
        call.meta["nn_module_stack"] = {block: (block, nn.Module)}
        call.meta["fxsparse.block"] = block
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    replace_span(graph, body, outputs, results)
    for node in list(graph.nodes):  # the block's attributes nothing outside it reads any more
        if node.op == "get_attr" and _under(node.target, block) and not node.users:
            graph.erase_node(node)
    graph.lint()
    return sub, call


def _attr(graph: torch.fx.Graph, anchor: torch.fx.Node, target: str) -> torch.fx.Node:
    for node in graph.nodes:
        if node is anchor:
            break
        if node.op == "get_attr" and node.target == target:
            return node
    return graph.get_attr(target)
