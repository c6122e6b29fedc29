"""The operation tables the graph passes share: which calls are products and where their weight
operand sits, which are views a weight passes through on its way to a product, which are
embedding lookups; at the level of the symbolic tracer's graphs (``torch.nn.functional`` calls
and tensor methods) and of torch.export's (ATen ops, matched by overload packet).

Read by :mod:`fxsparse.passes.find_weights` (which parameters to mask) and
:mod:`fxsparse.passes.lower` (which nodes :func:`fxsparse.export_inference` replaces by
compressed layers), so the two passes agree on what a product is.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FUNCTION_WEIGHT_ARGS", "FUNCTION_LIST_ARGS", "METHOD_WEIGHT_ARGS", "ATEN_WEIGHT_ARGS", "FUNCTION_INPUT_ARGS", "LOOKUP_ARGS",
    "ATEN_RECURRENT", "schema_positions",
    "VIEW_METHODS", "VIEW_FUNCTIONS", "VIEW_ATTRS", "ATEN_VIEWS", "REWRITABLE_MODULES", "LAYERS",
    "ARGUMENT_NAMES", "operands_at", "packet", "view_source", "schema_weight_positions", "is_rewritable", "product_kind",
]

# Functional consumers and the positions of their weight operands.
FUNCTION_WEIGHT_ARGS: dict[Callable[..., Any], tuple[int, ...]] = {
    F.linear: (1,),
    F.conv1d: (1,),
    F.conv2d: (1,),
    F.conv3d: (1,),
    F.conv_transpose1d: (1,),
    F.conv_transpose2d: (1,),
    F.conv_transpose3d: (1,),
    torch.matmul: (0, 1),
    operator.matmul: (0, 1),
    torch.mm: (0, 1),
    torch.bmm: (0, 1),
    torch.addmm: (1, 2),
    torch.baddbmm: (1, 2),
    torch.addbmm: (1, 2),
    torch.mv: (0, 1),
    torch.addmv: (1, 2),
    torch.inner: (0, 1),
    torch.tensordot: (0, 1),
    torch.linalg.matmul: (0, 1),
    F.bilinear: (2,),
}
METHOD_WEIGHT_ARGS: dict[str, tuple[int, ...]] = {
    "matmul": (0, 1),
    "__matmul__": (0, 1),
    "__rmatmul__": (0, 1),
    "mm": (0, 1),
    "bmm": (0, 1),
    "addmm": (1, 2),
    "baddbmm": (1, 2),
    "addbmm": (1, 2),
    "mv": (0, 1),
    "addmv": (1, 2),
    "inner": (0, 1),
}
# The names of the arguments by position, for operands given by keyword (torch.mm(x, mat2=w)).
_CONV_NAMES = ("input", "weight")
ARGUMENT_NAMES: dict[Any, tuple[str, ...]] = {
    F.linear: _CONV_NAMES, F.conv1d: _CONV_NAMES, F.conv2d: _CONV_NAMES, F.conv3d: _CONV_NAMES,
    F.conv_transpose1d: _CONV_NAMES, F.conv_transpose2d: _CONV_NAMES, F.conv_transpose3d: _CONV_NAMES,
    torch.matmul: ("input", "other"), torch.linalg.matmul: ("input", "other"), torch.inner: ("input", "other"),
    torch.mm: ("input", "mat2"), torch.bmm: ("input", "mat2"), torch.mv: ("input", "vec"),
    torch.addmm: ("input", "mat1", "mat2"), torch.baddbmm: ("input", "batch1", "batch2"),
    torch.addbmm: ("input", "batch1", "batch2"), torch.addmv: ("input", "mat", "vec"),
    torch.tensordot: ("a", "b"), F.bilinear: ("input1", "input2", "weight"),
    "matmul": ("self", "other"), "mm": ("self", "mat2"), "bmm": ("self", "mat2"), "mv": ("self", "vec"),
    "inner": ("self", "other"), "addmm": ("self", "mat1", "mat2"), "baddbmm": ("self", "batch1", "batch2"),
    "addbmm": ("self", "batch1", "batch2"), "addmv": ("self", "mat", "vec"),
}


def operands_at(node: torch.fx.Node, positions: tuple[int, ...]) -> list[Any]:
    """The arguments of ``node`` at ``positions``, given by position or by keyword (named by
    ``ARGUMENT_NAMES``, or by the schema of an ATen op)."""
    schema = getattr(node.target, "_schema", None)
    names = tuple(a.name for a in schema.arguments) if schema is not None else ARGUMENT_NAMES.get(node.target, ())
    found = []
    for i in positions:
        if i < len(node.args):
            found.append(node.args[i])
        elif i < len(names) and names[i] in node.kwargs:
            found.append(node.kwargs[names[i]])
    return found


# Products of a list of matrices: every one is an operand.
FUNCTION_LIST_ARGS: set[Any] = {
    torch.linalg.multi_dot, torch.chain_matmul, torch.ops.aten.linalg_multi_dot, torch.ops.aten.chain_matmul,
}
# Shape-only ops a weight may pass through on its way to the product (w.t(), w.T, ...).
VIEW_METHODS = {
    "t", "transpose", "permute", "view", "reshape", "contiguous", "flatten",
    "unsqueeze", "squeeze", "to", "type_as", "float", "half", "bfloat16", "double",
    "expand", "expand_as", "view_as", "reshape_as",
}
VIEW_FUNCTIONS: set[Callable[..., Any]] = {
    torch.t, torch.transpose, torch.permute, torch.reshape, torch.flatten,
    torch.unsqueeze, torch.squeeze,
}
VIEW_ATTRS = {"T", "mT", "H", "mH"}

# The same at ATen level, the ops of torch.export's graphs, by overload packet (every overload).
_ATEN = torch.ops.aten
ATEN_WEIGHT_ARGS: dict[Any, tuple[int, ...]] = {
    _ATEN.linear: (1,),
    _ATEN.conv1d: (1,), _ATEN.conv2d: (1,), _ATEN.conv3d: (1,),
    _ATEN.conv_transpose1d: (1,), _ATEN.conv_transpose2d: (1,), _ATEN.conv_transpose3d: (1,),
    _ATEN.convolution: (1,), _ATEN._convolution: (1,),
    _ATEN.matmul: (0, 1), _ATEN.mm: (0, 1), _ATEN.bmm: (0, 1),
    _ATEN.addmm: (1, 2), _ATEN.baddbmm: (1, 2), _ATEN.addbmm: (1, 2),
    _ATEN.mv: (0, 1), _ATEN.addmv: (1, 2), _ATEN.inner: (0, 1), _ATEN.tensordot: (0, 1),
    _ATEN.bilinear: (2,), _ATEN._trilinear: (0, 1, 2),
}
# Recurrent ops of an exported nn.LSTM / GRU / RNN: their argument named "params" is the list of
# every layer's weight matrices and biases (the matrices are product weights).
ATEN_RECURRENT = {_ATEN.lstm, _ATEN.gru, _ATEN.rnn_tanh, _ATEN.rnn_relu}
ATEN_VIEWS = {
    _ATEN.t, _ATEN.transpose, _ATEN.permute, _ATEN.view, _ATEN.reshape, _ATEN._unsafe_view,
    _ATEN.alias, _ATEN.contiguous, _ATEN.unsqueeze, _ATEN.squeeze, _ATEN.flatten, _ATEN.expand,
    _ATEN.to, _ATEN._to_copy, _ATEN.numpy_T, _ATEN.mT,
}
# Other ops known by their schema: a product-named op (grouped_mm, _scaled_mm, a custom
# linear...) reads its weight as the argument named here; a custom op (outside aten) that takes
# an argument named "weight" reads it as one (transformers' grouped_mm_fallback for MoE experts).
_PRODUCT_NAMES = ("mm", "conv", "linear", "matmul")
_PRODUCT_ARGS = ("weight", "mat2", "batch2", "w")


def schema_weight_positions(op: Any) -> tuple[int, ...]:
    schema = getattr(op, "_schema", None)
    if schema is None:
        return ()
    namespace, _, name = schema.name.partition("::")
    names = [a.name for a in schema.arguments]
    if any(word in name for word in _PRODUCT_NAMES):
        return tuple(i for i, a in enumerate(names) if a in _PRODUCT_ARGS)
    if namespace != "aten":
        return tuple(i for i, a in enumerate(names) if a == "weight")
    return ()


def schema_positions(op: Any, name: str) -> tuple[int, ...]:
    """The position of the argument ``name`` in the schema of the ATen op ``op`` (empty when none)."""
    schema = getattr(op, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    return (names.index(name),) if name in names else ()


# The other operand of products whose weight operand is fixed: a parameter read there (a learned
# query or latent fed through a linear layer) is no weight of that product.
FUNCTION_INPUT_ARGS: dict[Any, int] = {
    F.linear: 0, F.conv1d: 0, F.conv2d: 0, F.conv3d: 0,
    F.conv_transpose1d: 0, F.conv_transpose2d: 0, F.conv_transpose3d: 0,
    _ATEN.linear: 0, _ATEN.conv1d: 0, _ATEN.conv2d: 0, _ATEN.conv3d: 0, _ATEN.convolution: 0,
    _ATEN._convolution: 0, _ATEN.conv_transpose1d: 0, _ATEN.conv_transpose2d: 0, _ATEN.conv_transpose3d: 0,
}

# Embedding lookups and the position of their table: a weight read by one is an embedding.
LOOKUP_ARGS: dict[Any, int] = {F.embedding: 1, _ATEN.embedding: 0}

# Leaf modules whose call can be rewritten into functional form with a masked weight.
REWRITABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
# Every module type whose weight is a conv/linear weight (subclasses that compute otherwise too):
# each such weight is masked or listed in ``skipped`` with why, used by the forward or not.
LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
def is_rewritable(module: nn.Module) -> bool:
    """An exact conv/linear, or a subclass that did not change how it computes."""
    for base in REWRITABLE_MODULES:
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return False
            conv_forward = getattr(base, "_conv_forward", None)
            return conv_forward is None or type(module)._conv_forward is conv_forward
    return False


def packet(target: Any) -> Any:
    """The overload packet of an ATen op (``aten.mm.default`` -> ``aten.mm``); else the target."""
    return getattr(target, "overloadpacket", target)


def view_source(node: torch.fx.Node) -> Any:
    """The tensor a shape-only node (``w.t()``, ``w.T``, ``reshape`` ...) views; None otherwise."""
    if node.op == "call_method" and node.target in VIEW_METHODS:
        return node.args[0]
    if node.op == "call_function" and (node.target in VIEW_FUNCTIONS or packet(node.target) in ATEN_VIEWS):
        return node.args[0] if node.args else None
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in VIEW_ATTRS:
        return node.args[0]
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 and _whole(node.args[1]):
        return node.args[0]  # w[None], w[..., None], w[:]: every entry, new axes at most
    return None


def _whole(index: Any) -> bool:
    """An index that keeps every entry of what it indexes (``None``, ``...``, ``:``)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or p == slice(None) for p in parts)

# The products export_inference lowers to compressed layers, by kind (the weight is the second
# operand), matched at both levels.
_KINDS: dict[Any, str] = {
    F.linear: "linear", _ATEN.linear: "linear",
    F.conv2d: "conv2d", _ATEN.conv2d: "conv2d",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.mm: "matmul", _ATEN.matmul: "matmul", _ATEN.mm: "matmul",
}


def product_kind(target: Any) -> str | None:
    """``"linear"``, ``"conv2d"`` or ``"matmul"`` for a call of that product (a functional call
    or an ATen op, any overload); None for anything else."""
    return _KINDS.get(target, _KINDS.get(packet(target))) if _hashable(target) else None


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True
