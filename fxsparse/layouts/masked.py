"""The masked layout (the default): the weight stays its owner's dense Parameter beside a bool
mask buffer; every masked-weight node (:class:`fxsparse.masking.Masker`) multiplies them in the
forward and masks the gradient in the backward. Every weight starts here (``mask_weights``);
other layouts take weights from it at the end of ``sparsify``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.nn.utils import parametrize

from fxsparse import sharding, topology
from fxsparse.layouts.base import Layout, Plan
from fxsparse.masking import MASKER, masked_nodes, zero_inactive_

__all__ = ["MaskedLayout"]


class MaskedLayout(Layout):
    """A dense Parameter and a bool mask buffer per weight (see the module docstring)."""

    name = "masked"

    def plan(self, sparse: Any, fqn: str, graphs: Sequence[torch.fx.Graph]) -> tuple[Plan | None, str]:
        return None, "every weight starts masked"

    def mask(self, sparse: Any, fqn: str) -> torch.Tensor:
        return sparse.get_buffer(sparse._fxsparse.sites[fqn].mask)

    def weight(self, sparse: Any, fqn: str) -> torch.Tensor:
        """``get_parameter(fqn)``, or, where ``torch.nn.utils.parametrize`` computes that weight,
        the parametrization's ``original`` (the forward masks what the parametrization computes)."""
        owner_name, _, name = fqn.rpartition(".")
        owner = sparse.get_submodule(owner_name)
        if parametrize.is_parametrized(owner, name):
            return owner.parametrizations[name].original
        return sparse.get_parameter(fqn)

    trainable = weight

    def apply(self, sparse: Any, fqn: str, result: Any, states: list[torch.Tensor], zero_grad: bool) -> None:
        weight, mask = self.weight(sparse, fqn), self.mask(sparse, fqn)
        if sharding.is_sharded(mask):  # each rank writes the positions in its rows
            grad = [weight.grad] if zero_grad and weight.grad is not None else []
            sharding.apply_update(weight, mask, result, states + grad)
            return
        topology.apply_update(weight, mask, result, states)
        if zero_grad and weight.grad is not None:
            topology.zero_state_at([weight.grad], result.dropped_idx)

    def rezero(self, sparse: Any, fqn: str) -> None:
        weight, mask = self.weight(sparse, fqn), self.mask(sparse, fqn)
        zero_inactive_(weight, sparse.masker.mask_on(fqn, mask, weight))

    def reads(self, sparse: Any, fqn: str, graph: torch.fx.Graph) -> int:
        """Its masked-weight nodes in ``graph``, the parameter hook of a weight an opaque leaf
        uses, and the masked-weight node of a layer inside an opaque leaf whose computed kernel
        the mask goes on (:mod:`fxsparse.kernels`)."""
        from fxsparse.kernels import GRAPH  # fxsparse.kernels imports the passes, which import the layouts' masking

        site = sparse._fxsparse.sites[fqn]
        in_layer = bool(site.kernel) and site.kernel != GRAPH
        return len(masked_nodes(graph, MASKER, fqn)) + int(bool(site.opaque)) + int(in_layer)

    def timed_steps(self, sparse: Any, fqn: str, plan: Plan, x: torch.Tensor) -> dict[str, Callable[[], None]]:
        """The masked layer's step on ``x``: the two weight-sized passes (mask the weight, mask
        its gradient) around the dense product ``plan.product`` and its backward."""
        weight = self.weight(sparse, fqn).detach().clone().requires_grad_()
        mask = self.mask(sparse, fqn)
        product, options = plan.product
        x = x.detach().clone().requires_grad_()

        def step() -> None:
            with torch.no_grad():
                weight.mul_(mask)
            product(x, weight, None, **options).sum().backward()
            with torch.no_grad():
                weight.grad.mul_(mask)
            weight.grad = x.grad = None

        return {self.name: step}
