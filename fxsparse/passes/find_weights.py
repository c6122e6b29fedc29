"""Analysis pass: which parameters are the weight operand of a convolution, linear or matmul.

Invariant: a parameter is reported when, and only when, one of its uses in the graph is the
weight operand of a conv / linear / matrix-product node (a ``call_module`` on an ``nn.Conv*`` /
``nn.Linear`` leaf, or a ``call_function`` / ``call_method`` whose operand is a ``get_attr`` of the
parameter, possibly through views such as ``.t()``), has two or more dims, is floating point and
trainable, and every one of its uses can be rewritten to the masked value. A weight an opaque
leaf module uses inside (a conv/linear submodule's weight, ``nn.MultiheadAttention``'s and RNNs'
matrices, what ``register_leaf_weights`` declares) is reported too, with the leaf in
``WeightSite.opaque``: it is masked by the module-level fallback. Parameters are named by their
canonical FQN (the first name ``named_parameters()`` gives), so a tied weight is one entry however
many names and uses it has. Consumer nodes get ``node.meta["fxsparse.weight"]``.

:func:`find_weights` walks the graph once: ``_visit`` hands each node to the function of its
kind (``get_attr`` reads, embedding lookups ``_lookup``, leaf modules ``_module_call`` with
``_opaque_leaf_parameters`` and ``_opaque_module_arguments``, wrapped functions
``_wrapped_call``, linear/conv inputs ``_input_operands``, higher-order ops ``_higher_order``,
product operands and computed weights ``_product_operands``), each recording into one
``_Findings``; the wrapped calls that could not be traced into are then watched running
(``_watch_wrapped_calls``), and ``_assemble`` turns the findings into ``(sites, skipped)``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxsparse.capture import Runner, graph_inputs, resolve
from fxsparse.masking import mask_prologue
from fxsparse.passes.functionalize import plain_call
from fxsparse.passes.ops import (
    ATEN_RECURRENT,
    ATEN_WEIGHT_ARGS,
    FUNCTION_INPUT_ARGS,
    FUNCTION_LIST_ARGS,
    FUNCTION_WEIGHT_ARGS,
    LAYERS,
    LOOKUP_ARGS,
    METHOD_WEIGHT_ARGS,
    REWRITABLE_MODULES,
    VIEW_FUNCTIONS,
    is_rewritable,
    operands_at,
    packet,
    schema_positions,
    schema_weight_positions,
    view_source,
)
from fxsparse.registry import LEAF_WEIGHTS, leaf_function_weights, register_leaf_weights

__all__ = [
    "WeightUse", "WeightSite", "find_weights", "find_weights_in", "canonical_names", "REWRITABLE_MODULES", "LAYERS",
    "register_leaf_weights", "leaf_product_weights", "kernel_operands",
]

_ATEN = torch.ops.aten

# Leaves whose 2-D weights are lookup tables rather than product operands.
_NOT_MATMUL_LEAVES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class WeightUse:
    """One node that reads the parameter: a ``get_attr`` or a rewritable ``call_module``."""

    node: torch.fx.Node
    kind: str  # "get_attr" | "call_module"


@dataclass
class WeightSite:
    """A sparsifiable parameter and every place the graph uses it.

    ``opaque`` names the leaf module(s) that use it out of the graph's sight (the module-level
    fallback: masked in the parameter itself, its growth gradient hooked on the parameter).
    ``kernels`` / ``layer``: a product reads a kernel computed from it alone, of its shape
    (weight standardization), in the graph or in the layer ``layer`` of an opaque leaf: the mask
    goes on that kernel (:mod:`fxsparse.kernels`).
    """

    fqn: str
    shape: tuple[int, ...]
    uses: list[WeightUse] = field(default_factory=list)
    consumers: list[torch.fx.Node] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    # the products that read a kernel computed from it (weight standardization): the mask goes on
    # the kernel (fxsparse.kernels); ``layer``: the layer inside an opaque leaf that computes it
    kernels: list[torch.fx.Node] = field(default_factory=list)
    layer: str = ""


def _timm_leaf_weights() -> None:
    try:
        from timm.layers import CondConv2d
    except ImportError:  # pragma: no cover - timm is a dependency, but stay importable without
        return
    # per-sample kernels: routing weights (batch x experts) @ weight (experts x kernel)
    LEAF_WEIGHTS.setdefault(CondConv2d, ("weight",))


_timm_leaf_weights()


def leaf_product_weights(module: nn.Module) -> dict[str, str]:
    """The conv/linear/matmul weights used inside ``module``, by name relative to it, with what
    uses them: weights of conv/linear submodules (of any subclass), the projections of
    ``nn.MultiheadAttention``, the weight of ``nn.Bilinear``, the input and hidden matrices of ``nn.RNN``/``LSTM``/``GRU``, and
    what :func:`register_leaf_weights` declared."""
    found: dict[str, str] = {}
    for sub_name, sub in module.named_modules():
        prefix = f"{sub_name}." if sub_name else ""
        kind = type(sub).__name__
        if isinstance(sub, REWRITABLE_MODULES) and isinstance(getattr(sub, "weight", None), nn.Parameter):
            found[prefix + "weight"] = kind
        if isinstance(sub, nn.Bilinear):
            found[prefix + "weight"] = kind
        if isinstance(sub, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if isinstance(getattr(sub, name, None), nn.Parameter):
                    found[prefix + name] = kind
        if isinstance(sub, nn.RNNBase):
            for name, _ in sub.named_parameters(recurse=False):
                if name.startswith(("weight_ih", "weight_hh")):
                    found[prefix + name] = kind
        for cls, names in LEAF_WEIGHTS.items():
            if isinstance(sub, cls):
                for name in names:
                    if isinstance(getattr(sub, name, None), nn.Parameter):
                        found[prefix + name] = kind
    return found


def _computed_inside(module: nn.Module) -> dict[str, tuple[str, str]]:
    """The conv/linear weights inside an opaque leaf that their own layer computes on before its
    product (a subclass that changed how it computes: timm's ``StdConv2d`` / ``ScaledStdConv2d``
    standardize the weight), by name relative to ``module``: ``("kernel", layer path)`` when the
    layer traced alone computes a kernel of the weight's shape from it alone (its mask then goes
    on that kernel, :mod:`fxsparse.kernels`), else ``("blocked", why)``: a mask on the parameter
    would not make the product sparse. A layer that cannot be traced alone is run alone and
    watched (:func:`_computed_when_run`): blocked when it computes its kernel, else taken as
    reading its weight as it is."""
    from fxsparse.tracing import trace

    found: dict[str, tuple[str, str]] = {}
    for sub_name, sub in module.named_modules():
        if not isinstance(sub, REWRITABLE_MODULES) or is_rewritable(sub):
            continue
        relative = f"{sub_name}.weight" if sub_name else "weight"
        try:
            traced = trace(sub)
            sites, left = find_weights(traced, canonical_names(sub), _depth=_MAX_DEPTH)
        except Exception:  # noqa: BLE001 - untraceable alone: watched running instead
            if _computed_when_run(sub):
                found[relative] = ("blocked", f"{type(sub).__name__} {sub_name!r}, which cannot be traced alone "
                                   "and was seen running to compute its kernel from the weight (weight "
                                   "standardization or the like): a mask on the parameter would not make "
                                   "the product sparse; left dense")
            continue
        if any(site.fqn == "weight" and site.kernels and not site.consumers for site in sites):
            found[relative] = ("kernel", sub_name)
        reason = dict(left).get("weight")
        if reason is not None and reason.startswith("computed into"):
            found[relative] = ("blocked", f"{type(sub).__name__} {sub_name!r}: {reason}")
    return found


def _computed_when_run(layer: nn.Module) -> bool:
    """Whether a conv/linear ``layer``, run alone on a small random input of its own channels,
    reads a kernel computed from its weight rather than the weight (:class:`fxsparse.probe.ProductReads`).
    False when it cannot be run so."""
    from fxsparse.probe import ProductReads

    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (1, layer.in_features)
    else:
        spatial = getattr(layer, "kernel_size", ())
        shape = (1, layer.in_channels, *(max(2 * k, 8) for k in spatial))
    try:
        with torch.no_grad(), ProductReads({"weight": weight}) as reads:
            layer(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype))
    except Exception:  # noqa: BLE001 - not runnable so: taken as reading its weight
        return False
    return "weight" in reads.computed and "weight" not in reads.direct


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Maps every name of every parameter to the first name it has (tied weights share one)."""
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(param), name)
    return names


def _param_of(gm: torch.fx.GraphModule, node: Any, names: dict[str, str]) -> str | None:
    """The canonical FQN of the parameter ``node`` reads, following views; else None."""
    while isinstance(node, torch.fx.Node):
        if node.op == "get_attr":
            return names.get(str(node.target))
        node = view_source(node)
    return None


def _label(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(packet(target))
    return getattr(target, "__name__", str(target))


def _parameters_behind(gm: torch.fx.GraphModule, node: torch.fx.Node, names: dict[str, str]) -> list[str]:
    """The canonical FQNs of the parameters ``node`` is computed from (it reads no input)."""
    found, todo, seen = [], [node], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            fqn = names.get(str(current.target))
            if fqn is not None and fqn not in found:
                found.append(fqn)
        todo.extend(current.all_input_nodes)
    return found


def _weight_operands(node: torch.fx.Node) -> Iterable[Any]:
    if node.op == "call_function":
        if packet(node.target) is _ATEN.einsum:  # einsum(equation, tensors, path=None)
            return list(node.args[1]) if len(node.args) > 1 else []
        if node.target is torch.einsum or packet(node.target) in FUNCTION_LIST_ARGS:  # operands, or a list of them
            operands = node.args[1:] if node.target is torch.einsum else node.args
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = operands[0]
            return list(operands)
        if packet(node.target) in ATEN_RECURRENT:  # lstm(input, hx, params, ...): the weight matrices of a list
            params = operands_at(node, schema_positions(node.target, "params"))
            return list(params[0]) if params and isinstance(params[0], (list, tuple)) else []
        positions = FUNCTION_WEIGHT_ARGS.get(node.target, ())  # type: ignore[arg-type]
        if not positions:
            positions = ATEN_WEIGHT_ARGS.get(packet(node.target), ())
        if not positions and isinstance(node.target, torch._ops.OpOverload) and packet(node.target) not in LOOKUP_ARGS:
            positions = schema_weight_positions(node.target)
        return operands_at(node, positions)
    if node.op == "call_method":
        return operands_at(node, METHOD_WEIGHT_ARGS.get(str(node.target), ()))
    return []


def _flat(args: Any) -> list[Any]:
    flat: list[Any] = []
    torch.fx.node.map_aggregate(args, flat.append)
    return flat


def _is_plain_embedding(module: nn.Module) -> bool:
    return type(module).forward is nn.Embedding.forward if isinstance(module, nn.Embedding) else False


# torch's own Python functions that tracing records whole (they dispatch __torch_function__) and
# that compute products with arguments they are given: those arguments, by name. torch's other
# Python functions (norms, dropout, padding, interpolation ...) compute no product with theirs.
_TORCH_FUNCTION_WEIGHTS: dict[Any, frozenset[str]] = {
    F.multi_head_attention_forward: frozenset(
        {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight"}
    ),
}
if hasattr(F, "grouped_mm"):
    _TORCH_FUNCTION_WEIGHTS[F.grouped_mm] = frozenset({"mat_a", "mat_b"})


def _is_leaf_call(node: torch.fx.Node) -> bool:
    """A call of a Python function the graph keeps whole (``torch.fx.wrap``,
    :func:`fxsparse.register_leaf_function`, timm's no-trace functions, and the functions of
    torch that compute products with what they are given, ``_TORCH_FUNCTION_WEIGHTS``), other
    than the products, views and lookups the tables here know and fxsparse's own prologue."""
    target = node.target
    if node.op != "call_function" or not inspect.isfunction(target) or target is mask_prologue:
        return False
    if str(getattr(target, "__module__", "")).split(".")[0] == "torch":
        return target in _TORCH_FUNCTION_WEIGHTS
    return target not in FUNCTION_WEIGHT_ARGS and target not in LOOKUP_ARGS and target not in VIEW_FUNCTIONS


def _function_label(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', fn))}"


def _bound_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """The arguments of a call by parameter name (by position where the signature is unknown)."""
    try:
        return dict(inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {f"argument {i}": a for i, a in enumerate([*node.args, *node.kwargs.values()])}


def _operand_params(
    gm: torch.fx.GraphModule, node: torch.fx.Node, names: dict[str, str], params: dict[str, nn.Parameter],
) -> dict[str, str]:
    """The parameters of two or more dims a call is given as arguments (through views), by
    canonical FQN, with the name each argument has in the call."""
    given: dict[str, str] = {}
    bound = _bound_arguments(node)
    for name, value in bound.items():
        for operand in _flat(value):
            fqn = _param_of(gm, operand, names)
            if fqn is not None and params[fqn].dim() >= 2:
                given.setdefault(fqn, name)
            module = _module_of(gm, operand)
            for pname, p in module.named_parameters() if module is not None else ():
                path = f"{operand.target}.{pname}"
                if p.dim() >= 2 and path in names:  # a layer handed whole: its weights come along
                    given.setdefault(names[path], f"{name}.{pname}")
    return given


def _computed_operand_params(
    gm: torch.fx.GraphModule, node: torch.fx.Node, names: dict[str, str], params: dict[str, nn.Parameter],
    fixed: set[torch.fx.Node],
) -> dict[str, tuple[str, str]]:
    """The matrix parameters behind the arguments of a call that are computed from parameters
    and constants alone (``fixed``) but are no parameter or view of one (``w * gain``, a
    normalized weight), by canonical FQN: ``(argument name, the op computing it)``."""
    bound = _bound_arguments(node)
    computed: dict[str, tuple[str, str]] = {}
    for name, value in bound.items():
        for operand in _flat(value):
            if not isinstance(operand, torch.fx.Node) or operand not in fixed or operand.op == "get_attr":
                continue
            if _param_of(gm, operand, names) is not None:
                continue
            for fqn in _parameters_behind(gm, operand, names):
                if fqn in params and sum(d > 1 for d in params[fqn].shape) >= 2:
                    computed.setdefault(fqn, (name, _label(operand.target)))
    return computed


def _module_of(gm: torch.fx.GraphModule, node: Any) -> nn.Module | None:
    """The module a ``get_attr`` node reads (tracing turns a module argument into one), else None."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = resolve(gm, str(node.target))
        if isinstance(value, nn.Module):
            return value
    return None


def _input_positions(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[int, ...]:
    """Where a linear/conv node takes its input (the operand that is not its weight)."""
    if node.op == "call_function" and packet(node.target) in FUNCTION_INPUT_ARGS:
        return (FUNCTION_INPUT_ARGS[packet(node.target)],)
    if node.op == "call_module" and plain_call(node) and node.args:
        if isinstance(gm.get_submodule(str(node.target)), REWRITABLE_MODULES):
            return (0,)
    return ()


_MAX_DEPTH = 3  # wrapped functions looked into within wrapped functions


def _leaf_function_reads(
    gm: torch.fx.GraphModule, node: torch.fx.Node, given: dict[str, str], names: dict[str, str],
    embeddings: bool, depth: int, computed: dict[str, tuple[str, str]] | None = None, fixed: set[torch.fx.Node] = frozenset(),
) -> tuple[set[str], dict[str, str]] | str:
    """What the wrapped function ``node`` calls does with the parameters ``given`` to it:
    ``(product weights, {fqn: why left dense})``, parameters in neither being no product weight
    there; or a string saying why it cannot be told. ``computed``: the parameters behind
    arguments computed from parameters alone (:func:`_computed_operand_params`); a product that
    reads such an argument leaves them dense, with the reason.

    Weights declared with ``register_leaf_function(fn, weights=[...])`` are taken at their word.
    Otherwise the function's body is traced once more, alone, with the weights as attribute
    reads of ``gm``, the computed arguments as their computation (nodes of ``fixed``) and every
    other argument a placeholder (its own constants kept), and the result is analysed like any
    graph; Python control flow on an argument's value or shape stops that trace (the reason the
    function was kept whole, often).
    """
    fn = node.target
    computed = computed or {}
    declared = _TORCH_FUNCTION_WEIGHTS.get(fn, leaf_function_weights(fn))
    if declared is not None:  # an argument name, or a layer argument's name for its weights
        return {fqn for fqn, arg in given.items() if arg in declared or arg.split(".", 1)[0] in declared}, {
            fqn: f"computed from it by {op} and passed as the declared weight argument {arg!r} of {fn.__name__}"
                 f"{_COMPUTED_WHY}"
            for fqn, (arg, op) in computed.items() if arg in declared
        }
    if depth >= _MAX_DEPTH:
        return f"wrapped functions nested deeper than {_MAX_DEPTH}"
    tracer = torch.fx.Tracer()
    tracer.root = gm
    graph = torch.fx.Graph()
    tracer.graph = graph
    env: dict[torch.fx.Node, torch.fx.Node] = {}

    def copy_of(operand: torch.fx.Node) -> torch.fx.Node:
        if operand not in env:
            param = _param_of(gm, operand, names)
            if operand.op == "get_attr" and (param is not None or operand in fixed):
                env[operand] = graph.get_attr(str(operand.target))
            elif param is None and operand in fixed:  # computed from parameters: the same computation
                env[operand] = graph.node_copy(operand, copy_of)
            elif param is None:
                env[operand] = graph.placeholder(f"arg_{len(env)}")
            else:  # a view of the weight: the same view of its read
                source = view_source(operand)
                env[operand] = graph.node_copy(operand, lambda n: copy_of(n) if n is source else placeholder(n))
        return env[operand]

    def placeholder(operand: torch.fx.Node) -> torch.fx.Node:
        if operand not in env:
            env[operand] = graph.placeholder(f"arg_{len(env)}")
        return env[operand]

    def proxy(value: Any) -> Any:
        if not isinstance(value, torch.fx.Node):
            return value
        module = _module_of(gm, value)  # a layer handed whole runs as itself: its reads are get_attrs
        return module if module is not None else torch.fx.Proxy(copy_of(value), tracer)

    try:
        args = torch.fx.node.map_aggregate(node.args, proxy)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, proxy)
        fn(*args, **kwargs)  # type: ignore[operator]
        graph.output(None)
        probe = torch.fx.GraphModule(gm, graph)
        sites, left = find_weights(probe, names, embeddings=embeddings, _depth=depth + 1)
    except Exception as e:  # noqa: BLE001 - any failure of the trace: the use is unknown
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:160] if text else ''}".rstrip(": ")
    kernels = {  # a kernel computed inside the function: no node of ours can mask it there
        s.fqn: f"computed into the weight of {_label(s.kernels[0].target)} inside the function{_COMPUTED_WHY}"
        for s in sites if s.kernels and not s.consumers
    }
    reads = {s.fqn for s in sites if s.fqn not in kernels} & set(given)
    return reads, {fqn: why for fqn, why in [*left, *kernels.items()] if fqn in given or fqn in computed}


_COMPUTED_WHY = (
    ": the product reads a function of it, which a mask on the parameter would not make sparse; left dense"
)


def _record_leaf_reads(
    found: _Findings, node: torch.fx.Node, given: dict[str, str], computed: dict[str, tuple[str, str]],
    reads: tuple[set[str], dict[str, str]] | str,
) -> None:
    """Marks the weights a wrapped call uses as product weights for the module-level fallback,
    and puts the others a product reads there, or all of them when that is unknown, in
    ``found.blocked`` with the reason; the parameters behind computed arguments (``computed``)
    go to ``found.computed``, dense unless a product elsewhere reads them as they are."""
    label = _function_label(node.target)
    name = getattr(node.target, "__name__", "fn")
    if isinstance(reads, str):
        for fqn, arg in given.items():
            found.blocked.setdefault(fqn, (
                f"passed as {arg!r} into the wrapped function {label}, which fxsparse cannot trace "
                f"into ({reads}), so how it uses the weight is unknown: left dense. Fix: pass "
                f"example_inputs to sparsify (fxsparse then watches the function run), or declare "
                f"its weight arguments with fxsparse.register_leaf_function({name}, weights=[{arg!r}, ...])"
            ))
        for fqn, (arg, op) in computed.items():
            found.computed.setdefault(fqn, (
                f"computed from it by {op} and passed as {arg!r} into the wrapped function {label}, "
                f"which fxsparse cannot trace into ({reads}): if a product reads it there, it reads a "
                f"function of the parameter, which a mask on the parameter would not make sparse; left "
                f"dense. Pass example_inputs to sparsify to have the function watched running"
            ))
        return
    products, left = reads
    for fqn in given:
        if fqn in products:
            leaf = found.site(fqn)
            where = f"{label} (wrapped function, argument {given[fqn]!r})"
            if where not in leaf.opaque:
                leaf.opaque.append(where)
        elif fqn in left:
            found.blocked.setdefault(fqn, f"inside the wrapped function {label}: {left[fqn]}")
    for fqn, (arg, op) in computed.items():
        if fqn in left and fqn not in given:
            found.computed.setdefault(
                fqn, f"computed from it by {op} and passed as {arg!r} into the wrapped function {label}; there: {left[fqn]}",
            )


def _watch_leaf_calls(
    gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], inputs: tuple[tuple[Any, ...], dict[str, Any]],
    names: dict[str, str],
) -> dict[torch.fx.Node, tuple[set[str], dict[str, str]] | str]:
    """Runs a copy of ``gm`` on ``inputs`` and watches each wrapped call of ``nodes`` run
    (:class:`fxsparse.probe.ProductReads`): the parameters a product kernel reads inside."""
    from fxsparse.probe import ProductReads

    twin = copy.deepcopy(gm)
    params = {names.get(n, n): p for n, p in twin.named_parameters(remove_duplicate=False)}
    wanted = {node.name: node for node in nodes}
    seen: dict[torch.fx.Node, tuple[set[str], dict[str, str]] | str] = {}

    reads = ProductReads(params)  # over the whole run: it follows what is computed from parameters

    class Watcher(Runner):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.name not in wanted:
                return super().run_node(n)
            reads.direct, reads.computed = set(), set()
            result = super().run_node(n)
            seen[wanted[n.name]] = set(reads.direct), {
                fqn: "computed into a product's weight (weight standardization or the like): a mask "
                     "on the parameter would not make the product sparse; left dense"
                for fqn in reads.computed - reads.direct
            }
            return result

    try:
        with torch.no_grad(), reads:
            Watcher(twin).run(*graph_inputs(twin, *inputs))
    except Exception as e:  # noqa: BLE001 - the calls not reached stay unknown, with this reason
        text = str(e).strip().splitlines()
        why = f"running the model on example_inputs failed: {type(e).__name__}: {text[0][:160] if text else ''}"
        return {**dict.fromkeys(nodes, why), **seen}
    return seen


@dataclass
class _Findings:
    """What :func:`find_weights` learns walking one graph: the graph and its context, and the
    accumulators each node kind's function records into, read at the end by :func:`_assemble`."""

    gm: torch.fx.GraphModule
    names: dict[str, str]
    params: dict[str, nn.Parameter]  # by canonical name (the graph may not use that path)
    embeddings: bool
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None
    depth: int
    sites: dict[str, WeightSite] = field(default_factory=dict)  # in order of first use
    blocked: dict[str, str] = field(default_factory=dict)  # product weights left dense, with why
    quiet: set[str] = field(default_factory=set)  # blocked, but worth no word (lookup tables)
    uses: dict[str, list[WeightUse]] = field(default_factory=dict)
    fixed: set[torch.fx.Node] = field(default_factory=set)  # nodes computed from parameters and constants alone
    computed: dict[str, str] = field(default_factory=dict)  # parameters products read only through such a computation
    lookups: dict[str, list[torch.fx.Node]] = field(default_factory=dict)  # embedding tables: the nodes looking them up
    as_input: dict[str, str] = field(default_factory=dict)  # parameters read as the input operand of a linear/conv
    # wrapped calls to watch run: (node, given, computed, why they could not be traced into)
    watched: list[tuple[torch.fx.Node, dict[str, str], dict[str, tuple[str, str]], str]] = field(default_factory=list)

    def site(self, fqn: str) -> WeightSite:
        """The site of ``fqn``, made at its first use."""
        if fqn not in self.sites:
            self.sites[fqn] = WeightSite(fqn, tuple(self.params[fqn].shape))
        return self.sites[fqn]

    def matrix_of(self, operand: Any) -> str | None:
        """The canonical FQN of the parameter of two or more dims ``operand`` reads (through
        views), else None."""
        fqn = _param_of(self.gm, operand, self.names)
        return fqn if fqn is not None and self.params[fqn].dim() >= 2 else None


def find_weights(
    gm: torch.fx.GraphModule, names: dict[str, str], *, embeddings: bool = False,
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None, _depth: int = 0,
) -> tuple[list[WeightSite], list[tuple[str, str]]]:
    """Finds the sparsifiable weights of ``gm``, in order of first use.

    A weight passed as an argument into a function the graph keeps whole (``torch.fx.wrap``,
    :func:`fxsparse.register_leaf_function`, timm's no-trace functions) is looked for inside it
    (:func:`_leaf_function_reads`): used there as a product weight, it gets the module-level
    fallback of opaque leaves; otherwise, or when that cannot be told, it is in ``skipped``
    with the reason.

    Args:
        gm: the traced model.
        names: :func:`canonical_names` of the model ``gm`` was traced from.
        embeddings: also report product weights that an embedding lookup reads (a tied
            input/output embedding): one mask then serves the lookup and the product, and a
            plain ``nn.Embedding`` leaf reading it is marked for ``functionalize``. False (the
            default): such weights stay dense, with the reason in ``skipped``.
        inputs: ``(args, kwargs)`` the model runs on: a wrapped function that cannot be traced
            into is then watched while a copy of ``gm`` runs on them (:class:`fxsparse.probe.ProductReads`).

    Returns:
        ``(sites, skipped)``: the sparsifiable weights, and ``(fqn, reason)`` for every
        conv/linear/matmul weight, or weight of an opaque leaf module, left dense.
    """
    params: dict[str, nn.Parameter] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        params.setdefault(names.get(name, name), param)
    found = _Findings(gm, names, params, embeddings, inputs, _depth)
    for node in gm.graph.nodes:
        _visit(found, node)
    _watch_wrapped_calls(found)
    return _assemble(found)


def _visit(found: _Findings, node: torch.fx.Node) -> None:
    """Hands ``node`` to the function of each kind it is (a node can be several)."""
    if node.op == "get_attr" and str(node.target) in found.names:
        found.uses.setdefault(found.names[str(node.target)], []).append(WeightUse(node, "get_attr"))
    elif node.op == "call_function" and packet(node.target) in LOOKUP_ARGS:
        _lookup(found, node)
    elif node.op == "call_module" and _module_call(found, node):
        return  # an nn.Embedding lookup rewritten to F.embedding if the table is a product weight
    if node.op == "call_module" and not is_rewritable(found.gm.get_submodule(str(node.target))):
        _opaque_module_arguments(found, node)
    if _is_leaf_call(node):
        _wrapped_call(found, node)
    _input_operands(found, node)
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        _higher_order(found, node)
    _product_operands(found, node)


def _lookup(found: _Findings, node: torch.fx.Node) -> None:
    """An embedding lookup (``F.embedding``, ``aten.embedding``): its table is an embedding."""
    position = LOOKUP_ARGS[packet(node.target)]
    table = node.args[position] if position < len(node.args) else node.kwargs.get("weight")
    fqn = _param_of(found.gm, table, found.names)
    if fqn is not None:
        found.lookups.setdefault(fqn, []).append(node)


def _module_call(found: _Findings, node: torch.fx.Node) -> bool:
    """A ``call_module`` leaf: a plain ``nn.Embedding`` is a lookup; a rewritable conv/linear
    consumes its weight; the parameters it owns otherwise are used inside the opaque leaf
    (:func:`_opaque_leaf_parameters`). True when the call is a plain embedding lookup kept for
    ``functionalize`` (``embeddings=True``): nothing else to learn from it."""
    names = found.names
    module = found.gm.get_submodule(str(node.target))
    if _is_plain_embedding(module) and plain_call(node):
        found.lookups.setdefault(names[f"{node.target}.weight"], []).append(node)
        if found.embeddings:
            return True
    owned = [(f"{node.target}.{pname}", p) for pname, p in module.named_parameters(remove_duplicate=False)]
    if is_rewritable(module) and plain_call(node):
        weight_fqn = names[f"{node.target}.weight"]
        found.uses.setdefault(weight_fqn, []).append(WeightUse(node, "call_module"))
        found.site(weight_fqn).consumers.append(node)
        node.meta["fxsparse.weight"] = weight_fqn
        owned = [(n, p) for n, p in owned if not n.endswith(".weight") or names[n] != weight_fqn]
        # Its bias is read inside the rewritten call; it stays dense.
        owned = [(n, p) for n, p in owned if not n.endswith(".bias")]
    _opaque_leaf_parameters(found, node, module, owned)
    return False


def _opaque_leaf_parameters(
    found: _Findings, node: torch.fx.Node, module: nn.Module, owned: list[tuple[str, nn.Parameter]],
) -> None:
    """The parameters of two or more dims the leaf ``module`` uses out of the graph's sight: its
    product weights (:func:`leaf_product_weights`) take the module-level fallback, unless their
    layer computes on them first (:func:`_computed_inside`); the others are blocked."""
    inside = leaf_product_weights(module)
    standardized = _computed_inside(module) if inside else {}
    for pname, p in owned:
        relative = pname[len(f"{node.target}.") :]
        kind, what = standardized.get(relative, ("", ""))
        if p.dim() >= 2 and kind == "kernel":  # masked on the kernel its layer computes
            found.site(found.names[pname]).layer = f"{node.target}.{what}" if what else str(node.target)
            continue
        gain = any(k == "kernel" and relative.startswith(w[: -len("weight")]) for w, (k, _) in standardized.items())
        if gain and sum(d > 1 for d in p.shape) < 2:
            continue  # a per-channel gain of a layer whose kernel is masked: no product weight
        if p.dim() >= 2 and kind == "blocked":
            found.blocked[found.names[pname]] = (
                f"used inside the opaque leaf module {node.target!r} ({type(module).__name__}) by {what}"
            )
            continue
        if p.dim() >= 2 and relative in inside:
            # the module-level fallback: masked in the parameter, hooked for growth
            leaf = found.site(found.names[pname])
            leaf.opaque.append(f"{node.target} ({type(module).__name__})")
            continue
        if p.dim() >= 2:
            fqn = found.names[pname]
            found.blocked[fqn] = (
                f"used inside the opaque leaf module {node.target!r} "
                f"({type(module).__name__}), which the graph cannot see into; if it is a "
                f"conv/linear/matmul weight there, declare it with "
                f"fxsparse.register_leaf_weights({type(module).__name__}, [...])"
            )
            if isinstance(module, _NOT_MATMUL_LEAVES):
                # A lookup table is no product weight: worth a word only when tied
                # to one, whose mask the lookup would then ignore.
                found.quiet.add(fqn)


def _opaque_module_arguments(found: _Findings, node: torch.fx.Node) -> None:
    """Parameters passed as arguments into an opaque leaf module that is not their own."""
    for operand in _flat((node.args, node.kwargs)):
        fqn = found.matrix_of(operand)
        if fqn is not None and not fqn.startswith(f"{node.target}."):
            found.blocked.setdefault(fqn, (
                f"passed as an argument into the opaque leaf module {node.target!r} "
                f"({type(found.gm.get_submodule(str(node.target))).__name__}), which the graph cannot "
                f"see into: left dense"
            ))


def _wrapped_call(found: _Findings, node: torch.fx.Node) -> None:
    """A call of a function the graph keeps whole (:func:`_is_leaf_call`): the parameters given
    to it are looked for inside (:func:`_leaf_function_reads`); a call that cannot be traced
    into is watched running (:func:`_watch_wrapped_calls`) when there are inputs to run on."""
    given = _operand_params(found.gm, node, found.names, found.params)
    computed = _computed_operand_params(found.gm, node, found.names, found.params, found.fixed)
    if not given and not computed:
        return
    reads = _leaf_function_reads(
        found.gm, node, given, found.names, found.embeddings, found.depth, computed, found.fixed,
    )
    if isinstance(reads, str) and found.inputs is not None:
        found.watched.append((node, given, computed, reads))
    else:
        _record_leaf_reads(found, node, given, computed, reads)


def _input_operands(found: _Findings, node: torch.fx.Node) -> None:
    """Parameters read as the input operand of a linear/conv (a learned query or latent)."""
    for operand in operands_at(node, _input_positions(found.gm, node)):
        fqn = found.matrix_of(operand)
        if fqn is not None:
            found.as_input.setdefault(fqn, (
                f"the input operand of {_label(node.target) if node.op != 'call_module' else node.target}, "
                f"not its weight (a learned query or latent fed through the layer): left dense"
            ))


def _higher_order(found: _Findings, node: torch.fx.Node) -> None:
    """torch.cond / while_loop / map ...: the read happens in a subgraph no pass rewrites
    (grad-mode and autocast blocks are inlined at capture, capture.inline_wrappers)."""
    for operand in _flat(node.args):
        fqn = found.matrix_of(operand)
        if fqn is not None:
            found.blocked.setdefault(fqn, (
                f"read inside torch.ops.higher_order.{node.target.name()} (a subgraph fxsparse "
                f"does not rewrite): left dense"
            ))


def _product_operands(found: _Findings, node: torch.fx.Node) -> None:
    """The weight operands of a functional or method product: a parameter read there (through
    views) is a product weight and ``node`` its consumer; a matrix computed from parameters alone
    (``found.fixed``) is a computed weight, its parameters noted in ``found.computed``."""
    if _computed_from_attributes(node, found.fixed, sizes=True):
        # an input's sizes may enter it (VITS slices its relative position embeddings to the
        # sequence length)
        found.fixed.add(node)
    for operand in _weight_operands(node) if node.op != "call_module" else ():
        fqn = found.matrix_of(operand)
        if fqn is not None:
            found.site(fqn).consumers.append(node)
            node.meta["fxsparse.weight"] = fqn
        elif isinstance(operand, torch.fx.Node) and operand in found.fixed:
            kernel = _kernel_source(found.gm, operand, found.names, found.params)
            if kernel is not None:  # weight standardization: the mask goes on the kernel
                found.site(kernel).kernels.append(node)
                node.meta["fxsparse.weight"] = kernel
                continue
            for source in _parameters_behind(found.gm, operand, found.names):
                if sum(d > 1 for d in found.params[source].shape) >= 2:  # a matrix, not a gain
                    found.computed.setdefault(source, (
                        f"computed into the weight of {_label(node.target)} by "
                        f"{_label(operand.target)} (weight standardization or the like): the "
                        f"product reads a function of it, which a mask on the parameter would "
                        f"not make sparse; left dense"
                    ))


def _computed_from_attributes(node: torch.fx.Node, fixed: set[torch.fx.Node], sizes: bool) -> bool:
    """Whether ``node`` is a function of attributes and constants only, no input's data: an
    attribute read, or a call on nodes of ``fixed`` (at least one) and, with ``sizes``, an input's
    sizes (:func:`_is_size`)."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    inputs = node.all_input_nodes
    return any(a in fixed for a in inputs) and all(a in fixed or (sizes and _is_size(a)) for a in inputs)


def _kernel_source(
    gm: torch.fx.GraphModule, operand: torch.fx.Node, names: dict[str, str], params: dict[str, nn.Parameter],
) -> str | None:
    """The parameter a product's weight ``operand`` is a kernel of: computed from it alone (gains
    and constants aside: no other matrix), of its shape and floating point, not a view of it.
    Else None."""
    if _param_of(gm, operand, names) is not None:
        return None  # the parameter itself, or a view: a direct read
    sources = [s for s in _parameters_behind(gm, operand, names) if sum(d > 1 for d in params[s].shape) >= 2]
    if len(sources) != 1 or not params[sources[0]].is_floating_point():
        return None
    value = _value_of(gm, operand)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(params[sources[0]].shape):
        return None
    return sources[0]


def _value_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    """What ``node``, computed from attributes and constants alone, holds: its recorded value
    (an exported graph's ``meta["val"]``), else computed from the module's tensors, without
    gradient. None when that fails."""
    recorded = node.meta.get("val", node.meta.get("tensor_meta"))
    if recorded is not None and hasattr(recorded, "shape"):
        return recorded
    needed, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(current.all_input_nodes)
    env: dict[torch.fx.Node, Any] = {}
    try:
        with torch.no_grad():
            for n in gm.graph.nodes:
                if n not in needed:
                    continue
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                if n.op == "get_attr":
                    env[n] = resolve(gm, str(n.target))
                elif n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    return None
    except Exception:  # noqa: BLE001 - not computable here: no kernel
        return None
    return env.get(node)


def kernel_operands(
    gm: torch.fx.GraphModule, fqns: Iterable[str], names: dict[str, str],
) -> list[tuple[torch.fx.Node, torch.fx.Node, str]]:
    """``(product, operand, fqn)`` for every product of ``gm`` whose weight operand is a kernel
    computed from one of the parameters ``fqns`` (:func:`_kernel_source`), in graph order."""
    wanted = set(fqns)
    if not wanted:
        return []
    params: dict[str, nn.Parameter] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        params.setdefault(names.get(name, name), param)
    fixed: set[torch.fx.Node] = set()
    found = []
    for node in gm.graph.nodes:
        if _computed_from_attributes(node, fixed, sizes=False):
            fixed.add(node)
        if node.op == "call_module":
            continue
        for operand in _weight_operands(node):
            if isinstance(operand, torch.fx.Node) and operand in fixed:
                fqn = _kernel_source(gm, operand, names, params)
                if fqn in wanted:
                    found.append((node, operand, fqn))
    return found


_SIZE_METHODS = {"size", "dim"}
# an exported graph's sizes: read off a tensor, and the integer functions dynamic shapes use
_SIZE_OPS = {_ATEN.sym_size, _ATEN.sym_numel, _ATEN.sym_stride}
_SYM_FUNCTIONS = {torch.sym_max, torch.sym_min, torch.sym_int, torch.sym_float, torch.sym_not, torch.sym_ite}


def _is_size(node: torch.fx.Node) -> bool:
    """Whether ``node`` holds an input's size, or arithmetic on sizes, not its data: an exported
    graph's symbolic integers, a trace's ``x.size(i)`` / ``x.shape`` and what is computed from them."""
    value = node.meta.get("val")
    if value is not None:
        return isinstance(value, (int, torch.SymInt))
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
        return True
    if node.op == "call_function" and packet(node.target) in _SIZE_OPS:
        return True
    if node.op == "call_function" and (node.target in _SYM_FUNCTIONS or getattr(node.target, "__module__", None) == "_operator"):
        return bool(node.all_input_nodes) and all(_is_size(a) for a in node.all_input_nodes)
    return False


def _watch_wrapped_calls(found: _Findings) -> None:
    """Records the wrapped calls that could not be traced into from a run on ``found.inputs``
    (:func:`_watch_leaf_calls`); a call the run did not reach keeps its first reason."""
    if not found.watched:
        return
    nodes = [node for node, *_ in found.watched]
    seen = _watch_leaf_calls(found.gm, nodes, found.inputs, found.names)  # type: ignore[arg-type]
    for node, given, computed, why in found.watched:
        _record_leaf_reads(found, node, given, computed, seen.get(node, why))


def _why_dense(found: _Findings, fqn: str) -> str | None:
    """Why the product weight ``fqn`` stays dense, or None when it is sparsified."""
    param = found.params[fqn]
    if fqn in found.lookups and not found.embeddings:
        return (
            "an embedding table too (tied input/output embedding, read by a lookup): "
            "embeddings stay dense by default; sparsify(..., embeddings=True) masks the "
            "lookup and the product with one mask"
        )
    if fqn in found.blocked:
        return found.blocked[fqn]
    site = found.sites[fqn]
    if (site.kernels or site.layer) and (site.consumers or site.opaque or fqn in found.lookups or fqn in found.computed):
        return ("read by a product both as it is and through a computation (weight standardization "
                "or the like): one mask cannot serve both reads; left dense")
    if not param.is_floating_point():
        return f"not floating point ({param.dtype})"
    if not param.requires_grad:
        return "frozen (requires_grad=False): no gradient to grow by"
    return None


def _assemble(found: _Findings) -> tuple[list[WeightSite], list[tuple[str, str]]]:
    """``(sites, skipped)`` of :func:`find_weights`: the sites kept, with their uses (a plain
    ``nn.Embedding`` leaf reading one marked for ``functionalize``), and every weight left
    dense with its reason, by FQN."""
    result: list[WeightSite] = []
    skipped: dict[str, str] = {}
    for fqn, s in found.sites.items():
        reason = _why_dense(found, fqn)
        if reason is not None:
            skipped[fqn] = reason
            continue
        s.uses = found.uses.get(fqn, [])
        for node in found.lookups.get(fqn, []):
            if node.op == "call_module":  # a plain nn.Embedding: functionalize rewrites it
                s.uses.append(WeightUse(node, "call_module"))
                node.meta["fxsparse.weight"] = fqn
        result.append(s)
    for fqn, reason in found.blocked.items():
        if fqn not in found.quiet:
            skipped.setdefault(fqn, reason)
    for fqn, reason in [*found.computed.items(), *found.as_input.items()]:
        if fqn not in found.sites:
            skipped.setdefault(fqn, reason)
    return result, sorted(skipped.items())


def find_weights_in(
    gms: list[torch.fx.GraphModule], names: dict[str, str], *, embeddings: bool = False,
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> tuple[list[WeightSite], list[tuple[str, str]]]:
    """:func:`find_weights` over the graphs of one model's modes (train and eval), merged.

    A weight is sparsified when some graph reads it as a product weight and none leaves it
    dense (the first graph's reason is kept); one that an opaque leaf reads in some graph is
    masked by the module-level fallback in all of them. Sites in order of first use, the first
    graph's first.
    """
    merged: dict[str, WeightSite] = {}
    skipped: dict[str, str] = {}
    for gm in gms:
        sites, left = find_weights(gm, names, embeddings=embeddings, inputs=inputs)
        for fqn, reason in left:
            skipped.setdefault(fqn, reason)
        for found in sites:
            site = merged.setdefault(found.fqn, found)
            if site is not found:
                site.uses += found.uses
                site.consumers += found.consumers
                site.opaque += [leaf for leaf in found.opaque if leaf not in site.opaque]
                site.kernels += found.kernels
                site.layer = site.layer or found.layer
    return [s for fqn, s in merged.items() if fqn not in skipped], sorted(skipped.items())
