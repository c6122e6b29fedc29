"""``sparsify``: copy, trace, find the weights, size the budgets, mask, wrap.

``sparsify`` checks its arguments (``_validate_arguments``) and then runs one small function
per step of docs/architecture.md, "Data flow of sparsify": ``_copy``, ``_capture``, ``_find``
(``find_weights_in``, ``_unread_layer_weights``, ``exclude=``), ``_budget``, ``functionalize``,
``_build`` (the ``SparseGraphModule``) and ``_masks_and_state`` (the masks), ``_mask``
(``mask_weights`` on each mode's graph, ``_mode_graphs``) and ``_attach`` (recompile, state,
mode). A failure after the budgets is reported as a RuntimeError naming the model.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fxsparse import budgets
from fxsparse.accounting import layer_flops
from fxsparse.capture import Captured, capture as capture_graph, pytree_specs, split_inputs
from fxsparse.graph_module import MASKER, UPDATES, SparseGraphModule, _Site, _State, derived_seed
from fxsparse.layouts import apply_layout, check_layout
from fxsparse.masking import Masker, mask_on, zero_inactive_
from fxsparse.passes.find_weights import LAYERS, canonical_names, find_weights_in
from fxsparse.passes.functionalize import functionalize
from fxsparse.passes.mask_weights import mask_weights
from fxsparse.kernels import GRAPH, site_groups, swap_layers
from fxsparse.recapture import adopt_and_mask, read_by, signature_of
from fxsparse.blocks import restore_containers
from fxsparse.unwrap import skeleton_of

__all__ = ["sparsify"]


def sparsify(
    model: nn.Module, density: float | None, init: str | Mapping[str, float] = "erk", *,
    example_inputs: Any = None, seed: int = 0, dense: Iterable[str] | None = None, exclude: Iterable[str] = (),
    budget: str = "params", capture: str = "auto", embeddings: bool = False, layout: str | Mapping[str, str] = "masked",
    inplace: bool = False) -> SparseGraphModule:
    """Returns a sparse copy of ``model``: every conv/linear/matmul weight read through a mask.

    The model is traced with torch.fx (timm's no-trace registries honoured); every parameter that
    is the weight operand of a convolution, linear layer or matrix product in the graph, whatever
    module owns it, gets one bool mask with an exact number of active weights, drawn at random
    from ``seed``. Inactive weights are set to zero. ``model`` itself is never modified (unless ``inplace``).

    Args:
        model: any module torch.fx can trace (see :func:`fxsparse.register_leaf_module`).
        density: fraction of the sparsified weights kept active, in (0, 1] (None: ``"zeros"``).
        init: layer-wise distribution: ``"uniform"``, ``"er"``, ``"erk"`` (or any registered
            with :func:`fxsparse.budgets.register_init`), an explicit ``{fqn: density}`` (layers it does
            not name get ``density``; the total is kept, layers filled beyond 1 made dense), ``{fqn: mask}``
            (density None: a saved topology) or ``"zeros"`` (a pruned checkpoint's, docs/api.md).
        example_inputs: optional inputs the model is called with: a tensor or a tuple
            (positional), a dict (keyword: ``model(**batch)``), or ``(args_tuple, kwargs_dict)``.
            They tell the tracer how many positional inputs ``forward`` takes, give the shapes
            for FLOP accounting (``budget="flops"``, the FLOP columns of ``summary()``), and are
            what torch.export runs the model on (``capture="export"``).
        seed: seed of the initial random masks (and of random growth); same seed, same masks.
        dense: FQN patterns (``fnmatch``) of weights kept at density 1, out of the budget. ``None``:
            the papers' default (the first layer dense for ``"uniform"``, none for the others).
        exclude: FQN patterns of weights not sparsified at all (neither masked nor counted).
        budget: what ``density`` is a fraction of. ``"params"``: the active weights are
            ``density`` times the sparsified weights. ``"flops"``: the layer densities (same
            distribution shape, same dense-overflow rule) are solved so that the sparsified
            layers' inference FLOPs are ``density`` times their dense FLOPs, within one
            weight's FLOPs per layer; needs ``example_inputs``.
        capture: how the model becomes a graph (:mod:`fxsparse.capture`). ``"symbolic"``:
            torch.fx symbolic tracing. ``"export"``: ``torch.export`` on ``example_inputs``
            (ATen-level graph, dynamic shapes where the model allows; captured in train and in
            eval mode, the module runs the graph of its mode), for models with Python control
            flow tracing cannot follow, such as ``transformers``' models. ``"auto"`` (default):
            symbolic, and export when tracing fails and ``example_inputs`` were given.
        embeddings: sparsify a product weight that an embedding lookup reads too (a tied LM
            head), one mask for both; by default such weights stay dense (in ``skipped``).
        layout: ``"masked"`` (default): dense weights with bool masks. ``"compact"``: the weights
            of linear layers and of ``x @ W`` held as their active values, computed by sparse
            kernels, where a timed step on ``example_inputs`` (else density <= 0.2) finds that
            faster; a ``{fqn pattern: layout}`` dict decides per layer (:mod:`fxsparse.layouts`).
        inplace: build on ``model``'s own tensors and modules, not a copy (a model too big to
            copy): ``model`` is then unusable alone (``sparse.unwrap()``), half changed after an error.

    Returns:
        A :class:`SparseGraphModule` (a ``torch.fx.GraphModule``).

    Raises:
        TypeError / ValueError: ``model`` cannot be traced; bad arguments; no sparsifiable weight.

    Example:
        >>> import torch, fxsparse
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> sparse = fxsparse.sparsify(net, density=0.25, init="erk")
        >>> round(sparse.density, 2)
        0.25
    """
    density, dense_patterns, exclude_patterns, inputs = _validate_arguments(
        model, density, init, seed, dense, exclude, budget, example_inputs, embeddings, layout
    )
    work = _copy(model, inplace)  # 1. copy, or the model itself in place
    captured, graphs = _capture(work, inputs, capture)  # 2. capture
    names = canonical_names(work)
    kept, skipped = _find(model, work, graphs, names, inputs, embeddings, exclude_patterns)  # 3. find weights
    densities, counts = _budget(work, kept, graphs, inputs, density, init, dense_patterns, budget)  # 4. budgets
    try:
        for graph in graphs:
            functionalize(graph, {s.fqn for s in kept})  # 5. functionalize
        sparse = _build(model, work, captured, graphs[0])  # 6. the SparseGraphModule, its masks
        state = _masks_and_state(sparse, kept, skipped, densities, counts, seed, init, inputs, captured.how)
        _mask(sparse, state, captured, work, names, several=len(graphs) > 1)  # 7. mask
        _attach(sparse, state, model)  # 8. attach state
    except Exception as e:
        raise RuntimeError(f"fxsparse failed while rewriting {type(model).__name__}: {e}") from e
    apply_layout(sparse, layout, inputs)  # 9. layout: compact layers where they are faster
    return sparse


def _validate_arguments(
    model: Any, density: Any, init: Any, seed: Any, dense: Iterable[str] | None, exclude: Iterable[str],
    budget: Any, example_inputs: Any, embeddings: Any, layout: Any = "masked",
) -> tuple[float, list[str] | None, list[str], tuple[tuple[Any, ...], dict[str, Any]] | None]:
    """Checks ``sparsify``'s arguments before any work: ``(density, dense patterns or None,
    exclude patterns, (args, kwargs) of the example inputs or None)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module to sparsify, got {type(model).__name__}")
    if _given_masks(init) is not None:
        if density is not None or budget != "params":
            raise ValueError(
                f"init={{fqn: mask}} takes each layer's mask and budget from the masks given (a saved run's "
                f"topology, fxsparse.load_masks), so density must be None and budget 'params', got density={density!r}, "
                f"budget={budget!r}"
            )
    elif init == "zeros":
        if density is not None:
            raise ValueError(
                f"init='zeros' takes each layer's mask and budget from the zeros of its weights (a pruned "
                f"checkpoint), so density must be None, got {density!r}; for a target density use init='erk'"
            )
        if budget != "params":
            raise ValueError(f"init='zeros' takes the checkpoint's counts: budget must be 'params', got {budget!r}")
    else:
        density = budgets.validate_density(density)
    if isinstance(init, str):
        if init not in budgets.available_inits() and init != "zeros":
            raise ValueError(
                f"expected init to be one of {budgets.available_inits()} or a {{fqn: density}} "
                f"dict (or 'zeros' with density=None: a pruned checkpoint's topology), got {init!r}"
            )
    elif not isinstance(init, Mapping):
        raise TypeError(f"expected init to be a scheme name or a {{fqn: density}} dict, got {type(init).__name__}")
    check_layout(layout)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"expected seed to be an int, got {type(seed).__name__} {seed!r}")
    dense_patterns = None if dense is None else _patterns(dense, "dense")
    exclude_patterns = _patterns(exclude, "exclude")
    if budget not in ("params", "flops"):
        raise ValueError(f"expected budget to be 'params' or 'flops', got {budget!r}")
    if budget == "flops" and example_inputs is None:
        raise ValueError(
            "expected example_inputs with budget='flops': FLOPs depend on the input size; pass "
            "e.g. example_inputs=torch.randn(1, 3, 32, 32)"
        )
    inputs = split_inputs(example_inputs)
    if not isinstance(embeddings, bool):
        raise TypeError(f"expected embeddings to be a bool, got {type(embeddings).__name__} {embeddings!r}")
    return density, dense_patterns, exclude_patterns, inputs


def _copy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Step 1: the copy every later step works on (:func:`copy_model`); ``model`` is never
    touched. ``inplace``: ``model`` itself. A model that already carries fxsparse's attributes
    is refused."""
    if not isinstance(inplace, bool):
        raise TypeError(f"expected inplace to be a bool, got {type(inplace).__name__} {inplace!r}")
    try:
        work = model if inplace else copy_model(model)
    except Exception as e:
        raise TypeError(
            f"expected a model that copy.deepcopy can copy (sparsify never edits yours), but "
            f"copying {type(model).__name__} failed: {e}"
        ) from e
    if hasattr(work, MASKER) or hasattr(work, UPDATES):
        raise ValueError(
            f"expected a model without attributes {MASKER!r}/{UPDATES!r}; it looks already "
            f"sparsified: pass the original dense model"
        )
    return work


def _capture(
    work: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]] | None, how: str,
) -> tuple[Captured, list[torch.fx.GraphModule]]:
    """Step 2: ``work`` as graphs (:func:`fxsparse.capture.capture`, ``capture=``), and its
    distinct graphs: the train-mode graph first; the eval-mode one where it differs."""
    captured = capture_graph(work, inputs, how)
    return captured, captured.distinct()


def _find(
    model: nn.Module, work: nn.Module, graphs: list[torch.fx.GraphModule], names: dict[str, str],
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None, embeddings: bool, exclude_patterns: list[str],
) -> tuple[list[Any], list[tuple[str, str]]]:
    """Step 3: ``(kept, skipped)``, the weight sites to sparsify, in the original's parameter
    order, and ``(fqn, reason)`` of every conv/linear/matmul weight left dense: what
    :func:`find_weights_in` leaves, the layers' weights no graph reads as a product
    (:func:`_unread_layer_weights`) and those ``exclude=`` names."""
    sites, skipped = find_weights_in(graphs, names, embeddings=embeddings, inputs=inputs)
    skipped += _unread_layer_weights(work, graphs, names, sites, skipped)
    kept = [s for s in sites if not _match(s.fqn, exclude_patterns)]
    skipped += [(s.fqn, "excluded by exclude=") for s in sites if _match(s.fqn, exclude_patterns)]
    if not kept:
        raise ValueError(
            f"expected at least one convolution, linear or matmul weight to sparsify in "
            f"{type(model).__name__}, found none"
            + (f" (left dense: {dict(skipped)})" if skipped else "")
            + "; sparsify a model with such layers, or loosen exclude="
        )
    # the original's parameter order, so that masks list layers as named_parameters() does
    position = {name: i for i, (name, _) in enumerate(work.named_parameters())}
    kept.sort(key=lambda s: position.get(s.fqn, len(position)))
    _check_patterns_match(exclude_patterns, [s.fqn for s in sites], "exclude")
    return kept, skipped


def _budget(
    work: nn.Module, kept: list[Any], graphs: list[torch.fx.GraphModule],
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None, density: float | None, init: str | Mapping[str, float],
    dense_patterns: list[str] | None, budget: str,
) -> tuple[dict[str, float], dict[str, int]]:
    """Step 4: ``(densities, counts)`` by weight FQN: the layers ``dense=`` names (or the
    scheme's default) kept dense, ``budgets.layer_densities`` (with ``budget="flops"``, the
    eval-mode graph's inference FLOPs per layer) and exact ``budgets.active_counts``; for
    ``init="zeros"`` the checkpoint's own counts (:func:`_zeros_budget`)."""
    if init == "zeros":
        return _zeros_budget(work, kept, dense_patterns)
    given = _given_masks(init)
    if given is not None:
        return _masks_budget(given, kept, dense_patterns)
    assert density is not None
    shapes = {s.fqn: s.shape for s in kept}
    if dense_patterns is None:
        dense_names = budgets.default_dense(shapes, init)
    else:
        _check_patterns_match(dense_patterns, list(shapes), "dense")
        dense_names = [fqn for fqn in shapes if _match(fqn, dense_patterns)]
    costs = None
    if budget == "flops":
        per_layer = layer_flops(graphs[-1], inputs)  # inference FLOPs: the eval-mode graph
        costs = {fqn: float(per_layer.get(fqn, 0)) for fqn in shapes}
    densities = budgets.layer_densities(shapes, density, init, dense=dense_names, costs=costs)
    return densities, budgets.active_counts(shapes, densities)


def _zeros_budget(work: nn.Module, kept: list[Any], dense_patterns: list[str] | None) -> tuple[dict[str, float], dict[str, int]]:
    """Step 4 for ``init="zeros"``: each layer's count is its weight's nonzero entries (all of
    them for a layer ``dense=`` names). Raises ValueError for a layer without any."""
    if dense_patterns is not None:
        _check_patterns_match(dense_patterns, [s.fqn for s in kept], "dense")
    weights = dict(work.named_parameters(remove_duplicate=False))
    counts, empty = {}, []
    for s in kept:
        numel = math.prod(s.shape)
        counts[s.fqn] = numel if dense_patterns and _match(s.fqn, dense_patterns) else int(weights[s.fqn].count_nonzero())
        if counts[s.fqn] == 0:
            empty.append(s.fqn)
    if empty:
        raise ValueError(
            f"init='zeros' found no nonzero weight in {empty[:3]}{' ...' if len(empty) > 3 else ''}: a layer with nothing "
            "active cannot train; leave it out with exclude=[...] or keep it dense with dense=[...]"
        )
    return {s.fqn: counts[s.fqn] / math.prod(s.shape) for s in kept}, counts


def _given_masks(init: Any) -> dict[str, torch.Tensor] | None:
    """The masks of ``init={fqn: mask}`` (tensors), or None for any other ``init``."""
    if not isinstance(init, Mapping) or not init or not all(isinstance(v, torch.Tensor) for v in init.values()):
        if isinstance(init, Mapping) and any(isinstance(v, torch.Tensor) for v in init.values()):
            raise TypeError("expected init to map every FQN to a density (float) or every FQN to a mask (tensor), not both")
        return None
    return dict(init)


def _masks_budget(
    given: Mapping[str, torch.Tensor], kept: list[Any], dense_patterns: list[str] | None,
) -> tuple[dict[str, float], dict[str, int]]:
    """Step 4 for ``init={fqn: mask}``: each layer's count is its mask's True entries. Every
    sparsified layer needs a mask of its weight's shape with 0/1 values and at least one 1."""
    if dense_patterns is not None:
        raise ValueError("init={fqn: mask} gives every layer's topology: dense= does not apply; give an all-True mask instead")
    shapes = {s.fqn: tuple(s.shape) for s in kept}
    unknown = sorted(set(given) - set(shapes))
    lacking = [fqn for fqn in shapes if fqn not in given]
    if unknown or lacking:
        raise ValueError(
            "init={fqn: mask} must give a mask for each sparsified weight and no other: "
            + (f"no such sparsifiable weight {unknown[:5]}; " if unknown else "")
            + (f"no mask for {lacking[:5]}; " if lacking else "")
            + "pass the masks of a module sparsified from the same model (leave a weight out with exclude=[...])"
        )
    counts = {}
    for fqn, shape in shapes.items():
        mask = given[fqn]
        values_ok = mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())
        if tuple(mask.shape) != shape or not values_ok or not bool(mask.any()):
            raise ValueError(
                f"init={{fqn: mask}}: the mask of {fqn!r} must be a 0/1 tensor of its weight's shape {shape} with an "
                f"active entry, got shape {tuple(mask.shape)}, dtype {mask.dtype}, {int((mask != 0).sum())} active"
            )
        counts[fqn] = int((mask != 0).sum())
    return {fqn: counts[fqn] / math.prod(shapes[fqn]) for fqn in shapes}, counts


def _build(model: nn.Module, work: nn.Module, captured: Captured, gm: torch.fx.GraphModule) -> SparseGraphModule:
    """Step 6: the :class:`SparseGraphModule` of the (functionalized) train-mode graph ``gm``,
    holding every parameter and buffer of ``work`` in the original's order, with the ``Masker``
    submodule and the updates counter."""
    # export: the graph module holds what the graph reads beyond the model (constants)
    # and the pytree specs its code reads
    root = gm if captured.how == "export" else work
    sparse = SparseGraphModule(root, gm.graph, class_name=f"Sparse{type(model).__name__}")
    for name, spec in pytree_specs(gm).items():
        setattr(sparse, name, spec)
    _copy_unreferenced(work, sparse)
    _follow_module_order(work, sparse)
    if captured.how == "export":
        _fresh_tensors(sparse)
    sparse.add_module(MASKER, Masker())
    sparse.register_buffer(UPDATES, torch.zeros((), dtype=torch.int64))
    return sparse


def _masks_and_state(
    sparse: SparseGraphModule, kept: list[Any], skipped: list[tuple[str, str]], densities: Mapping[str, float],
    counts: Mapping[str, int], seed: int, init: str | Mapping[str, float],
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None, how: str,
) -> _State:
    """Step 6, continued: the ``_State`` of ``sparse`` (attached in step 8), with one random mask
    buffer per kept weight (:func:`_draw_mask`, :func:`_add_mask`) and its ``_Site``. The masks are
    drawn largest first (each from its own generator: the order changes no mask), so the large
    momentary index of the largest layer's draw comes before any mask is held."""
    given = _given_masks(init)
    state = _State(
        skipped=skipped, seed=seed, init=init if isinstance(init, str) else "masks" if given else "custom",
        input_spec=_input_spec(inputs), capture=how,
    )
    if how == "export" and inputs is not None:
        state.signature = signature_of(sparse, *inputs)  # what the graphs are specific to (fxsparse.recapture)
    drawn = {}
    for s in sorted(kept, key=lambda s: -math.prod(s.shape)):
        drawn[s.fqn] = _draw_mask(sparse.get_parameter(s.fqn), s.fqn, counts[s.fqn], seed, from_zeros=init == "zeros",
                                  given=None if given is None else given[s.fqn])
    for s in kept:
        mask_name = _add_mask(sparse, s.fqn, drawn.pop(s.fqn))
        state.sites[s.fqn] = _Site(mask_name, s.shape, densities[s.fqn], counts[s.fqn], bool(s.opaque),
                                   kernel=s.layer or (GRAPH if s.kernels else ""))
    return state


def _mask(
    sparse: SparseGraphModule, state: _State, captured: Captured, work: nn.Module, names: Mapping[str, str],
    *, several: bool,
) -> None:
    """Step 7: ``passes.mask_weights`` on the train-mode graph, and where the eval-mode graph
    differs (``several``), on that one too (:func:`_mode_graphs`); weights used inside an opaque
    leaf are masked by the module-level fallback (``hooked``), those read through a computed kernel
    on that kernel (``kernels``: in the graph, or in the layer of an opaque leaf that computes it,
    :func:`fxsparse.kernels.swap_layers`)."""
    masked, hooked, kernels = site_groups(state.sites)
    swap_layers(sparse, state.sites)
    mask_weights(sparse, read_by(sparse.graph, masked, names), names, MASKER, hooked=hooked, kernels=kernels)
    if several:
        state.mode_graphs = _mode_graphs(sparse, captured, work, masked, names, hooked, kernels)


def _attach(sparse: SparseGraphModule, state: _State, model: nn.Module) -> None:
    """Step 8: the code recompiled, the state attached with the model's skeleton (what
    ``unwrap()`` rebuilds the model from), the mode of the original model."""
    state.skeleton = skeleton_of(model, copy_model)
    sparse.recompile()
    sparse._set_state(state)
    restore_containers(sparse)
    sparse.train(model.training)


def _unread_layer_weights(
    model: nn.Module, graphs: list[torch.fx.GraphModule], names: Mapping[str, str], sites: list[Any],
    skipped: list[tuple[str, str]],
) -> list[tuple[str, str]]:
    """``(fqn, reason)`` of the conv/linear layers' weights that are neither sparsified nor
    already listed: a layer the forward never calls, or whose weight the graphs read only outside
    any product fxsparse recognizes. Every such weight is then masked or listed."""
    known = {s.fqn for s in sites} | {fqn for fqn, _ in skipped}
    nodes = [n for gm in graphs for n in gm.graph.nodes]
    read = {names.get(str(n.target)) for n in nodes if n.op == "get_attr"}
    # modules handed whole to a function the graph keeps whole (tracing reads a module argument
    # as a get_attr of its path): the function calls them out of the graph's sight
    modules = dict(model.named_modules())
    handed: dict[str, str] = {}
    for n in nodes:
        if n.op == "get_attr" and str(n.target) in modules:
            for user in n.users:
                if user.op == "call_function":
                    handed.setdefault(str(n.target), getattr(user.target, "__qualname__", str(user.target)))
    found = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        name = names.get(f"{path}.weight" if path else "weight")
        if isinstance(module, LAYERS) and isinstance(weight, nn.Parameter) and name and name not in known:
            known.add(name)
            owner = next((fn for p, fn in handed.items() if path == p or path.startswith(f"{p}.") or not p), None)
            if owner is not None:
                where = (f"whose module is passed whole into {owner}, a function the graph keeps whole: "
                         f"fxsparse cannot see how it is used, left dense; pass its weight instead of the module")
            elif name in read:
                where = "which the graph reads, but in no product fxsparse recognizes: left dense"
            else:
                where = "which the forward does not call (in train or in eval mode): nothing to sparsify, left as it is"
            found.append((name, f"the weight of {type(module).__name__} {path!r}, {where}"))
    return found


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, except that tensors an earlier forward left in plain attributes
    of its modules (a recurrent state, a cache: results of autograd, which deepcopy refuses) are
    copied detached. The copy never shares them with ``model``, which is left as it was.
    ``memo``: deepcopy's, prefilled with what given objects become (the skeleton's meta tensors)."""
    memo = {} if memo is None else memo
    for module in model.modules():
        for value in vars(module).values():
            _detached_copies(value, memo, depth=3)
    return copy.deepcopy(model, memo)


def _detached_copies(value: Any, memo: dict[int, Any], depth: int) -> None:
    if isinstance(value, torch.Tensor):
        if not value.is_leaf and id(value) not in memo:
            memo[id(value)] = value.detach().clone()
    elif depth and isinstance(value, (list, tuple)):
        for item in value:
            _detached_copies(item, memo, depth - 1)
    elif depth and isinstance(value, dict) and not isinstance(value, nn.Module):
        for item in value.values():
            _detached_copies(item, memo, depth - 1)


def _input_spec(inputs: tuple[tuple[Any, ...], dict[str, Any]] | None) -> Any:
    """Shapes and dtypes of the example inputs (not the data), to rebuild inputs for FLOPs:
    a tuple of items for positional inputs, ``(items, {name: item})`` with keyword inputs."""
    if inputs is None:
        return None

    def item(x: Any) -> tuple[Any, ...]:
        return ("tensor", tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", x)

    args, kwargs = inputs
    positional = tuple(item(x) for x in args)
    return (positional, {k: item(v) for k, v in kwargs.items()}) if kwargs else positional


def _mode_graphs(
    sparse: SparseGraphModule, captured: Captured, work: nn.Module, masked: Mapping[str, str],
    names: Mapping[str, str], hooked: Mapping[str, str], kernels: Mapping[str, str],
) -> dict[bool, torch.fx.Graph]:
    """The eval-mode graph masked like the train-mode one, reading ``sparse``'s attributes
    (:func:`fxsparse.recapture.adopt_and_mask`: a symbolic trace's own paths are installed at the
    same path where ``sparse`` lacks them, an exported graph's constants under new names)."""
    assert captured.eval is not None
    own = {name for name, _ in work.named_parameters(remove_duplicate=False)}
    own |= {name for name, _ in work.named_buffers(remove_duplicate=False)}
    eval_graph = adopt_and_mask(sparse, captured.eval, own, masked, names, hooked, kernels, prefix="fxsparse_eval_",
                                same_paths=captured.how == "symbolic")
    return {True: sparse.graph, False: eval_graph}


def _fresh_tensors(module: nn.Module) -> None:
    """Gives ``module`` new parameter and buffer objects (on the same storage: no copy of the
    model; ties kept).

    torch.export leaves weak references to the tensors it captured (its fake-tensor memo), and
    ``torch.utils.swap_tensors`` refuses tensors with weak references: the sparse module's own
    tensor objects must be free of them, as a traced module's are.
    """
    fresh: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in fresh:
                    copy_ = tensor.detach()
                    if isinstance(tensor, nn.Parameter):
                        copy_ = nn.Parameter(copy_, requires_grad=tensor.requires_grad)
                    fresh[id(tensor)] = copy_
                table[name] = fresh[id(tensor)]


def _patterns(patterns: Iterable[str], what: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    result = list(patterns)
    bad = [p for p in result if not isinstance(p, str)]
    if bad:
        raise TypeError(f"expected {what}= to hold FQN patterns (str), got {bad!r}")
    return result


def _match(fqn: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def _check_patterns_match(patterns: list[str], fqns: list[str], what: str) -> None:
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(f, p) for f in fqns)]
    if unmatched:
        raise ValueError(
            f"expected every {what}= pattern to match a sparsifiable weight, but {unmatched} "
            f"match none; the sparsifiable weights are {fqns}"
        )


def _copy_unreferenced(source: nn.Module, target: nn.Module) -> None:
    """Gives ``target`` every parameter and buffer of ``source`` the graph did not reference.

    GraphModule copies only what its graph reads; a checkpoint must still hold every parameter
    under its original name (unused heads, tied aliases) and buffer persistence must not change.
    """
    tensors = [*source.named_parameters(remove_duplicate=False), *source.named_buffers(remove_duplicate=False)]
    for qualname, tensor in tensors:
        *path, field = qualname.split(".")
        src, dst = source, target
        for item in path:
            src = getattr(src, item)
            nxt = getattr(dst, item, None)
            if nxt is None:
                nxt = nn.Module()
                setattr(dst, item, nxt)
            dst = nxt
        if src is dst or hasattr(dst, field):
            continue
        if isinstance(tensor, nn.Parameter):
            dst.register_parameter(field, tensor)
        else:
            dst.register_buffer(field, tensor, persistent=field not in src._non_persistent_buffers_set)


def _follow_module_order(source: nn.Module, target: nn.Module) -> None:
    """Orders every submodule's children, parameters and buffers of ``target`` as in ``source``.

    GraphModule creates its submodules in the order the graph first uses them, so a parameter
    reachable under several paths (a module shared by two parents) would be yielded first
    under another name than the original's; ``named_parameters()`` of the sparse module must
    give every mask key, the original's first name, for its weight.
    """
    for path, src in source.named_modules(remove_duplicate=False):
        try:
            dst = target.get_submodule(path) if path else target
        except AttributeError:
            continue
        if dst is src:
            continue
        for attr in ("_modules", "_parameters", "_buffers"):
            table, known = getattr(dst, attr), getattr(src, attr)
            order = [k for k in known if k in table] + [k for k in table if k not in known]
            items = [(k, table[k]) for k in order]
            table.clear()
            table.update(items)


def _draw_mask(
    weight: torch.Tensor, fqn: str, active: int, seed: int, from_zeros: bool = False, given: torch.Tensor | None = None,
) -> torch.Tensor:
    """A random bool mask of ``weight``'s shape with exactly ``active`` True entries, from the
    generator of ``(seed, fqn)`` (``from_zeros``: the weight's nonzero entries, or every entry
    where ``active`` is all; ``given``: that mask)."""
    if given is not None:
        mask = (given != 0).to(weight.device).contiguous()
    elif from_zeros:
        mask = torch.ones_like(weight, dtype=torch.bool) if active == weight.numel() else weight.detach() != 0
        mask = mask.contiguous()
    else:
        generator = torch.Generator().manual_seed(derived_seed(seed, fqn))
        # int32 positions where they fit: the same permutation as int64 at half the memory (a 33 M-entry
        # LM head would take 262 MB of int64 for a moment)
        index = torch.int32 if weight.numel() < 2**31 else torch.int64
        chosen = torch.randperm(weight.numel(), generator=generator, dtype=index)[:active]
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[chosen] = True
        mask = mask.view(weight.shape).to(weight.device)
    return mask


def _add_mask(sparse: SparseGraphModule, fqn: str, mask: torch.Tensor) -> str:
    """Registers ``mask`` beside the weight ``fqn`` and zeroes the weight where it is False;
    returns the mask's name."""
    owner_name, _, pname = fqn.rpartition(".")
    owner = sparse.get_submodule(owner_name)
    weight = sparse.get_parameter(fqn)
    name = f"{pname}_mask"
    while hasattr(owner, name):
        name = f"{name}_"
    owner.register_buffer(name, mask, persistent=True)
    zero_inactive_(weight, mask_on(mask, weight))  # in slices: no weight-sized temporary
    return f"{owner_name}.{name}" if owner_name else name
