"""Pictures of a sparse model's topology, and the same numbers for TensorBoard.

Three figures answer the questions a sparse training run raises:

- :func:`density_bars`: where did the budget go? Per layer, the density a layer-wise
  initialization (ERK, uniform, ER ...) gives at the module's overall density, next to the
  density the layer has now (after training: SNFS and RigL-SG/SM move counts between layers).
- :func:`churn`: how much did the topology move? Per topology update, the connections grown over
  the active ones (the churn) against the scheduled drop fraction; the gap between the two is
  the connections dropped and grown straight back.
- :func:`mask_heatmaps`: which connections are alive? One heatmap per layer, a convolution's
  kernels reduced to the fraction of each kernel active (``out x in``).

:func:`log_tensorboard` writes the densities, :meth:`fxsparse.TopologyScheduler.stats` and the
reduced masks through any ``torch.utils.tensorboard.SummaryWriter``-like object.

matplotlib is optional (``pip install "fxsparse[plot]"``): it is imported by the drawing
functions, never by ``import fxsparse`` or ``import fxsparse.plot``. The figures are
``matplotlib.figure.Figure`` objects made without pyplot, so drawing many of them leaks no
pyplot state; a notebook shows one left as a cell's value, and ``path=`` writes a PNG. To draw
:func:`density_bars` into a pyplot figure, pass ``ax=``.

Example:
    >>> import torch, fxsparse, fxsparse.plot
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10))
    >>> sparse = fxsparse.sparsify(net, density=0.2, init="erk")
    >>> fig = fxsparse.plot.density_bars(sparse)          # doctest: +SKIP
    >>> fxsparse.plot.reduce_mask(sparse.masks["0.weight"]).shape
    torch.Size([8, 3])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fxsparse import budgets
from fxsparse.graph_module import SparseGraphModule
from fxsparse.oneshot import output_axes

__all__ = ["density_bars", "churn", "mask_heatmaps", "log_tensorboard", "init_densities", "reduce_mask", "churn_table"]

MAX_SIZE = 256  # the largest side of a drawn or logged mask, in cells: larger ones are block-averaged
_INSTALL = (
    'fxsparse.plot draws with matplotlib, which is not installed: pip install "fxsparse[plot]" '
    "(or pip install matplotlib)"
)


# ------------------------------------------------------------------------------------ numbers
def init_densities(sparse: SparseGraphModule, init: str, density: float | None = None) -> dict[str, float]:
    """Per layer of ``sparse``, the density ``fxsparse.sparsify(model, density, init)`` would give it.

    The budget is solved as ``sparsify`` solves it by default: ``budgets.layer_densities`` on the
    layers' shapes (the first layer kept dense for ``"uniform"``, ``budgets.default_dense``),
    rounded to exact counts by ``budgets.active_counts``; the result is ``count / size``.

    Args:
        sparse: the module whose layers (shapes, order) are budgeted.
        init: a registered scheme (``budgets.available_inits()``: "uniform", "er", "erk" ...).
        density: the overall density to budget; default: the module's own (``sparse.density``).

    Raises:
        TypeError: ``sparse`` is not a SparseGraphModule.
        ValueError: unknown ``init``, or a budget the scheme cannot meet at this density.
    """
    _check_sparse(sparse, "init_densities")
    if init not in budgets.available_inits():
        raise ValueError(f"expected init to be one of {budgets.available_inits()}, got {init!r}")
    shapes = {fqn: tuple(site.shape) for fqn, site in sparse._fxsparse.sites.items()}
    overall = sparse.density if density is None else budgets.validate_density(density)
    try:
        densities = budgets.layer_densities(shapes, overall, init, dense=budgets.default_dense(shapes, init))
    except ValueError as e:
        raise ValueError(f"init {init!r} has no budget at overall density {overall:.4g} for these layers: {e}") from e
    counts = budgets.active_counts(shapes, densities)
    return {fqn: counts[fqn] / math.prod(shape) for fqn, shape in shapes.items()}


def reduce_mask(mask: torch.Tensor, max_size: int = MAX_SIZE) -> torch.Tensor:
    """A mask as a 2-D float image in [0, 1] (on the CPU): the fraction of each cell active.

    A 2-D mask is itself; a 1-D one a single row; a mask of more dimensions is averaged over all
    but its first two, so a convolution's ``(out, in, kh, kw)`` becomes ``out x in``, each cell
    the fraction of that kernel active. A side longer than ``max_size`` is block-averaged
    (blocks of ``ceil(side / max_size)``, the last one possibly shorter), so an image keeps at
    most ``max_size`` cells a side and every cell is the active fraction of the weights it covers.

    Example:
        >>> reduce_mask(torch.ones(4, 3, 2, 2, dtype=torch.bool)).shape
        torch.Size([4, 3])
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim == 0:
        got = f"a 0-d tensor {mask!r}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"expected a mask tensor of at least one dimension, got {got}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"expected max_size to be an int >= 1, got {max_size!r}")
    image = mask.detach().to(torch.float32)
    if image.ndim == 1:
        image = image[None]
    elif image.ndim > 2:
        image = image.flatten(2).mean(dim=2)
    rows, cols = image.shape
    fr, fc = math.ceil(rows / max_size), math.ceil(cols / max_size)
    if fr > 1 or fc > 1:
        # pad with NaN to whole blocks: nanmean then averages the last, shorter blocks exactly
        padded = image.new_full((math.ceil(rows / fr) * fr, math.ceil(cols / fc) * fc), float("nan"))
        padded[:rows, :cols] = image
        image = padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).nanmean(dim=(1, 3))
    return image.cpu()


def churn_table(history: Any) -> dict[str, Any]:
    """The numbers :func:`churn` draws, from ``TopologyScheduler.history`` (or the scheduler).

    Returns:
        ``{"step": [...], "drop_fraction": [...], "churn": [...], "regrown": [...],
        "layers": {fqn: [...]}}``, one entry per update: ``churn`` is grown / active summed over
        the layers, ``regrown`` regrown / active, and ``layers[fqn]`` the layer's grown / active
        (NaN at an update that did not list the layer).

    Raises:
        TypeError: not a history (a list of the scheduler's update records).
        ValueError: no update yet.
    """
    records = history.history if hasattr(history, "history") else history
    if not isinstance(records, Sequence) or not all(
        isinstance(r, Mapping) and {"step", "drop_fraction", "layers"} <= set(r) for r in records
    ):
        raise TypeError(
            "expected TopologyScheduler.history (a list of {'step', 'drop_fraction', 'layers'} records) or the "
            f"scheduler itself, got {type(records).__name__}"
        )
    if not records:
        raise ValueError(
            "expected at least one topology update in the history, got none: train past the first update "
            "(the scheduler updates every delta_t steps until end_fraction * total_steps)"
        )
    fqns = list(dict.fromkeys(fqn for r in records for fqn in r["layers"]))
    table: dict[str, Any] = {"step": [], "drop_fraction": [], "churn": [], "regrown": [],
                             "layers": {fqn: [] for fqn in fqns}}
    for r in records:
        layers = r["layers"].values()
        active = sum(layer["active"] for layer in layers)
        table["step"].append(int(r["step"]))
        table["drop_fraction"].append(float(r["drop_fraction"]))
        table["churn"].append(sum(layer["grown"] for layer in layers) / active if active else 0.0)
        table["regrown"].append(sum(layer["regrown"] for layer in layers) / active if active else 0.0)
        for fqn in fqns:
            layer = r["layers"].get(fqn)
            table["layers"][fqn].append(layer["grown"] / layer["active"] if layer and layer["active"] else math.nan)
    return table


# ----------------------------------------------------------------------------------- figures
def density_bars(
    sparse: SparseGraphModule,
    *,
    compare: Sequence[str] = ("erk", "uniform"),
    labels: Sequence[str] | Mapping[str, str] | None = None,
    density: float | None = None,
    ax: Any = None,
    path: str | Path | None = None,
) -> Any:
    """Per-layer density bars: each ``compare`` scheme's budget next to the layer's density now.

    For each sparse layer (x axis, in graph order), one bar per scheme in ``compare`` (the
    density :func:`init_densities` gives it at the overall ``density``, default the module's
    own) and one, "current", for the layer's current density: pass the trained module to see how
    far training moved the budget from where ERK or uniform would have put it. A dashed line
    marks the overall density.

    Args:
        sparse: the SparseGraphModule (``fxsparse.sparsify``'s result), trained or not.
        compare: registered init schemes to draw (``budgets.available_inits()``); may be empty.
        labels: the x tick labels, one per layer in order or ``{fqn: label}`` (others keep their
            short name: the FQN without ``.weight``).
        density: the overall density the schemes are budgeted at (default ``sparse.density``).
        ax: a matplotlib Axes to draw into (default: a new figure).
        path: write the figure there as a PNG.

    Returns:
        The matplotlib Figure.
    """
    _check_sparse(sparse, "density_bars")
    if isinstance(compare, str):
        compare = (compare,)
    overall = sparse.density if density is None else budgets.validate_density(density)
    series = {f"{init} at {overall:.3g}": init_densities(sparse, init, overall) for init in compare}
    series["current"] = {fqn: int(m.sum()) / m.numel() for fqn, m in sparse.masks.items()}
    fqns = list(sparse._fxsparse.sites)
    names = _layer_labels(fqns, labels)
    fig, ax = _figure_and_axes(ax, figsize=(max(6.0, 0.3 * len(fqns) * len(series) + 2), 4.2))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        offsets = [x + (i - (len(series) - 1) / 2) * width for x in range(len(fqns))]
        color = "0.2" if label == "current" else f"C{i}"
        ax.bar(offsets, [values[f] for f in fqns], width, label=label, color=color)
    ax.axhline(overall, color="0.5", linestyle="--", linewidth=1, label=f"overall {overall:.3g}")
    slanted = len(fqns) > 4 or max(map(len, names)) > 10  # long or many labels would overlap flat
    ax.set_xticks(range(len(fqns)))
    ax.set_xticklabels(names, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_xlim(-0.6, len(fqns) - 0.4)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("layer")
    ax.set_ylabel("density (active / total)")
    ax.set_title("per-layer density: layer-wise budgets vs current")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 1
    return _finish(fig, path)


def churn(history: Any, *, per_layer: str | None = "lines", top: int = 5, path: str | Path | None = None) -> Any:
    """The topology's churn over training, one point per update (``TopologyScheduler.history``).

    The top panel plots, against the step, the churn (connections grown / active, summed over
    layers), the scheduled drop fraction, and regrown / active: an update drops
    ``drop_fraction x active`` connections, of which the regrown ones come straight back, so
    churn = drop fraction - regrown. The bottom panel shows each layer's churn: ``"lines"`` for
    the ``top`` layers of largest mean churn, ``"heatmap"`` for every layer x update; ``None``
    leaves it out.

    Args:
        history: ``TopologyScheduler.history`` (or the scheduler itself).
        per_layer: ``"lines"``, ``"heatmap"`` or None.
        top: how many layers ``"lines"`` draws.
        path: write the figure there as a PNG.

    Returns:
        The matplotlib Figure.
    """
    if per_layer not in ("lines", "heatmap", None):
        raise ValueError(f"expected per_layer to be 'lines', 'heatmap' or None, got {per_layer!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"expected top (how many layers to draw) to be an int >= 1, got {top!r}")
    table = churn_table(history)
    Figure = _matplotlib()
    from matplotlib.ticker import MaxNLocator
    panels = 2 if per_layer else 1
    fig = Figure(figsize=(7.5, 3.4 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    steps = table["step"]
    ax.plot(steps, table["churn"], "o-", color="C0", label="churn: grown / active")
    ax.plot(steps, table["drop_fraction"], "--", color="C1", label="drop fraction")
    ax.plot(steps, table["regrown"], ":", color="C2", label="regrown / active")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of active weights")
    ax.set_title(f"topology churn per update ({len(steps)} updates)")
    ax.legend(fontsize="small")
    for each in axes:
        each.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    if per_layer == "lines":
        _per_layer_lines(axes[1], table, top)
    elif per_layer == "heatmap":
        _per_layer_heatmap(fig, axes[1], table)
    return _finish(fig, path)


def mask_heatmaps(
    sparse: SparseGraphModule,
    *,
    layers: Sequence[str] | None = None,
    max_layers: int = 12,
    max_size: int = MAX_SIZE,
    path: str | Path | None = None,
) -> Any:
    """One heatmap per layer of its mask: bright where connections are active.

    Each mask is drawn as :func:`reduce_mask` makes it: a convolution's kernels reduced to the
    fraction of each kernel active (``out x in``), rows the output units, columns the inputs,
    and a side over ``max_size`` block-averaged. Empty rows are output units that lost every
    connection. A weight stored ``(in, out)`` (GPT-2's ``Conv1D``, a transposed convolution) is
    drawn transposed, so rows are outputs there too (:func:`fxsparse.oneshot.output_axes`); one
    whose output axis cannot be told is drawn as stored, its axes labelled ``dim 0`` / ``dim 1``.

    Args:
        sparse: the SparseGraphModule.
        layers: the weight FQNs to draw (default: every sparse layer, up to ``max_layers``).
        max_layers: the most layers drawn when ``layers`` is not given (the first ones).
        max_size: the largest side of an image, in cells.
        path: write the figure there as a PNG.

    Returns:
        The matplotlib Figure.
    """
    _check_sparse(sparse, "mask_heatmaps")
    masks = sparse.masks
    if layers is None:
        if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
            raise ValueError(f"expected max_layers to be an int >= 1, got {max_layers!r}")
        chosen = list(masks)[:max_layers]
    else:
        chosen = [layers] if isinstance(layers, str) else list(layers)
        unknown = [f for f in chosen if f not in masks]
        if unknown or not chosen:
            raise ValueError(f"expected layers among the sparse weights {list(masks)}, got {chosen}")
    Figure = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(3.2 * cols + 0.8, 3.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    outputs = output_axes(sparse)
    for ax, fqn in zip(axes, chosen):
        mask, known = masks[fqn], outputs.get(fqn) in (0, 1)
        if mask.ndim > 1 and outputs.get(fqn) == 1:  # stored (in, out ...): drawn outputs down all the same
            mask = mask.transpose(0, 1)
        rows, cols = (mask.shape[0], mask.shape[1]) if mask.ndim > 1 else (1, mask.shape[0])
        # extent in units of the weight: the ticks read output / input indices even when downsampled
        image = ax.imshow(reduce_mask(mask, max_size).numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest", aspect="auto", extent=(0, cols, rows, 0))
        shape = "x".join(map(str, masks[fqn].shape))
        ax.set_title(f"{_short(fqn)}\n{shape}, density {int(mask.sum()) / mask.numel():.3f}", fontsize="small")
        ax.set_xlabel(("input" if known else "dim 1") if mask.ndim > 1 else "weight", fontsize="small")
        ax.set_ylabel(("output" if known else "dim 0 (as stored)") if mask.ndim > 1 else "", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # cells are units or blocks of them
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes[: len(chosen)]), shrink=0.8, label="fraction active")
    more = f" (first {len(chosen)} of {len(masks)} layers)" if len(chosen) < len(masks) and layers is None else ""
    fig.suptitle(f"masks{more}: kernels as fraction active")
    return _finish(fig, path)


# ------------------------------------------------------------------------------ TensorBoard
def log_tensorboard(
    writer: Any, sparse: SparseGraphModule, scheduler: Any = None, step: int | None = None, *, images: bool = True,
    max_size: int = MAX_SIZE,
) -> dict[str, float]:
    """Logs the topology through a ``torch.utils.tensorboard.SummaryWriter`` (or any object
    with its ``add_scalar`` / ``add_image`` methods; fxsparse does not import tensorboard).

    Scalars: ``fxsparse/density`` (overall), ``fxsparse/density/<fqn>`` per layer, and each
    entry of ``scheduler.stats()`` as ``fxsparse/<name>`` (churn, drop fraction, grown ...).
    Images (``images=True``): ``fxsparse/mask/<fqn>``, each mask as :func:`reduce_mask` makes
    it, a ``[1, H, W]`` float image in [0, 1] (``dataformats="CHW"``).

    Args:
        writer: the SummaryWriter.
        sparse: the SparseGraphModule.
        scheduler: its TopologyScheduler, for ``stats()`` (optional).
        step: the global step (default: the scheduler's step count, else None).
        images: also log the masks as images (costs a reduction of every mask; log them less
            often than the scalars).
        max_size: the largest side of a logged image.

    Returns:
        ``{tag: value}`` of the scalars written.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter               # doctest: +SKIP
        >>> writer = SummaryWriter("runs/rigl")                              # doctest: +SKIP
        >>> fxsparse.plot.log_tensorboard(writer, sparse, scheduler)         # doctest: +SKIP
    """
    _check_sparse(sparse, "log_tensorboard")
    needed = ("add_scalar", "add_image") if images else ("add_scalar",)
    missing = [name for name in needed if not callable(getattr(writer, name, None))]
    if missing:
        raise TypeError(
            f"expected a torch.utils.tensorboard.SummaryWriter (or an object with {' and '.join(needed)}), got "
            f"{type(writer).__name__} without {missing}; make one with SummaryWriter(log_dir)"
        )
    if scheduler is not None and not callable(getattr(scheduler, "stats", None)):
        raise TypeError(f"expected a fxsparse.TopologyScheduler (with stats()) or None, got {type(scheduler).__name__}")
    if step is None and scheduler is not None:
        step = scheduler.step_count
    masks = sparse.masks
    active = {fqn: int(m.sum()) for fqn, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    scalars = {"fxsparse/density": sum(active.values()) / total}
    scalars.update({f"fxsparse/density/{fqn}": active[fqn] / m.numel() for fqn, m in masks.items()})
    if scheduler is not None:  # its "density" is the module's: already written
        scalars.update({f"fxsparse/{name}": float(v) for name, v in scheduler.stats().items() if name != "density"})
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    if images:
        for fqn, mask in masks.items():
            writer.add_image(f"fxsparse/mask/{fqn}", reduce_mask(mask, max_size)[None], step, dataformats="CHW")
    return scalars


# ---------------------------------------------------------------------------------- helpers
def _matplotlib() -> Any:
    """matplotlib's Figure class, or an ImportError that says how to install it."""
    try:
        import matplotlib  # noqa: F401  (imported first: a cached submodule would hide its absence)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return Figure


def _check_sparse(sparse: Any, what: str) -> None:
    if not isinstance(sparse, SparseGraphModule):
        raise TypeError(
            f"fxsparse.plot.{what} expected the SparseGraphModule returned by fxsparse.sparsify, got "
            f"{type(sparse).__name__}; sparsify the model first: sparse = fxsparse.sparsify(model, density)"
        )


def _figure_and_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    fig = _matplotlib()(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig: Any, path: str | Path | None) -> Any:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=120)
    return fig


def _short(fqn: str) -> str:
    """A layer's name on a plot: its weight's FQN without the trailing ``.weight``."""
    return fqn.removesuffix(".weight") or fqn


def _layer_labels(fqns: list[str], labels: Sequence[str] | Mapping[str, str] | None) -> list[str]:
    if labels is None:
        return [_short(f) for f in fqns]
    if isinstance(labels, Mapping):
        unknown = [k for k in labels if k not in fqns]
        if unknown:
            raise ValueError(f"expected labels keyed by the sparse weights {fqns}, got unknown {unknown}")
        return [str(labels.get(f, _short(f))) for f in fqns]
    if isinstance(labels, str) or len(labels) != len(fqns):
        raise ValueError(f"expected {len(fqns)} labels (one per sparse layer, in order {fqns}), got {labels!r}")
    return [str(label) for label in labels]


def _per_layer_lines(ax: Any, table: dict[str, Any], top: int) -> None:
    layers = table["layers"]
    mean = {fqn: _nanmean(values) for fqn, values in layers.items()}
    chosen = sorted(layers, key=lambda f: -mean[f] if not math.isnan(mean[f]) else math.inf)[:top]
    for i, fqn in enumerate(chosen):
        ax.plot(table["step"], layers[fqn], ".-", color=f"C{i}", label=_short(fqn))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("grown / active")
    more = f"the {len(chosen)} of {len(layers)} layers with most churn" if len(chosen) < len(layers) else "every layer"
    ax.set_title(f"per-layer churn: {more}")
    ax.legend(fontsize="x-small", ncols=2 if len(chosen) > 4 else 1)


def _per_layer_heatmap(fig: Any, ax: Any, table: dict[str, Any]) -> None:
    fqns = list(table["layers"])
    values = [table["layers"][f] for f in fqns]
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0)
    steps = table["step"]
    ticks = list(range(0, len(steps), max(1, math.ceil(len(steps) / 12))))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[i]) for i in ticks])
    ax.set_yticks(range(len(fqns)))
    ax.set_yticklabels([_short(f) for f in fqns], fontsize="x-small" if len(fqns) > 12 else "small")
    ax.set_xlabel("update at step")
    ax.set_title("per-layer churn (grown / active)")
    fig.colorbar(image, ax=ax, label="grown / active")


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
