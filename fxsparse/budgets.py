"""Layer-wise density budgets: uniform, ER and ERK, as pure functions of weight shapes.

Nothing here knows about torch.fx or modules: a budget is a function of ``{fqn: shape}`` and a
target density, so the property tests can hammer it without tracing anything.

Every distribution keeps the total parameter count fixed: the active weights of all layers add up
to ``density * sum(N_l)`` (up to the per-layer rounding of :func:`active_counts`). A layer whose
share would exceed its size is made dense, its parameters are taken out of the budget, and the
rest is solved again (the ERK loop of Evci et al. 2020, applied to every distribution). Layers the
user keeps dense are taken out of the budget the same way, which is also how ``uniform`` keeps
its first layer dense: unlike the official code, which leaves the other layers at ``density`` and
so overshoots the total slightly, the remaining layers share what is left so that the parameter
count stays exactly the one asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence

__all__ = [
    "redistribute",
    "default_dense",
    "Shape",
    "register_init",
    "available_inits",
    "layer_densities",
    "active_counts",
    "count_for_density",
    "validate_density",
]

Shape = Sequence[int]
RawScore = Callable[[Shape], float]

_INITS: dict[str, RawScore] = {}


def register_init(name: str) -> Callable[[RawScore], RawScore]:
    """Registers a density distribution by its raw per-layer score.

    A distribution assigns each non-dense layer ``l`` the density ``eps * raw(shape_l)``, with
    ``eps`` solved so that the budget is met; ``raw`` is all a new scheme has to define.

    Example:
        >>> @register_init("sqrt")
        ... def _sqrt(shape):
        ...     return 1.0 / math.sqrt(math.prod(shape))
    """

    def decorator(fn: RawScore) -> RawScore:
        if name in _INITS:
            raise ValueError(f"init scheme {name!r} is already registered")
        _INITS[name] = fn
        return fn

    return decorator


def available_inits() -> list[str]:
    """Names of the registered density distributions."""
    return sorted(_INITS)


@register_init("uniform")
def _uniform(shape: Shape) -> float:
    return 1.0


@register_init("er")
def _erdos_renyi(shape: Shape) -> float:
    # ER (Mocanu et al. 2018): (n_in + n_out) / (n_in * n_out). The expression is symmetric, so
    # PyTorch's [out, in, ...] layout and a matmul weight's [in, out] give the same score.
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


@register_init("erk")
def _erdos_renyi_kernel(shape: Shape) -> float:
    # ERK (Evci et al. 2020): the sum of all dims over their product, kernel dims included.
    return sum(shape) / math.prod(shape)


def validate_density(density: object, what: str = "density") -> float:
    """Returns ``density`` as a float in (0, 1], or raises a ValueError/TypeError that says so."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(
            f"expected {what} to be a number in (0, 1], got {type(density).__name__} {density!r}; "
            f"pass the fraction of weights to keep, e.g. {what}=0.1"
        )
    value = float(density)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            f"expected {what} in (0, 1] (the fraction of weights kept active), got {density!r}; "
            f"for 90% sparsity pass {what}=0.1"
        )
    return value


def layer_densities(
    shapes: Mapping[str, Shape],
    density: float,
    init: str | Mapping[str, float] = "erk",
    *,
    dense: Collection[str] = (),
    costs: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer densities whose parameter-weighted (or cost-weighted) mean is ``density``.

    Args:
        shapes: weight shapes by FQN, in graph order (the first entry is "the first layer").
        density: overall target density in (0, 1].
        init: a registered scheme name ("uniform", "er", "erk", ...) or explicit
            ``{fqn: density}``; layers an explicit mapping does not name get ``density``.
        dense: FQNs kept at density 1. Their parameters come out of the budget.
        costs: per-layer cost of the dense layer (e.g. its inference FLOPs) to weight the
            budget by instead of the parameter count: then ``sum d_l c_l = density * sum c_l``
            (a FLOP budget). A layer of zero cost takes no budget and is made dense.

    Returns:
        ``{fqn: d_l}`` with ``0 < d_l <= 1`` for every FQN of ``shapes``.

    Raises:
        ValueError: unknown scheme, unknown FQN, or a budget the dense layers already exceed.

    Example:
        >>> d = layer_densities({"a": (64, 3, 3, 3), "b": (10, 64)}, 0.5, "erk")
        >>> round(sum(d[k] * n for k, n in [("a", 1728), ("b", 640)]) / 2368, 6)
        0.5
    """
    density = validate_density(density)
    unknown_dense = [name for name in dense if name not in shapes]
    if unknown_dense:
        raise ValueError(
            f"expected dense layers among the sparsifiable weights, got unknown {unknown_dense}; "
            f"valid names: {list(shapes)}"
        )
    if isinstance(init, Mapping):
        unknown = [name for name in init if name not in shapes]
        if unknown:
            raise ValueError(
                f"expected init keys to be sparsifiable weight FQNs, got unknown {unknown}; "
                f"valid names: {list(shapes)}"
            )
        result = {name: validate_density(init.get(name, density), f"init[{name!r}]") for name in shapes}
        result.update({name: 1.0 for name in dense})
        return result
    if init not in _INITS:
        raise ValueError(
            f"expected init to be one of {available_inits()} or a {{fqn: density}} dict, "
            f"got {init!r}"
        )
    raw_fn = _INITS[init]
    raw = {name: float(raw_fn(shape)) for name, shape in shapes.items()}
    if costs is None:
        sizes: dict[str, float] = {name: math.prod(shape) for name, shape in shapes.items()}
    else:
        missing = [name for name in shapes if name not in costs]
        bad = {name: c for name, c in costs.items() if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0)}
        if missing or bad:
            raise ValueError(
                f"expected a finite cost >= 0 for every layer, got missing {missing} and bad {bad}"
            )
        sizes = {name: float(costs[name]) for name in shapes}
        if sum(sizes.values()) <= 0:
            raise ValueError("expected some layer to have a positive cost, got all zero")
    return _solve(raw, sizes, density, set(dense))


def _solve(
    raw: Mapping[str, float], sizes: Mapping[str, float], density: float, dense: set[str]
) -> dict[str, float]:
    total = sum(sizes.values())
    budget = density * total
    dense = set(dense)
    while True:
        free = [name for name in raw if name not in dense]
        left = budget - sum(sizes[name] for name in dense)
        if left < -1e-9 * total:
            raise ValueError(
                f"expected the dense layers {sorted(dense)} to fit in the budget of "
                f"{density} x {total} weights, but they alone hold "
                f"{sum(sizes[n] for n in dense)}; raise density or keep fewer layers dense "
                f"(sparsify keeps the first layer dense for init='uniform' unless dense=[])"
            )
        if not free:
            break
        if left <= 0:
            raise ValueError(
                f"expected room for the sparse layers after the dense ones {sorted(dense)}, but "
                f"they use the whole budget of {density} x {total} weights; raise density or "
                f"keep fewer layers dense (sparsify keeps the first layer dense for "
                f"init='uniform' unless dense=[])"
            )
        weighted = sum(raw[name] * sizes[name] for name in free)
        if weighted <= 0:  # only costless layers left (a cost budget): they take no budget
            dense |= set(free)
            continue
        eps = left / weighted
        # The ERK loop: a layer asked to be denser than 1 becomes dense and leaves the budget.
        # eps only grows as layers leave, so taking every overflowing layer at once reaches the
        # same fixed point as the official one-maximum-at-a-time loop.
        overflow = {name for name in free if eps * raw[name] > 1.0 + 1e-12}
        if not overflow:
            break
        dense |= overflow
    return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in raw}


def default_dense(shapes: Mapping[str, Shape], init: object) -> list[str]:
    """The layers kept dense when the user names none: with ``"uniform"`` the first layer (the
    papers' convention), with every other scheme none."""
    return [next(iter(shapes))] if init == "uniform" and len(shapes) > 1 else []


def count_for_density(size: int, density: float) -> int:
    """Active weights of a layer of ``size`` weights at ``density``: the rule used everywhere.

    The count is ``density * size`` rounded half up, clamped to ``[1, size]``: a layer never
    loses every connection, and its count is within one weight of its real-valued budget.
    """
    if size <= 0:
        raise ValueError(f"expected a positive layer size, got {size}")
    return min(size, max(1, math.floor(density * size + 0.5)))


def active_counts(shapes: Mapping[str, Shape], densities: Mapping[str, float]) -> dict[str, int]:
    """Exact active-weight counts per layer under :func:`count_for_density`."""
    return {name: count_for_density(math.prod(shape), densities[name]) for name, shape in shapes.items()}


def redistribute(total: int, capacity: Mapping[str, int], scores: Mapping[str, float]) -> dict[str, int]:
    """Shares ``total`` new connections among layers in proportion to ``scores``, exactly.

    The redistribution of sparse momentum (Dettmers & Zettlemoyer 2019) and of RigL-SG/SM
    (Sundar & Dwaraknath 2021): after each layer dropped its share, the regrowth of the whole
    network goes to the layers by their score (mean momentum or gradient magnitude), so the total
    count is constant while layer densities move. A layer never takes more than its
    ``capacity`` (its inactive weights); what it cannot take is shared among the others
    (water filling). Integer shares by largest remainder, ties by layer order: deterministic.

    Args:
        total: connections to grow, at most ``sum(capacity.values())``.
        capacity: per layer, how many it can still take (>= 0).
        scores: per layer, its finite score (>= 0); all zero shares by capacity.

    Returns:
        ``{layer: count}`` with ``0 <= count <= capacity`` and ``sum == total``.

    Example:
        >>> redistribute(10, {"a": 100, "b": 3}, {"a": 1.0, "b": 3.0})
        {'a': 7, 'b': 3}
    """
    if set(scores) != set(capacity):
        raise ValueError(f"expected scores for exactly the layers of capacity, got {sorted(scores)} vs {sorted(capacity)}")
    bad = {k: v for k, v in scores.items() if not (math.isfinite(v) and v >= 0)}
    if bad or any(c < 0 for c in capacity.values()):
        raise ValueError(f"expected finite scores >= 0 and capacities >= 0, got scores {bad} and {dict(capacity)}")
    if not (0 <= total <= sum(capacity.values())):
        raise ValueError(f"expected 0 <= total <= {sum(capacity.values())} (the room left), got {total}")
    counts = dict.fromkeys(capacity, 0)
    open_ = [name for name in capacity if capacity[name] > 0]
    remaining = total
    while remaining > 0:
        weights = {name: scores[name] for name in open_}
        if sum(weights.values()) <= 0:  # no signal: share by room
            weights = {name: float(capacity[name] - counts[name]) for name in open_}
        norm = sum(weights.values())
        ideal = {name: remaining * w / norm for name, w in weights.items()}
        full = [name for name in open_ if ideal[name] >= capacity[name] - counts[name]]
        if full:  # these fill up; the rest is shared again among the others
            for name in full:
                remaining -= capacity[name] - counts[name]
                counts[name] = capacity[name]
            open_ = [name for name in open_ if name not in full]
            continue
        floors = {name: math.floor(ideal[name]) for name in open_}
        left = remaining - sum(floors.values())
        order = sorted(open_, key=lambda name: (-(ideal[name] - floors[name]), open_.index(name)))
        for i, name in enumerate(order):
            counts[name] += floors[name] + (1 if i < left else 0)
        remaining = 0
    return counts
