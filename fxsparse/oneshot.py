"""One-shot pruning to an initial topology: each layer's top weights by magnitude or by Wanda's score.

:func:`prune_oneshot` returns what ``sparsify(model, density, init, ...)`` returns (the same
layer budgets, exact counts, either front-end), but each layer's mask keeps the ``count`` entries
of largest score instead of random ones, and the kept weights hold the model's own values:

- ``score="magnitude"``: ``|W|`` (one-shot magnitude pruning);
- ``score="wanda"``: ``|W_ij| * ||X_j||_2`` (Sun et al. 2023, "A Simple and Effective Pruning
  Approach for Large Language Models"), ``X_j`` the input feature that multiplies ``W_ij`` in the
  weight's product, over every calibration token and position.

How the norms are found. The products are found in the sparse module's graph (the nodes reading
a masked weight, through views, as a product operand: :mod:`fxsparse.passes.ops`' tables), and
an observer node is inserted after each for the calibration passes (removed afterwards). For a
product ``f(x, W)`` bilinear in its input and weight (linear, ``x @ W``, ``W @ x``, ``addmm``,
convolutions), ``d/dW sum f(x * x, W)`` is, for every weight entry, the sum over the outputs it
reaches of the input entry it multiplies, squared: exactly ``||X_j||^2`` for a linear layer, the
norm over the unfolded ``(in, kh, kw)`` patches for a convolution (stride, padding, dilation and
groups as the call has them), and the norm over the contracted dimension for a matmul, whichever
operand the weight is and through whatever views (``w.t()``) it is read. The observer computes
that gradient with the call's own op and arguments.

``group="row"`` compares weights within each output unit, as Wanda does (the layer's count split
over its output units as evenly as possible); ``"layer"`` over the whole layer. ``sequential``
(Wanda only) prunes the layers in graph order, each scored on activations computed with the
earlier layers already pruned: Wanda's block-by-block procedure taken to single layers (fxsparse
knows layers, not blocks). Ties are broken by ascending flat index (:func:`fxsparse.topology._pick`'s
total order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from fxsparse.api import sparsify
from fxsparse.capture import split_inputs
from fxsparse.graph_module import SparseGraphModule
from fxsparse.layouts import apply_layout, check_layout
from fxsparse.passes.ops import (
    ATEN_WEIGHT_ARGS, FUNCTION_INPUT_ARGS, FUNCTION_WEIGHT_ARGS, METHOD_WEIGHT_ARGS, packet, view_source,
)
from fxsparse.topology import _pick

__all__ = ["prune_oneshot", "SCORES", "GROUPS"]

SCORES = ("magnitude", "wanda")
GROUPS = ("layer", "row")
_ATEN = torch.ops.aten
_TRANSPOSED = {_ATEN.conv_transpose1d, _ATEN.conv_transpose2d, _ATEN.conv_transpose3d,
               torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}  # weight (in, out, ...)


def prune_oneshot(
    model: nn.Module, density: float, init: str | Mapping[str, float] = "uniform", *, score: str = "magnitude",
    calibration: Iterable[Any] | None = None, group: str | None = None, sequential: bool = True,
    **sparsify_kwargs: Any,
) -> SparseGraphModule:
    """A sparse copy of ``model`` whose masks keep each layer's highest-scoring weights.

    The layer budgets are those of ``fxsparse.sparsify(model, density, init, **sparsify_kwargs)``
    (exact counts); each mask keeps the layer's ``count`` entries of largest score, the kept
    weights hold ``model``'s values and the others are zero. ``model`` is never modified. Fine-tune
    the result with ``TopologyScheduler(..., method="static")`` (the topology kept) or ``"rigl"``.

    Args:
        model: the trained model to prune (anything :func:`fxsparse.sparsify` takes).
        density: fraction of the sparsified weights kept, in (0, 1].
        init: the layer-wise distribution of the budget, as in :func:`fxsparse.sparsify`
            (``"uniform"``, ``"er"``, ``"erk"``, a ``{fqn: density}`` dict); not ``"zeros"``.
        score: ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W| * ||X_j||_2`` over ``calibration``).
        calibration: batches the model is called with (each a tensor, a tuple of positional
            inputs, a dict of keyword inputs or ``(args, kwargs)``); required by ``"wanda"``,
            ignored by ``"magnitude"``. Wanda's first batch is sparsify's ``example_inputs``
            unless those are given. The passes run in eval mode with autograd on (the observers
            differentiate each product once): memory as a training forward per batch.
        group: ``"row"`` (compare within each output unit; Wanda's default) or ``"layer"``
            (compare over the layer; magnitude's default).
        sequential: Wanda: score each layer on activations of the model with the earlier layers
            (in graph order) already pruned (True), or every layer from one pass over the dense
            model (False).
        **sparsify_kwargs: passed to :func:`fxsparse.sparsify` (``example_inputs``, ``seed``,
            ``dense``, ``exclude``, ``capture``, ``budget``, ...). ``layout="compact"`` is
            applied after the masks are chosen (the scoring needs the masked layout).

    Returns:
        A :class:`SparseGraphModule`, in ``model``'s mode, armed as ``sparsify`` leaves it.

    Raises:
        ValueError: an unknown ``score``/``group``, ``"wanda"`` without calibration batches, a
            density of None or ``init="zeros"``, a product Wanda cannot score; and ``sparsify``'s.

    Example:
        >>> import torch, fxsparse
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> batches = [torch.randn(32, 8) for _ in range(4)]
        >>> sparse = fxsparse.prune_oneshot(net, 0.5, "uniform", score="wanda", calibration=batches, dense=[])
        >>> [int(m.sum()) for m in sparse.masks.values()]
        [64, 32]
    """
    group, batches, layout = _check(density, init, score, calibration, group, sequential, sparsify_kwargs)
    if batches and sparsify_kwargs.get("example_inputs") is None:
        sparsify_kwargs["example_inputs"] = batches[0]
    sparse = sparsify(model, density, init, **{**sparsify_kwargs, "layout": "masked"})
    originals = _originals(model, sparse)
    masks = _choose_masks(sparse, originals, score, group, batches, sequential)
    _install(sparse, originals, masks)
    if layout != "masked":
        apply_layout(sparse, layout, split_inputs(sparsify_kwargs.get("example_inputs")))
    sparse.verify()
    return sparse


def _check(
    density: Any, init: Any, score: Any, calibration: Any, group: Any, sequential: Any, kwargs: dict[str, Any],
) -> tuple[str, list[Any], Any]:
    """Checks what :func:`prune_oneshot` adds to sparsify's arguments: ``(group, calibration
    batches as a list, the layout to apply after)``."""
    if score not in SCORES:
        raise ValueError(f"expected score to be one of {SCORES}, got {score!r}")
    if density is None or init == "zeros":
        raise ValueError(
            "prune_oneshot chooses each layer's weights for a target density: expected a density in (0, 1] and "
            f"an init other than 'zeros', got density={density!r}, init={init!r}; a checkpoint that is already "
            "pruned is taken as it is by fxsparse.sparsify(model, None, 'zeros')"
        )
    group = group if group is not None else ("row" if score == "wanda" else "layer")
    if group not in GROUPS:
        raise ValueError(f"expected group to be one of {GROUPS} (or None: row for wanda, layer for magnitude), got {group!r}")
    if not isinstance(sequential, bool):
        raise TypeError(f"expected sequential to be a bool, got {type(sequential).__name__} {sequential!r}")
    batches = list(calibration) if calibration is not None and score == "wanda" else []
    if score == "wanda" and not batches:
        raise ValueError(
            "score='wanda' weighs each |W_ij| by the norm of its input feature j over calibration data: expected "
            f"calibration=[batch, ...] (what the model is called with, as sparsify's example_inputs), got "
            f"{'an empty iterable' if calibration is not None else 'None'}; or use score='magnitude'"
        )
    layout = kwargs.pop("layout", "masked")
    check_layout(layout)
    return group, batches, layout


def _originals(model: nn.Module, sparse: SparseGraphModule) -> dict[str, torch.Tensor]:
    """The model's own value of every sparsified weight (sparsify zeroed its copy's inactive
    entries), by mask key: the parameter of the same name in ``model``."""
    theirs = dict(model.named_parameters(remove_duplicate=False))
    names = {id(p): n for n, p in sparse.named_parameters(remove_duplicate=False)}
    found = {}
    for fqn in sparse.masks:
        name = names.get(id(sparse._leaf_weight(fqn)), fqn)
        assert name in theirs, f"fxsparse: no parameter {name!r} in the model for the mask of {fqn!r}"
        found[fqn] = theirs[name].detach()
    return found


@torch.no_grad()
def _install(sparse: SparseGraphModule, originals: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """The original weights under ``masks`` (the inactive ones zeroed)."""
    for fqn, mask in masks.items():
        sparse._leaf_weight(fqn).copy_(originals[fqn])
        sparse.get_buffer(sparse._fxsparse.sites[fqn].mask).copy_(mask)
    sparse.rezero()


@dataclass
class _Use:
    """One product reading a masked weight: ``node`` (the product), the masked-weight node, the
    positions of the weight operand and of the input operand (None: unknown) in ``node.args``."""

    fqn: str
    node: torch.fx.Node
    masked: torch.fx.Node
    weight_at: int
    input_at: int | None
    row_axis: int | None  # the weight's axis of output units, None when it cannot be told
    position: int  # of ``node`` in the graph: the order the observers run in


@dataclass
class _Recorder:
    """What the observer nodes of one instrumented graph share."""

    uses: list[_Use]
    active: set[str] = field(default_factory=set)  # the layers scored in this pass
    last: int = -1  # the graph position of the product after which the pass may stop
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # fqn -> sum of squared inputs, W-shaped


class _Stop(Exception):
    """Raised by the observer after the last product a pass needs: the rest of the forward is skipped."""


_RECORDERS: dict[int, _Recorder] = {}  # by token: the observers' arguments must be graph constants
_TOKENS = itertools.count()


def _choose_masks(
    sparse: SparseGraphModule, originals: Mapping[str, torch.Tensor], score: str, group: str,
    batches: list[Any], sequential: bool,
) -> dict[str, torch.Tensor]:
    """Every layer's mask by ``score``, read off the eval-mode graph (where Wanda's calibration
    passes run, on ``sparse`` holding the original weights: dense, or pruned up to the layer
    scored when ``sequential``); ``sparse`` is put back in its mode and growth recording."""
    training, armed = sparse.training, sparse.masker.armed
    sparse.eval()
    sparse.masker.armed = False
    try:
        shapes = {fqn: site.shape for fqn, site in sparse._fxsparse.sites.items()}
        uses = _uses(sparse.graph, shapes) if score == "wanda" or group == "row" else []
        if score == "wanda":
            _wanda_ready(sparse, uses)
        axes = _row_axes(shapes, uses) if group == "row" else {}
        counts = {fqn: site.active for fqn, site in sparse._fxsparse.sites.items()}
        if score == "magnitude":
            return {fqn: _top(w.abs(), counts[fqn], axes.get(fqn), fqn) for fqn, w in originals.items()}
        dense = {fqn: torch.ones_like(w, dtype=torch.bool) for fqn, w in originals.items()}
        _install(sparse, originals, dense)
        first: dict[str, int] = {}
        for use in sorted(uses, key=lambda u: -u.position):
            first[use.fqn] = use.position
        order = sorted(first, key=first.__getitem__)  # graph order
        masks: dict[str, torch.Tensor] = {}
        for step in ([fqn] for fqn in order) if sequential else [order]:
            norms = _calibrate(sparse, uses, set(step), batches)
            for fqn in step:
                wanda = originals[fqn].abs().to(torch.float64) * norms[fqn].to(originals[fqn].device).sqrt()
                masks[fqn] = _top(wanda, counts[fqn], axes.get(fqn), fqn)
            if sequential:  # the next layers see this one pruned
                _install(sparse, originals, {**dense, **masks})
        return masks
    finally:
        sparse.masker.armed = armed
        sparse.masker.clear()
        sparse.train(training)


def _wanda_ready(sparse: SparseGraphModule, uses: list[_Use]) -> None:
    """Raises unless every sparsified weight is read by products whose input Wanda can norm."""
    read = {u.fqn for u in uses}
    unread = [f for f in sparse.masks if f not in read]
    unknown = sorted({f"{u.fqn} (by {u.node.format_node()})" for u in uses if u.input_at is None})
    if unread or unknown:
        raise ValueError(
            "score='wanda' needs each sparsified weight's product in the graph with a known input operand "
            "(linear, convolution, matmul/mm/addmm/bmm and their ATen ops); "
            + (f"read in no such product (inside an opaque module?): {unread}; " if unread else "")
            + (f"the input of these products is not known: {unknown}; " if unknown else "")
            + "use score='magnitude', or leave these weights out with exclude=[...]"
        )


def _uses(graph: torch.fx.Graph, shapes: Mapping[str, tuple[int, ...]]) -> list[_Use]:
    """Every product reading a masked weight (the masked-weight nodes' users, through views)."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    found = []
    for masked in graph.nodes:
        fqn = masked.meta.get("fxsparse.masked")
        if fqn is None:
            continue
        ndim = len(shapes[fqn])
        todo = [masked]
        while todo:
            current = todo.pop()
            for user in current.users:
                if view_source(user) is current:
                    todo.append(user)
                    continue
                weight_at, input_at = _operands(user, current)
                if weight_at is not None:
                    row = _axis_back(current, masked, _row_in_operand(user, weight_at) % ndim, ndim)
                    found.append(_Use(fqn, user, masked, weight_at, input_at, row, position[user]))
    return found


def _weight_positions(node: torch.fx.Node) -> tuple[int, ...]:
    """Where a product call takes its weight operands (:mod:`fxsparse.passes.ops`' tables)."""
    if node.op == "call_method":
        return METHOD_WEIGHT_ARGS.get(str(node.target), ())
    if node.op != "call_function":
        return ()
    try:
        found = FUNCTION_WEIGHT_ARGS.get(node.target)  # type: ignore[arg-type]
    except TypeError:  # an unhashable target
        return ()
    return found or ATEN_WEIGHT_ARGS.get(packet(node.target), ())


def _operands(node: torch.fx.Node, operand: torch.fx.Node) -> tuple[int | None, int | None]:
    """``(position of operand as node's weight, position of node's input)``; ``(None, None)``
    when ``operand`` is no weight operand of ``node`` (an embedding lookup reading a tied table)."""
    positions = _weight_positions(node)
    weight_at = next((p for p in positions if p < len(node.args) and node.args[p] is operand), None)
    if weight_at is None:
        return None, None
    fixed = FUNCTION_INPUT_ARGS.get(packet(node.target)) if node.op == "call_function" else None
    others = [p for p in positions if p != weight_at]
    input_at = fixed if fixed is not None else (others[0] if len(others) == 1 else None)
    return weight_at, input_at if input_at is not None and input_at < len(node.args) else None


def _row_in_operand(node: torch.fx.Node, weight_at: int) -> int:
    """The axis of output units of the weight operand as ``node`` reads it: 0 for linear and
    convolution weights (1 for transposed convolutions), the last for ``x @ W``, the one before
    it for ``W @ x`` (negative: counted from the end)."""
    if node.op == "call_function" and packet(node.target) in FUNCTION_INPUT_ARGS:
        flagged = packet(node.target) in (_ATEN.convolution, _ATEN._convolution) and len(node.args) > 6 and node.args[6] is True
        return 1 if packet(node.target) in _TRANSPOSED or flagged else 0
    return -1 if weight_at == max(_weight_positions(node)) else -2


_SAME_AXES = {"contiguous", "to", "type_as", "float", "half", "bfloat16", "double", "detach", "clone"}
_SAME_AXES_ATEN = {_ATEN.contiguous, _ATEN.to, _ATEN._to_copy, _ATEN.alias, _ATEN.detach, _ATEN.clone}


def _axis_back(operand: torch.fx.Node, masked: torch.fx.Node, axis: int, ndim: int) -> int | None:
    """``axis`` of the view ``operand`` of the masked weight (``ndim`` dims) as an axis of the
    weight itself, through transposes, permutations and dtype/layout copies; None through
    anything else (a reshape)."""
    node = operand
    while node is not masked:
        name = str(node.target) if node.op == "call_method" else None
        op = packet(node.target) if node.op == "call_function" else None
        attr = node.args[1] if node.target is getattr else None
        if name in _SAME_AXES or op in _SAME_AXES_ATEN:
            pass
        elif name == "t" or op in (_ATEN.t, _ATEN.numpy_T) or node.target is torch.t or attr in ("T", "H"):
            axis = ndim - 1 - axis
        elif op is _ATEN.mT or attr in ("mT", "mH"):
            axis = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}.get(axis, axis)
        elif name == "transpose" or op is _ATEN.transpose or node.target is torch.transpose:
            a, b = node.args[1], node.args[2]
            if not (isinstance(a, int) and isinstance(b, int)):
                return None
            a, b = a % ndim, b % ndim
            axis = b if axis == a else a if axis == b else axis
        elif name == "permute" or op is _ATEN.permute or node.target is torch.permute:
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            if not all(isinstance(d, int) for d in dims):
                return None
            axis = dims[axis] % ndim  # type: ignore[index]
        else:
            return None
        node = view_source(node)
    return axis


def output_axes(sparse: SparseGraphModule) -> dict[str, int | None]:
    """The axis of output units of each sparse weight as the products of the graph now running
    read it: 0 for linear and convolution weights, 1 for a transposed convolution's and for a
    weight stored ``(in, out)`` (GPT-2's ``Conv1D``, ``x @ W``); None where that cannot be told
    (a reshape, einsum, products that disagree, an opaque module, a compact layer)."""
    shapes = {fqn: site.shape for fqn, site in sparse._fxsparse.sites.items()}
    return {fqn: found.pop() if len(found) == 1 else None for fqn, found in _axes_read(shapes, _uses(sparse.graph, shapes)).items()}


def _axes_read(shapes: Mapping[str, tuple[int, ...]], uses: list[_Use]) -> dict[str, set[int | None]]:
    axes: dict[str, set[int | None]] = {fqn: set() for fqn in shapes}
    for use in uses:
        axes[use.fqn].add(use.row_axis)
    return axes


def _row_axes(shapes: Mapping[str, tuple[int, ...]], uses: list[_Use]) -> dict[str, int]:
    """The axis of output units of every sparsified weight (the same in all its products), for
    ``group="row"``; raises where it cannot be told."""
    axes = _axes_read(shapes, uses)
    bad = sorted(fqn for fqn, found in axes.items() if len(found) != 1 or None in found)
    if bad:
        raise ValueError(
            f"group='row' compares weights within each output unit, but the output axis of {bad} cannot be told "
            "(read through a reshape, by several products that disagree, by no product fxsparse knows the output "
            "axis of, such as einsum, or inside an opaque module); use "
            "group='layer', or leave these weights out with exclude=[...]"
        )
    return {fqn: found.pop() for fqn, found in axes.items()}  # type: ignore[misc]


def _top(score: torch.Tensor, count: int, axis: int | None, fqn: str) -> torch.Tensor:
    """The mask of the ``count`` largest entries of ``score``: over the whole tensor, or within
    each slice along ``axis`` (``count`` split as evenly as possible; the remainder to the slices
    whose next entry scores highest). Ties by ascending index, as :func:`fxsparse.topology._pick`."""
    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"expected finite weights and calibration activations, but the scores of {fqn} hold NaN or inf")
    keys = score.detach().to("cpu", torch.float64)
    if axis is None:
        flat = torch.zeros(keys.numel(), dtype=torch.bool)
        flat[torch.from_numpy(_pick(np.arange(keys.numel()), keys.reshape(-1).numpy(), count, True))] = True
        return flat.view(score.shape).to(score.device)
    rows = keys.movedim(axis, 0)
    moved = rows.shape
    rows = rows.reshape(moved[0], -1)
    base, extra = divmod(count, rows.shape[0])
    order = torch.sort(-rows, dim=1, stable=True).indices  # best first; equal scores by ascending index
    take = torch.full((rows.shape[0],), base, dtype=torch.long)
    if extra:
        following = rows.gather(1, order[:, base : base + 1]).squeeze(1).numpy()
        take[torch.from_numpy(_pick(np.arange(rows.shape[0]), following, extra, True))] += 1
    kept = torch.arange(rows.shape[1]).unsqueeze(0) < take.unsqueeze(1)
    mask = torch.zeros_like(kept).scatter_(1, order, kept)
    return mask.reshape(moved).movedim(0, axis).contiguous().to(score.device)


def _calibrate(sparse: SparseGraphModule, uses: list[_Use], active: set[str], batches: list[Any]) -> dict[str, torch.Tensor]:
    """``{fqn: sum over batches and products of the squared input each weight entry multiplies}``
    for the layers in ``active``: observers inserted after every product (removed afterwards),
    each forward stopped after the last product it needs."""
    token = next(_TOKENS)
    recorder = _Recorder(uses, active)
    recorder.last = max(u.position for u in uses if u.fqn in active)
    graph = sparse.graph
    added = []
    try:
        for index, use in enumerate(uses):
            with graph.inserting_after(use.node):
                added.append(graph.call_function(_observe, (token, index, use.masked, use.node.args, use.node.kwargs)))
        sparse.recompile()
        _RECORDERS[token] = recorder
        with torch.enable_grad():
            for batch in batches:
                args, kwargs = split_inputs(batch)  # type: ignore[misc]
                try:
                    sparse(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        _RECORDERS.pop(token, None)
        for node in added:
            graph.erase_node(node)
        sparse.recompile()
    return recorder.sums


def _observe(token: int, index: int, masked: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The observer after a product ``f(x, W)``: adds ``d/dW sum f(x * x, W)`` (per weight entry,
    the squared inputs it multiplies, summed over the positions) to the layer's sum; stops the
    pass after the last product it needs."""
    recorder = _RECORDERS[token]
    use = recorder.uses[index]
    if use.fqn in recorder.active:
        wide, kwargs = tree_map(_wide, (list(args), kwargs))
        wide[use.input_at] = wide[use.input_at].detach().square()  # type: ignore[index]
        node = use.node
        call = getattr(wide[0], str(node.target)) if node.op == "call_method" else node.target
        out = call(*(wide[1:] if node.op == "call_method" else wide), **kwargs)  # type: ignore[operator]
        # |.|: a product scaled by a negative factor (addmm's alpha) counts its inputs all the same
        grad = torch.autograd.grad(out.sum(), masked)[0].detach().abs().to(torch.float64)
        recorder.sums[use.fqn] = recorder.sums[use.fqn] + grad if use.fqn in recorder.sums else grad
    if use.position == recorder.last:
        raise _Stop


def _wide(value: Any) -> Any:
    """A floating tensor in float32 at least (squares of half-precision inputs overflow)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.promote_types(value.dtype, torch.float32))
    return value
