"""Gradual magnitude pruning (Zhu & Gupta 2017): dense to sparse, masks only shrink.

Start from ``fxsparse.sparsify(model, 1.0)`` (or any denser topology); every ``delta_t`` steps
from ``begin_step`` to ``t_end`` each layer's smallest-magnitude weights are removed along the
cubic schedule (:class:`fxsparse.schedules.GradualPruning`), ending exactly at the counts of the
target ``density`` and ``init``. The optimizer still steps on pruning iterations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fxsparse import budgets
from fxsparse.methods.base import LayerChange, Method
from fxsparse.schedules import GradualPruning, pruned_density

__all__ = ["MagnitudePruning"]


class MagnitudePruning(Method):
    name = "pruning"
    paper = "Zhu & Gupta 2017: gradual magnitude pruning, dense to sparse"
    prunes = True

    def __init__(self) -> None:
        self.schedule: GradualPruning | None = None
        self.initial: dict[str, float] = {}  # each layer's density when pruning began
        self.final: dict[str, int] = {}  # each layer's target count

    def bind(self, scheduler: Any, density: float | None, init: str, begin_step: int) -> None:
        if density is None:
            raise ValueError(
                "method='pruning' needs the target: RigLScheduler(sparse, opt, T, method='pruning', "
                "density=0.1, init='erk'), with sparse = fxsparse.sparsify(model, 1.0)"
            )
        sites = scheduler.sparse._fxsparse.sites
        shapes = {fqn: site.shape for fqn, site in sites.items()}
        finals = budgets.layer_densities(shapes, density, init, dense=budgets.default_dense(shapes, init))
        self.final = {fqn: budgets.count_for_density(math.prod(site.shape), finals[fqn]) for fqn, site in sites.items()}
        too_sparse = [fqn for fqn, site in sites.items() if site.active < self.final[fqn]]
        if too_sparse:
            raise ValueError(
                f"pruning only removes weights, but {len(too_sparse)} layer(s) start below their "
                f"target count (first: {too_sparse[0]!r}); start from fxsparse.sparsify(model, 1.0)"
            )
        self.initial = {fqn: site.active / math.prod(site.shape) for fqn, site in sites.items()}
        self.schedule = GradualPruning(begin_step, scheduler.t_end, scheduler.delta_t)

    def is_update_step(self, scheduler: Any, step: int) -> bool:
        assert self.schedule is not None
        return self.schedule.fraction_pruned(step) > self.schedule.fraction_pruned(step - 1)

    def arms(self, scheduler: Any, step: int) -> bool:
        return False  # magnitude only: no gradient is read

    def update(
        self, scheduler: Any, step: int, grow_from: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, LayerChange]:
        assert self.schedule is not None
        progress = self.schedule.fraction_pruned(step)
        counts = {}
        for fqn, site in scheduler.sparse._fxsparse.sites.items():
            size = math.prod(site.shape)
            final = self.final[fqn]
            want = final if progress >= 1.0 else budgets.count_for_density(
                size, pruned_density(self.initial[fqn], final / size, progress)
            )
            counts[fqn] = min(site.active, max(final, want))  # masks only shrink, never past the target
        return scheduler.sparse.prune(counts, scheduler.optimizer)

    def optimizer_steps_on_update(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        schedule = self.schedule
        return {
            "initial": dict(self.initial), "final": dict(self.final),
            "pruning": None if schedule is None else (schedule.begin, schedule.end, schedule.frequency),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial = dict(state.get("initial", {}))
        self.final = dict(state.get("final", {}))
        schedule = state.get("pruning")
        self.schedule = None if schedule is None else GradualPruning(*schedule)
