"""Drop and grow on tensors: the topology update of RigL and SET, as pure functions.

Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020), section 3: with
``n`` active weights and drop fraction ``f``, ``k = floor(f * n)`` active weights with the
smallest drop score are removed, then the ``k`` weights with the largest grow score among those
inactive after the drop are added. A connection dropped and regrown in the same update keeps its
value; every layer keeps its active count. RigL scores drops by ``|w|`` and growth by
``|dL/d(w*m)|``; SET (Mocanu et al. 2018) grows uniformly at random, i.e. by a random score.

Selection uses ``torch.topk`` on one flattened layer (no full sort). Ties are broken by topk's
deterministic order on equal inputs, so identical inputs (the same seed, every DDP rank) give
identical masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TopologyUpdate", "drop_count", "update_mask", "apply_update", "zero_state_at"]


@dataclass(frozen=True)
class TopologyUpdate:
    """The outcome of one drop-and-grow on one layer.

    Attributes:
        mask: the new mask (bool, the weight's shape).
        dropped: positions active before and inactive after.
        grown: new connections: inactive before and active after.
        regrown: how many connections were dropped and grown back in this same update.
    """

    mask: torch.Tensor
    dropped: torch.Tensor
    grown: torch.Tensor
    regrown: int

    @property
    def changed(self) -> torch.Tensor:
        """Positions whose connection changed (dropped or newly grown)."""
        return self.dropped | self.grown


def drop_count(n_active: int, drop_fraction: float) -> int:
    """``floor(drop_fraction * n_active)``: how many connections one update replaces."""
    if not (0.0 <= drop_fraction <= 1.0):
        raise ValueError(f"expected drop_fraction in [0, 1], got {drop_fraction!r}")
    return math.floor(drop_fraction * n_active)


def update_mask(
    mask: torch.Tensor,
    drop_score: torch.Tensor,
    grow_score: torch.Tensor,
    drop_fraction: float,
) -> TopologyUpdate:
    """Drops the lowest-scored active weights and grows the highest-scored inactive ones.

    Args:
        mask: bool tensor, True where the connection is active.
        drop_score: same shape; the active entries with the smallest scores are dropped.
        grow_score: same shape; the entries with the largest scores among those inactive after
            the drop are grown (a just-dropped one may be chosen again).
        drop_fraction: fraction of the active count replaced, in [0, 1].

    Returns:
        A :class:`TopologyUpdate` whose mask has exactly as many active entries as ``mask``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"expected a bool mask, got {mask.dtype}")
    if drop_score.shape != mask.shape or grow_score.shape != mask.shape:
        raise ValueError(
            f"expected scores of the mask's shape {tuple(mask.shape)}, got drop "
            f"{tuple(drop_score.shape)} and grow {tuple(grow_score.shape)}"
        )
    flat = mask.reshape(-1)
    n_active = int(flat.sum())
    k = drop_count(n_active, drop_fraction)
    if k == 0:
        none = torch.zeros_like(mask)
        return TopologyUpdate(mask.clone(), none, none.clone(), 0)

    scores = drop_score.detach().reshape(-1).masked_fill(~flat, math.inf)
    drop_idx = torch.topk(scores, k, largest=False, sorted=False).indices
    after = flat.clone()
    after[drop_idx] = False

    scores = grow_score.detach().reshape(-1).masked_fill(after, -math.inf)
    grow_idx = torch.topk(scores, k, largest=True, sorted=False).indices
    after[grow_idx] = True

    new_mask = after.view_as(mask)
    dropped = mask & ~new_mask
    grown = new_mask & ~mask
    regrown = k - int(grown.sum())
    return TopologyUpdate(new_mask, dropped, grown, regrown)


@torch.no_grad()
def zero_state_at(tensors: list[torch.Tensor], positions: torch.Tensor) -> None:
    """Zeroes every tensor of ``positions``' shape at ``positions`` (optimizer state)."""
    for tensor in tensors:
        if tensor.shape == positions.shape:
            tensor.masked_fill_(positions.to(tensor.device), 0)


@torch.no_grad()
def apply_update(
    weight: torch.Tensor,
    mask: torch.Tensor,
    update: TopologyUpdate,
    state: list[torch.Tensor] = (),  # type: ignore[assignment]
) -> None:
    """Writes ``update`` in place: new mask, dropped and grown weights and their state zeroed.

    New connections start at 0 with zeroed optimizer state (RigL section 3); dropped ones are
    zeroed so an inactive weight holds 0 and its momentum cannot move it.
    """
    changed = update.changed
    mask.copy_(update.mask)
    weight.masked_fill_(changed, 0)
    zero_state_at(list(state), changed)
