"""An extension method, outside the package: MEST's drop criterion with SET's random growth.

MEST (Yuan et al., "MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the
Edge", NeurIPS 2021) drops the active weights of smallest ``|w| + gamma * |dL/dw|`` (a weight
that is small but still moving is kept) and grows at random, as SET does. fxsparse does not ship
it; this file shows that a method is a small subclass:

    import fxsparse, examples.mest                      # registers "mest"
    scheduler = fxsparse.TopologyScheduler(sparse, opt, total_steps=T, method="mest")

It overrides two things of :class:`fxsparse.methods.SET`: the drop score, and that an update
reads the dense gradient (so the scheduler arms its capture on update steps). Tested in
tests/test_examples.py.
"""

from __future__ import annotations

import torch

from fxsparse.methods import SET, register_method

__all__ = ["MEST"]


@register_method
class MEST(SET):
    name = "mest"
    paper = "Yuan et al. 2021 (MEST): drop by |w| + gamma |dL/dw|, grow at random"
    gamma = 0.1  # the paper's weight of the gradient term (its lambda)

    def needs_gradient(self) -> bool:
        return True  # the drop score reads the gradient

    def drop_scores(self, sparse, fqn, weight, mask, grad):  # type: ignore[no-untyped-def]
        assert grad is not None
        return weight.abs() + self.gamma * grad.abs()

    @staticmethod
    def reference(weight: torch.Tensor, grad: torch.Tensor, gamma: float = gamma) -> torch.Tensor:
        """The score the paper writes, for tests: ``|w| + gamma |g|``."""
        return weight.abs() + gamma * grad.abs()
