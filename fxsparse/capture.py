"""The two front-ends that turn a model into a torch.fx graph: symbolic tracing and torch.export.

Symbolic tracing (:func:`fxsparse.tracing.trace`) records ``torch.nn.functional``-level calls
and needs no inputs, but cannot follow data- or shape-dependent Python control flow (most
``transformers`` models). ``torch.export`` runs the model on example inputs under dynamo and
yields an ATen-level graph of what actually ran; :meth:`ExportedProgram.module` turns it back
into a trainable GraphModule whose parameters keep the original model's FQNs. The batch dim of
every input and the sequence dim of integer inputs (token ids, masks) are captured as dynamic
where the model allows it (``Dim.AUTO``), so other batch sizes and sequence lengths run without
a new capture; a floating input's other dims (image size, audio length) are static.

Both front-ends bake the module's mode into the graph: a symbolic trace evaluates
``self.training`` while it traces (functional dropout's and drop path's ``training`` argument,
``dropout_p=... if self.training else 0.`` of attention, a head computed only in training),
and an exported graph also fixes batch norm's ``training``. So each front-end captures the model
in train and in eval mode; where the two graphs are the same (most symbolic traces: dropout and
batch norm modules stay leaves that read their mode when they run) one graph serves both, and
otherwise the :class:`~fxsparse.SparseGraphModule` runs the graph of its current mode
(``.train()`` / ``.eval()`` switch them).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse.draws import OutsideDraws, warn_frozen
from fxsparse.tracing import trace

__all__ = [
    "CAPTURES", "PYTREE_SPECS", "Captured", "capture", "split_inputs", "graph_inputs", "pytree_specs",
    "graph_state", "graph_from_state", "inline_wrappers", "same_graph", "resolve", "Runner",
]

CAPTURES = ("auto", "symbolic", "export")
# the attributes an exported graph module's code reads: how its inputs are flattened and its
# outputs rebuilt (keyword inputs, a transformers ModelOutput)
PYTREE_SPECS = ("_in_spec", "_out_spec")


def pytree_specs(module: nn.Module) -> dict[str, Any]:
    """The pytree specs ``module`` holds (none for a symbolically traced one), to give a
    graph module built from its graph."""
    return {name: module.__dict__[name] for name in PYTREE_SPECS if name in module.__dict__}


@dataclass
class Captured:
    """A captured model: the graph module of each mode captured (``True``: train mode).

    Where both modes were captured and gave the same graph, both keys hold one graph module.
    """

    how: str  # "symbolic" | "export"
    graphs: dict[bool, torch.fx.GraphModule]
    dynamic: bool = False  # export: captured with dynamic shapes

    @property
    def train(self) -> torch.fx.GraphModule:
        """The train-mode graph (the only one captured, when a single mode was asked for)."""
        return self.graphs.get(True) or next(iter(self.graphs.values()))

    @property
    def eval(self) -> torch.fx.GraphModule | None:
        """The eval-mode graph when it differs from the train-mode one, else None."""
        graph = self.graphs.get(False)
        return None if graph is None or graph is self.graphs.get(True) else graph

    def distinct(self) -> list[torch.fx.GraphModule]:
        """Each different graph once, the train-mode one first."""
        found: list[torch.fx.GraphModule] = []
        for mode in (True, False):
            graph = self.graphs.get(mode)
            if graph is not None and all(graph is not other for other in found):
                found.append(graph)
        return found


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``example_inputs`` as ``(args, kwargs)``: a tensor or tuple is positional, a mapping is
    keyword arguments (``model(**batch)``), a pair ``(tuple, dict)`` is both; None stays None."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, tuple) and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], Mapping)
    ):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def capture(
    model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]] | None, how: str = "auto", *,
    modes: tuple[bool, ...] = (True, False),
) -> Captured:
    """Captures ``model`` (which it may put in train/eval mode, nothing else) as a graph per mode.

    Args:
        model: the module to capture.
        inputs: ``(args, kwargs)`` the model is called with (:func:`split_inputs`); needed by
            ``"export"``, optional for ``"symbolic"`` (only their number is used).
        how: ``"symbolic"``, ``"export"``, or ``"auto"``: symbolic tracing, and torch.export
            when that fails and inputs were given.
        modes: the modes to capture in (``True``: train mode); ``(False,)`` when only the
            eval graph is read (inference FLOPs), which saves the second capture.

    Raises:
        TypeError: the model cannot be captured; the message says why and what to try.
        ValueError: ``how`` is unknown, or ``"export"`` without inputs.

    Warns when the model drew from numpy's or Python's generator while it was captured: the
    graph holds that draw as a constant (:mod:`fxsparse.draws`).
    """
    with OutsideDraws() as draws:
        captured = _capture(model, inputs, how, modes)
    warn_frozen(draws.sites, type(model).__name__, captured.how)
    return captured


def _capture(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]] | None, how: str,
             modes: tuple[bool, ...]) -> Captured:
    if how not in CAPTURES:
        raise ValueError(f"expected capture= to be one of {CAPTURES}, got {how!r}")
    if how == "export" and inputs is None:
        raise ValueError(
            "expected example_inputs with capture='export': torch.export runs the model once; pass "
            "what you call it with, e.g. example_inputs={'input_ids': ids, 'labels': ids}"
        )
    if how in ("symbolic", "auto"):
        # the inputs given (positional ones by number, keyword ones by name) are traced as
        # placeholders; a forward argument with a default that is not given is fixed at it
        n_inputs = 1 if inputs is None else len(inputs[0])
        keywords = () if inputs is None else tuple(inputs[1])
        try:
            if how == "auto" and keywords:  # a model called with keywords (transformers'): torch.export
                raise TypeError(f"keyword inputs {sorted(keywords)}: 'auto' captures them with torch.export "
                                "(capture='symbolic' traces them symbolically)")
            return _symbolic(model, n_inputs, modes, keywords)
        except TypeError as e:
            if how == "symbolic":
                raise
            if inputs is None:
                raise TypeError(
                    f"{e}\nOr pass example_inputs (what the model is called with) and fxsparse "
                    f"captures it with torch.export instead (capture='export')."
                ) from e
            symbolic_error = e
    try:
        return _export(model, *inputs, modes=modes)  # type: ignore[misc]
    except TypeError as e:
        if how == "auto":
            raise TypeError(f"{e}\n(symbolic tracing failed before: {symbolic_error})") from e
        raise


def _dynamic_spec(value: Any) -> Any:
    """The dims captured as dynamic (``Dim.AUTO``: export keeps them symbolic where the model
    allows): the batch dim of every tensor and the sequence dim of integer and bool tensors
    (token ids, attention masks). A floating input's other dims (image height and width, audio
    length) stay static: symbolic image sizes send export's shape reasoning through every
    window partition of a Swin-like model, minutes per capture."""
    from torch.export import Dim

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return None
        dynamic = 1 if x.is_floating_point() or x.is_complex() else 2
        return {i: Dim.AUTO for i in range(min(dynamic, x.dim()))}

    return torch.utils._pytree.tree_map(spec, value)


def _widened(value: Any) -> Any:
    """``value`` with every dim :func:`_dynamic_spec` makes dynamic that has size 1 doubled
    (the tensor concatenated with itself along it): torch.export specializes a dim whose example
    size is 1 (its "0/1 specialization"), so an example of batch 1 would capture a module that
    runs batch 1 only."""

    def widen(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        for dim in range(min(1 if x.is_floating_point() or x.is_complex() else 2, x.dim())):
            if x.shape[dim] == 1:
                x = torch.cat([x, x], dim=dim)
        return x

    return torch.utils._pytree.tree_map(widen, value)


def _export_dynamic(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch.export with the batch and sequence dims dynamic (:func:`_dynamic_spec`), from the
    example widened where those dims have size 1 (:func:`_widened`), else from the example."""
    attempts = [(_widened(args), _widened(kwargs))]
    if any(a is not b for a, b in zip(torch.utils._pytree.tree_leaves(attempts[0]),
                                      torch.utils._pytree.tree_leaves((args, kwargs)))):
        attempts.append((args, kwargs))  # a model that needs a size of 1 where it was given one
    for i, (a, k) in enumerate(attempts):
        spec = (_dynamic_spec(a), _dynamic_spec(k))
        try:
            return torch.export.export(model, a, k, dynamic_shapes={**_named(model, spec[0]), **spec[1]}, strict=False)
        except Exception:
            if i == len(attempts) - 1:
                raise
    raise AssertionError("unreachable")


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], modes: tuple[bool, ...]) -> Captured:
    was_training = model.training
    graphs: dict[bool, torch.fx.GraphModule] = {}
    dynamic = True
    try:
        for mode in modes:
            model.train(mode)
            program = None
            if dynamic:
                try:
                    program = _export_dynamic(model, args, kwargs)
                except Exception as e:  # some models only export at the example's exact shapes
                    dynamic = False
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    program = torch.export.export(model, args, kwargs, strict=False)
                    warnings.warn(
                        f"fxsparse: torch.export could not capture {type(model).__name__} with dynamic "
                        f"shapes ({why}); captured at the example inputs' shapes: other shapes will "
                        f"be refused",
                        stacklevel=3,
                    )
            if program is None:
                program = torch.export.export(model, args, kwargs, strict=False)
            graphs[mode] = _for_training(program.module())
            _note_fixed_dims(program, graphs[mode])
    except Exception as e:
        mode = "train" if model.training else "eval"
        raise TypeError(
            f"expected a model torch.export can capture with the example inputs given, but "
            f"exporting {type(model).__name__} in {mode} mode failed: {_export_error(e)} Fix: check "
            f"that model(*args, **kwargs) runs with those inputs; a model with data-dependent control "
            f"flow needs torch.export's remedies (torch.cond, torch._check), see "
            f"https://pytorch.org/docs/stable/export.html (the full error is chained below)"
        ) from e
    finally:
        model.train(was_training)
    gc.collect()  # the exported programs and their fake modes, with their weak references
    return Captured("export", graphs, dynamic)


def _symbolic(model: nn.Module, n_inputs: int, modes: tuple[bool, ...], keywords: tuple[str, ...] = ()) -> Captured:
    """Traces ``model`` in each of ``modes``; a mode whose graph equals an earlier one's shares it.

    Both traces run on ``model`` itself, the train-mode one first: a model that caches values in
    an eval forward (levit's attention biases) clears that cache when set to train mode, so the
    eval trace records the computation, not a stale constant; and the constants each trace adds
    to the root get names of their own (``_tensor_constant<i>``).
    """
    was_training = model.training
    graphs: dict[bool, torch.fx.GraphModule] = {}
    try:
        for mode in modes:
            model.train(mode)
            try:
                gm = trace(model, n_inputs, keywords)
            except TypeError as e:
                if len(modes) == 1:
                    raise
                raise TypeError(
                    f"{e}\n(tracing in {'train' if mode else 'eval'} mode; fxsparse traces both modes, "
                    f"since a trace fixes what depends on self.training)"
                ) from e.__cause__
            graphs[mode] = next((other for other in graphs.values() if same_graph(other, gm)), gm)
    finally:
        model.train(was_training)
    return Captured("symbolic", graphs)


def same_graph(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """Whether two graph modules of one model compute the same thing: the same nodes, in order,
    with the same ops, arguments and attributes (an attribute read under two names counts as the
    same when it is one object, or equal tensors: the constants each trace names anew)."""
    nodes_a, nodes_b = list(a.graph.nodes), list(b.graph.nodes)
    if len(nodes_a) != len(nodes_b):
        return False
    index = {node: i for i, node in enumerate(nodes_a)}
    index.update({node: i for i, node in enumerate(nodes_b)})

    def normal(value: Any) -> Any:
        return torch.fx.node.map_aggregate(value, lambda v: ("node", index[v]) if isinstance(v, torch.fx.Node) else v)

    for x, y in zip(nodes_a, nodes_b):
        if x.op != y.op:
            return False
        if x.op == "get_attr" and x.target != y.target:
            if not _same_value(resolve(a, str(x.target)), resolve(b, str(y.target))):
                return False
        elif x.target != y.target:
            return False
        try:
            if normal(x.args) != normal(y.args) or normal(x.kwargs) != normal(y.kwargs):
                return False
        except Exception:  # noqa: BLE001 - values that do not compare (tensors): not provably the same
            return False
    return True


def resolve(module: nn.Module, target: str) -> Any:
    """The attribute or submodule at the dotted path ``target`` of ``module`` (what a
    ``get_attr`` / ``call_module`` node of ``target`` reads), or None when there is none."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _same_value(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return (
            x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            and type(x) is type(y) and bool(torch.equal(x, y))
        )
    return False


def _export_error(e: BaseException) -> str:
    """torch.export's error in a few lines: its first line, the model's line that raised it, and
    what to do when it is a branch on a tensor's value."""
    text = str(e).strip()
    lines = [f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip()]
    marker = "The following call raised this error:"
    if marker in text:
        call = [line.strip() for line in text.split(marker, 1)[1].strip().splitlines()[:2]]
        lines.append(f"raised at {' : '.join(call)}")
    if "data-dependent" in text or "DataDependent" in type(e).__name__:
        lines.append(
            "That is Python control flow on a tensor's value (a branch on the data, or on "
            "torch.rand(...) such as LayerDrop's random layer skipping in train mode), which no "
            "graph can record: turn it off for training (transformers: config.layerdrop, "
            "encoder_layerdrop, decoder_layerdrop = 0) or express it with torch.cond."
        )
    if "not a known type" in text and "Cache" in text:
        lines.append(
            "That is a key/value cache in the outputs (transformers' use_cache, on by default for "
            "generation), which training does not use: set model.config.use_cache = False before "
            "sparsify, or pass use_cache=False to the model's constructor"
        )
    return ". ".join(line.rstrip(".") for line in lines) + "."


def _for_training(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The exported graph module made fit to train, copy and pickle, in place: the dtype/device
    assertions torch.export records (``aten._assert_tensor_metadata``) dropped, since the graph
    is trained eagerly, under autocast (bf16 activations where capture saw float32) and after
    ``.to(dtype)``, where they would refuse what eager PyTorch computes; its input guard module
    dropped (unpicklable); the fake-tensor metadata of the capture dropped (weak references);
    ``no_grad`` / ``enable_grad`` / ``autocast`` blocks inlined (:func:`inline_wrappers`)."""
    inline_wrappers(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
        elif node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            # torch.export's input-shape guard: a module of local functions, which pickling
            # refuses; a wrong shape still fails, in the op that cannot take it
            gm.graph.erase_node(node)
        else:
            # the fake tensors of the capture: through their fake mode they keep weak references
            # to the real parameters, which torch.utils.swap_tensors refuses to swap
            for key in ("val", "example_value", "tensor_meta", "unbacked_bindings"):
                node.meta.pop(key, None)
    if hasattr(gm, "_guards_fn") and not any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes):
        gm.delete_submodule("_guards_fn")
    gm.recompile()
    return gm


def _wrapper_ops() -> dict[Any, tuple[int, Any, Any]]:
    """Higher-order ops that only run their subgraph under a mode: op -> (index of the subgraph
    argument, enter(graph, mode args) -> token, exit(graph, token))."""
    ops: dict[Any, tuple[int, Any, Any]] = {}
    hop = torch.ops.higher_order

    def enter_grad(graph: torch.fx.Graph, mode: tuple[Any, ...]) -> Any:
        previous = graph.call_function(torch.is_grad_enabled)
        graph.call_function(torch._C._set_grad_enabled, (mode[0],))
        return previous

    def exit_grad(graph: torch.fx.Graph, previous: Any) -> None:
        graph.call_function(torch._C._set_grad_enabled, (previous,))

    def enter_autocast(graph: torch.fx.Graph, mode: tuple[Any, ...]) -> Any:
        return graph.call_function(torch.amp.autocast_mode._enter_autocast, mode)

    def exit_autocast(graph: torch.fx.Graph, token: Any) -> None:
        graph.call_function(torch.amp.autocast_mode._exit_autocast, (token,))

    if hasattr(hop, "wrap_with_set_grad_enabled"):
        ops[hop.wrap_with_set_grad_enabled] = (1, enter_grad, exit_grad)
    if hasattr(hop, "wrap_with_autocast"):
        ops[hop.wrap_with_autocast] = (4, enter_autocast, exit_autocast)
    return ops


def inline_wrappers(gm: torch.fx.GraphModule) -> int:
    """Inlines, in place, the subgraphs torch.export wraps ``torch.no_grad()``,
    ``torch.enable_grad()`` and ``torch.autocast(...)`` blocks in (higher-order ops
    ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast``), nested ones too: their ops are put in
    the graph between the calls that set and restore the mode, as symbolic tracing records
    them. Weights read inside such a block are then ordinary reads for every pass (found,
    masked, counted). Returns the number of blocks inlined."""
    ops = _wrapper_ops()
    inlined = 0
    while True:
        node = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops), None)
        if node is None or not _inline(gm, node, *ops[node.target]):
            break
        inlined += 1
    if inlined:
        used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for name, child in list(gm.named_children()):
            if isinstance(child, torch.fx.GraphModule) and name not in used:
                gm.delete_submodule(name)
        gm.graph.lint()
        gm.recompile()
    return inlined


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, at: int, enter: Any, exit_: Any) -> bool:
    import operator

    holder = node.args[at]
    body = getattr(gm, str(holder.target), None) if isinstance(holder, torch.fx.Node) else None
    if not isinstance(body, torch.fx.GraphModule) or node.kwargs:
        return False
    if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
        return False
    operands = list(node.args[at + 1:])
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        return False
    graph = gm.graph
    env: dict[torch.fx.Node, Any] = dict(zip(placeholders, operands))
    outputs: Any = ()
    with graph.inserting_before(node):
        token = enter(graph, tuple(node.args[:at]))
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                outputs = torch.fx.map_arg(inner.args[0], lambda n: env[n])
                continue
            if inner.op == "get_attr":  # a nested block's subgraph or a constant: moved up
                value = operator.attrgetter(str(inner.target))(body)
                name = _free_name(gm, f"{holder.target}_{inner.target}")
                if isinstance(value, nn.Module):
                    gm.add_module(name, value)
                else:
                    setattr(gm, name, value)
                env[inner] = graph.get_attr(name)
                continue
            env[inner] = graph.node_copy(inner, lambda n: env[n])
        exit_(graph, token)
    results = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for user in list(node.users):
        user.replace_all_uses_with(results[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == holder.target for n in graph.nodes if n is not holder) \
            and not holder.users:
        graph.erase_node(holder)
    return True


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base.replace(".", "_"), 0
    while hasattr(gm, name):
        i += 1
        name = f"{base.replace('.', '_')}_{i}"
    return name


def _named(model: nn.Module, positional: tuple[Any, ...]) -> dict[str, Any]:
    """Positional dynamic-shape specs by the names of ``forward``'s parameters (torch.export
    takes one mapping for args and kwargs together)."""
    import inspect

    if not positional:
        return {}
    params = [
        p.name for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < len(positional):  # *args: export takes a tuple in order then
        raise TypeError("positional inputs beyond forward's named parameters")
    return dict(zip(params, positional, strict=False))


def _mutable(value: Any) -> Any:
    """``value`` with every list and dict a fresh mutable one (tuples rebuilt around them)."""
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class Runner(torch.fx.Interpreter):
    """Runs a graph node by node the way its generated code runs it.

    ``torch.fx.Interpreter`` hands a node's list and dict arguments over as the graph's own
    ``immutable_list`` / ``immutable_dict``, where the module's code builds fresh literals: a
    wrapped function that mutates an argument it receives (torchvision's
    ``shifted_window_attention_3d`` pads its ``window_size`` list in place) runs in the module but
    raises ``TypeError: 'immutable_list' object does not support mutation`` under a plain
    interpreter. This one passes mutable copies, so whatever watches or counts the run sees the
    calls the module makes.
    """

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)


def graph_inputs(gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``.

    A symbolically traced graph takes its inputs as they are; an exported graph (pytree
    codegen) takes the leaves of ``(args, kwargs)`` with the keywords in the order it was
    captured with (torch.fx.Interpreter runs placeholders positionally).
    """
    spec = getattr(gm, "_in_spec", None)
    if spec is None or not isinstance(gm.graph._codegen, torch.fx.graph._PyTreeCodeGen):
        if kwargs:  # by name; a placeholder between them that was not given takes its default
            rest = [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]
            last = max((i for i, n in enumerate(rest) if n.target in kwargs), default=-1)
            unknown = set(kwargs) - {n.target for n in rest}
            if unknown:
                raise TypeError(f"forward() got unexpected keyword argument(s) {sorted(unknown)}; it takes "
                                f"{[n.target for n in rest]} after {len(args)} positional")
            values = []
            for node in rest[:last + 1]:
                if node.target not in kwargs and not node.args:
                    raise TypeError(f"forward() missing required argument {node.target!r}")
                values.append(kwargs[node.target] if node.target in kwargs else node.args[0])
            return (*args, *values)
        return tuple(args)
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    keys = children[1].context if len(children) > 1 else []
    missing = [k for k in keys if k not in kwargs]
    if missing or set(kwargs) - set(keys):
        raise ValueError(
            f"expected keyword inputs {list(keys)} (those the model was captured with), got {sorted(kwargs)}"
        )
    return tuple(torch.utils._pytree.tree_leaves((tuple(args), {k: kwargs[k] for k in keys})))


def _note_fixed_dims(program: Any, gm: torch.fx.GraphModule) -> None:
    """Writes ``node.meta["fxsparse.input_shape"]`` (the example's shape with None at the dims
    torch.export kept dynamic, which are symbolic in its placeholders) on each input placeholder
    of the module ``program.module()`` made, from the program's own placeholders."""
    users = set(program.graph_signature.user_inputs)
    source = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in users]
    target = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(source) != len(target):
        return
    ranges = getattr(program, "range_constraints", {}) or {}

    def fixed(size: Any) -> int | None:
        if isinstance(size, int):
            return int(size)
        # a symbolic size that is a constant, or that the model's code pinned: a one-value range
        expr = getattr(getattr(size, "node", None), "expr", None)
        if getattr(expr, "is_number", False):
            return int(expr)
        bounds = ranges.get(expr)
        lower, upper = getattr(bounds, "lower", None), getattr(bounds, "upper", None)
        return int(lower) if lower is not None and lower == upper else None

    for src, dst in zip(source, target):
        shape = getattr(src.meta.get("val"), "shape", None)
        if shape is not None:
            dst.meta["fxsparse.input_shape"] = tuple(fixed(s) for s in shape)


def static_dims(graph: torch.fx.Graph) -> list[tuple[str, tuple[int | None, ...] | None]]:
    """Per placeholder of an exported graph, in order: its name and the example's shape with
    None at dynamic dims (:func:`_note_fixed_dims`), or None where not known."""
    return [(str(n.target), n.meta.get("fxsparse.input_shape")) for n in graph.nodes if n.op == "placeholder"]


def check_shapes(gm: torch.fx.GraphModule, expected: list[tuple[str, tuple[int | None, ...] | None]],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raises a ValueError naming the input, the dim and the example's shape where a call's
    tensor has another size in a dim the exported graph fixed (before the graph runs, where the
    error would come from deep inside the model's code)."""
    values = graph_inputs(gm, args, kwargs)
    for (name, shape), value in zip(expected, values):
        if shape is None or not isinstance(value, torch.Tensor) or all(s is None for s in shape):
            continue
        wrong = value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape))
        if wrong:
            example = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            dims = [d for d, (s, v) in enumerate(zip(shape, value.shape)) if s is not None and s != v]
            raise ValueError(
                f"fxsparse: input {name!r} has shape {tuple(value.shape)}, but the sparse module was captured by "
                f"torch.export from an example of shape {example} (* marks the dims it keeps dynamic): "
                + (f"dim {dims[0]} cannot change" if dims else f"it takes {len(shape)} dims")
                + ". Sparsify from an example of the shape you train with (a batch of 1 is widened to keep the batch "
                "dynamic; dims other than batch and sequence are fixed)"
            )


# --- pickling an exported graph ------------------------------------------------------------------
# ATen op overloads do not pickle; a graph is stored as its nodes with the ops by name.


def _encode(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return ("__node__", value.name)
    if isinstance(value, torch._ops.OpOverload):
        return ("__op__", value.namespace, value._schema.name.split("::")[-1], value._overloadname)
    if isinstance(value, torch._ops.OpOverloadPacket):
        return ("__packet__", value._qualified_op_name)
    if isinstance(value, tuple):
        return ("__tuple__", [_encode(v) for v in value])
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, slice):
        return ("__slice__", _encode(value.start), _encode(value.stop), _encode(value.step))
    return value


def _decode(value: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if isinstance(value, tuple) and value and isinstance(value[0], str) and value[0].startswith("__"):
        kind = value[0]
        if kind == "__node__":
            return nodes[value[1]]
        if kind == "__op__":
            return getattr(getattr(getattr(torch.ops, value[1]), value[2]), value[3])
        if kind == "__packet__":
            namespace, name = value[1].split("::")
            return getattr(getattr(torch.ops, namespace), name)
        if kind == "__tuple__":
            return tuple(_decode(v, nodes) for v in value[1])
        if kind == "__slice__":
            return slice(*(_decode(v, nodes) for v in value[1:]))
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v, nodes) for k, v in value.items()}
    return value


def graph_state(graph: torch.fx.Graph) -> dict[str, Any]:
    """A picklable description of ``graph``: its nodes (ops by name) and its codegen (the pytree
    specs of an exported graph)."""
    nodes = [
        (n.op, n.name, _encode(n.target) if n.op == "call_function" else n.target, _encode(n.args), _encode(n.kwargs),
         {k: v for k, v in n.meta.items() if k in ("fxsparse.weight", "fxsparse.masked", "fxsparse.input_shape", "nn_module_stack", "stack_trace")})
        for n in graph.nodes
    ]
    return {"nodes": nodes, "codegen": graph._codegen}


def graph_from_state(state: dict[str, Any]) -> torch.fx.Graph:
    """The graph :func:`graph_state` described."""
    graph = torch.fx.Graph()
    made: dict[str, torch.fx.Node] = {}
    for op, name, target, args, kwargs, meta in state["nodes"]:
        target = _decode(target, made) if op == "call_function" else target
        node = graph.create_node(op, target, _decode(args, made), _decode(kwargs, made), name=name)
        node.meta.update(meta)
        made[name] = node
    graph._codegen = state["codegen"]
    graph.lint()
    return graph
