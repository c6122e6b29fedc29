"""The dense baselines of the RigL papers' comparisons: small-dense and the lottery ticket.

- Small-dense: a dense network with as many parameters as the sparse one has active, made by
  shrinking the width of the same architecture (Evci et al. 2020, "Small-Dense" rows).
- Lottery ticket (Frankle & Carbin 2019): the final mask of a sparse (or pruned) training, with
  the weights rewound to their initial values, retrained from there.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fxsparse.api import sparsify
from fxsparse.budgets import validate_density
from fxsparse.graph_module import UPDATES, SparseGraphModule

__all__ = ["SmallDense", "small_dense", "sparse_parameter_count", "lottery_ticket"]


@dataclass
class SmallDense:
    """The small-dense model and how it was sized.

    Attributes:
        model: the dense model at ``width``.
        width: the width multiplier passed to ``model_fn``.
        params: its parameter count.
        target: the parameter count of the sparse model it stands for.
    """

    model: nn.Module
    width: float
    params: int
    target: int


def sparse_parameter_count(model: nn.Module, density: float, init: str = "erk") -> int:
    """Parameters of ``sparsify(model, density, init)``: active sparse weights plus every other
    parameter (biases, norms, weights left dense)."""
    sparse = sparsify(model, density, init)
    masked = {fqn: int(mask.sum()) for fqn, mask in sparse.masks.items()}
    return sum(masked.get(name, p.numel()) for name, p in sparse.named_parameters())


def small_dense(
    model_fn: Callable[[float], nn.Module], density: float, init: str = "erk", *, steps: int = 40
) -> SmallDense:
    """The narrowest-error dense model ``model_fn(width)`` with as many parameters as
    ``sparsify(model_fn(1.0), density, init)`` keeps active.

    ``model_fn(width)`` must build the architecture with every layer's channels multiplied by
    ``width`` (e.g. ``lambda w: fxsparse.models.WideResNet(22, 2, width=w)``); the parameter
    count grows with the width. The width is found by bisection on the parameter count; of the
    two bracketing widths the closer count wins.

    Example:
        >>> from fxsparse.models import WideResNet
        >>> base = small_dense(lambda w: WideResNet(22, 2, width=w), 0.1)
        >>> abs(base.params - base.target) / base.target < 0.05
        True
    """
    density = validate_density(density)
    target = sparse_parameter_count(model_fn(1.0), density, init)

    @functools.lru_cache(maxsize=None)  # the bisection asks again for the widths it ends between
    def count(width: float) -> int:
        return sum(p.numel() for p in model_fn(width).parameters())

    if count(1.0) <= target:
        return SmallDense(model_fn(1.0), 1.0, count(1.0), target)
    low, high = 1e-3, 1.0
    if count(low) > target:
        raise ValueError(
            f"even width {low} gives {count(low):,} parameters, more than the sparse model's "
            f"{target:,}; model_fn must scale every layer with its width argument"
        )
    for _ in range(steps):
        mid = math.sqrt(low * high)
        if count(mid) <= target:
            low = mid
        else:
            high = mid
    width = min((low, high), key=lambda w: abs(count(w) - target))
    model = model_fn(width)
    return SmallDense(model, width, sum(p.numel() for p in model.parameters()), target)


@torch.no_grad()
def lottery_ticket(trained: SparseGraphModule, initial: nn.Module | Mapping[str, torch.Tensor]) -> SparseGraphModule:
    """The lottery ticket of a trained sparse model: its final masks, the initial weights.

    Args:
        trained: the SparseGraphModule at the end of training (its masks are kept).
        initial: the weights to rewind to: the original dense model (its ``state_dict`` keys are
            the sparse module's), or a ``state_dict`` saved at initialization (its masks, if
            any, are ignored). Every parameter must be there.

    Returns:
        A new SparseGraphModule to retrain (with a fresh optimizer); ``trained`` is unchanged.

    Example:
        >>> init_state = copy.deepcopy(model.state_dict())             # doctest: +SKIP
        >>> ticket = fxsparse.lottery_ticket(trained_sparse, init_state)  # doctest: +SKIP
    """
    if not isinstance(trained, SparseGraphModule):
        raise TypeError(f"expected the trained SparseGraphModule, got {type(trained).__name__}")
    state = initial.state_dict() if isinstance(initial, nn.Module) else dict(initial)
    masks = {site.mask for site in trained._fxsparse.sites.values()}
    wanted = [name for name, _ in trained.named_parameters()]
    missing = [name for name in wanted if name not in state]
    if missing:
        raise ValueError(
            f"expected the initial weights of every parameter, missing {len(missing)} (first: "
            f"{missing[0]!r}); pass the original model or a state_dict saved at initialization"
        )
    own = trained.state_dict()
    rewound = {k: v for k, v in state.items() if k in own and k not in masks and k != UPDATES}
    ticket = copy.deepcopy(trained)
    ticket.load_state_dict({**ticket.state_dict(), **rewound})
    ticket.get_buffer(UPDATES).zero_()
    for _, (weight, mask) in ticket._weights_and_masks():
        weight.mul_(mask)
    ticket.arm_growth(True)
    ticket.verify()
    return ticket
