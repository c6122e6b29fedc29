"""Schedules as pure functions of the step: when to update the topology and by how much.

Evci et al. 2020, section 3: the topology is updated every ``delta_t`` steps until ``t_end``
(75% of training by default) with the cosine-annealed drop fraction
``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))``; after ``t_end`` it is frozen.
Steps are counted from 1: the first update happens after ``delta_t`` training iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["cosine_drop_fraction", "is_update_step", "end_step", "GradualPruning", "pruned_density"]


def end_step(total_steps: int, end_fraction: float) -> int:
    """``t_end``: the last step at which the topology may change."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"expected total_steps to be a positive int, got {total_steps!r}")
    if not (0.0 < end_fraction <= 1.0):
        raise ValueError(f"expected end_fraction in (0, 1], got {end_fraction!r}")
    return int(end_fraction * total_steps)


def cosine_drop_fraction(step: int, alpha: float, t_end: int) -> float:
    """``alpha / 2 * (1 + cos(pi * step / t_end))`` for ``step <= t_end``, else 0."""
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"expected alpha (the initial drop fraction) in [0, 1], got {alpha!r}")
    if t_end <= 0 or step > t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


def is_update_step(step: int, delta_t: int, t_end: int) -> bool:
    """True when ``step`` (counted from 1) is a multiple of ``delta_t`` no later than ``t_end``."""
    return step >= 1 and step % delta_t == 0 and step <= t_end


@dataclass(frozen=True)
class GradualPruning:
    """The schedule of gradual magnitude pruning (Zhu & Gupta 2017), in steps.

    Each layer's sparsity goes from 0 to its final value as
    ``s_t = s_f + (0 - s_f) (1 - (t - begin) / (end - begin))^3``, updated every ``frequency``
    steps between ``begin`` and ``end``; dense before, final after.
    """

    begin: int
    end: int
    frequency: int = 100

    def __post_init__(self) -> None:
        if not (0 <= self.begin < self.end) or self.frequency < 1:
            raise ValueError(
                f"expected 0 <= begin < end and frequency >= 1, got begin={self.begin}, "
                f"end={self.end}, frequency={self.frequency}"
            )

    def fraction_pruned(self, step: int) -> float:
        """How far along the cubic the sparsities are at ``step`` (0 dense, 1 final)."""
        if step < self.begin:
            return 0.0
        if step >= self.end:
            return 1.0
        done = (step - self.begin) // self.frequency * self.frequency
        return 1.0 - (1.0 - done / (self.end - self.begin)) ** 3


def pruned_density(initial: float, final: float, progress: float) -> float:
    """A layer's density ``progress`` of the way along the pruning cubic (0: ``initial``,
    1: ``final``): ``s_t = s_f + (s_i - s_f)(1 - p)^3`` is linear in ``progress = 1 - (1 - p)^3``."""
    if progress >= 1.0:
        return final
    return initial + (final - initial) * max(progress, 0.0)
