"""Drop-and-grow methods: static, SET, RigL, SNFS, RigL-SG, RigL-SM.

Each is a :class:`~fxsparse.methods.Method` that differs from the one it extends in one hook or
attribute, as jaxpruner writes them: RigL is SET with another grow score; SNFS is RigL growing
from a dense momentum, redistributed; RigL-SG / RigL-SM are RigL redistributed by the sparse
gradient / the optimizer's momentum. The scheduler asks each when it updates
(:meth:`Method.is_update_step`), whether to capture dense gradients (:meth:`Method.arms`), and
runs :meth:`Method.update`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fxsparse.methods.base import LayerChange, Method, finite, nonfinite_error

__all__ = ["Static", "SET", "RigL", "SNFS", "RigLSG", "RigLSM"]


class Static(Method):
    name = "static"
    paper = "random mask at init, never changed"


class SET(Method):
    name = "set"
    paper = "Mocanu et al. 2018: grow at random"
    grow = "random"


class RigL(SET):
    name = "rigl"
    paper = "Evci et al. 2020: grow by |dL/d(w*m)|"
    grow = "gradient"


class RigLSG(RigL):
    name = "rigl-sg"
    paper = "Sundar & Dwaraknath 2021: RigL, regrowth redistributed by mean sparse gradient"
    redistribute = "score"


class RigLSM(RigL):
    name = "rigl-sm"
    paper = "Sundar & Dwaraknath 2021: RigL, regrowth redistributed by mean sparse momentum"
    redistribute = "momentum"

    def bind(self, scheduler: Any, density: float | None, init: str, begin_step: int) -> None:
        if not _has_momentum(scheduler.optimizer):
            raise ValueError(
                f"method {self.name!r} redistributes by the optimizer's momentum, but this "
                f"{type(scheduler.optimizer).__name__} has none; use SGD(momentum=0.9) or Adam/AdamW"
            )
        if scheduler.delta_t < 2:
            raise ValueError(
                f"method {self.name!r} reads the optimizer's momentum, which exists only after an optimizer "
                f"step, and update steps skip it: expected delta_t >= 2, got {scheduler.delta_t}"
            )
        super().bind(scheduler, density, init, begin_step)


class SNFS(RigL):
    """Sparse momentum (Dettmers & Zettlemoyer 2019): grows from ``m <- beta * m + g``, a moving
    average of the dense gradient folded in every step until ``t_end`` (so every step captures
    it), and redistributes the regrowth by its mean over the active weights."""

    name = "snfs"
    paper = "Dettmers & Zettlemoyer 2019 (sparse momentum): grow by dense momentum, redistribute by its mean"
    redistribute = "score"
    dense_momentum = True

    def __init__(self) -> None:
        self.momentum: dict[str, torch.Tensor] = {}  # the dense momentum, by weight FQN

    def arms(self, scheduler: Any, step: int) -> bool:
        return step <= scheduler.t_end

    def observe(self, scheduler: Any, step: int) -> None:
        """``m <- beta * m + g`` with this step's dense gradient (beta: the optimizer's)."""
        sparse = scheduler.sparse
        grads = sparse.masker.grads
        beta = _beta(scheduler.optimizer)
        bad = [fqn for fqn, grad in grads.items() if not finite(grad)]
        if bad:
            raise nonfinite_error("SNFS", [f"{fqn} (dense gradient)" for fqn in bad],
                                  "SNFS would fold it into its momentum for good, so nothing was changed")
        for fqn in sparse._fxsparse.sites:
            grad = grads.get(fqn)
            if grad is None:
                continue
            held = self.momentum.get(fqn)
            self.momentum[fqn] = grad.clone() if held is None else held.mul_(beta).add_(grad)
        sparse.masker.clear()

    def update(self, scheduler: Any, step: int, grow_from: Mapping[str, torch.Tensor] | None = None) -> dict[str, LayerChange]:
        # the update consumes what it grows from: hand it copies
        return super().update(scheduler, step, {fqn: m.clone() for fqn, m in self.momentum.items()})

    def after_step(self, scheduler: Any, step: int) -> None:
        if step >= scheduler.t_end:
            self.momentum = {}  # the topology is frozen: nothing grows any more

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": dict(self.momentum)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.momentum = dict(state.get("momentum", {}))


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    group = optimizer.param_groups[0]
    return bool(group.get("momentum", 0)) or "betas" in group


def _beta(optimizer: torch.optim.Optimizer) -> float:
    """The first-moment decay of the optimizer (SGD's momentum, Adam's beta1), else 0.9."""
    group = optimizer.param_groups[0]
    beta = group.get("momentum") or (group.get("betas") or (0.9,))[0]
    return float(beta) if beta else 0.9
