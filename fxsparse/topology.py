"""Drop and grow on tensors: the topology update of RigL and SET, as pure functions.

Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020), section 3: with
``n`` active weights and drop fraction ``f``, ``k = floor(f * n)`` active weights with the
smallest drop score are removed, then the ``k`` weights with the largest grow score among those
inactive after the drop are added. A connection dropped and regrown in the same update keeps its
value; every layer keeps its active count. RigL scores drops by ``|w|`` and growth by
``|dL/d(w*m)|``; SET (Mocanu et al. 2018) grows uniformly at random, i.e. by a random score.

Selection touches only what it must: the drop is a topk over the active entries alone; the
growth a topk over candidates pre-filtered by a threshold read off a strided sample (see
:func:`top_indices`); no sort, no full topk. Ties are broken by topk's deterministic order on
equal inputs, so identical inputs (the same seed, every DDP rank) give identical masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TopologyUpdate", "drop_count", "flat_nonzero", "top_indices", "update_mask", "apply_update", "zero_state_at"]


@dataclass(frozen=True)
class TopologyUpdate:
    """The outcome of one drop-and-grow on one layer, as flat indices into the weight.

    Attributes:
        before: the mask the update started from, by reference: :func:`apply_update` changes
            it in place, so read ``mask``/``dropped``/``grown``/``changed`` before applying.
        dropped_idx: connections removed (active before, inactive after).
        grown_idx: new connections (inactive before, active after).
        regrown: connections dropped and grown back in this same update (they keep their value).
    """

    before: torch.Tensor
    dropped_idx: torch.Tensor
    grown_idx: torch.Tensor
    regrown: int

    def _positions(self, index: torch.Tensor) -> torch.Tensor:
        flags = torch.zeros(self.before.numel(), dtype=torch.bool, device=self.before.device)
        flags[index] = True
        return flags.view_as(self.before)

    @property
    def mask(self) -> torch.Tensor:
        """The new mask (a new tensor)."""
        flat = self.before.reshape(-1).clone()
        flat[self.dropped_idx] = False
        flat[self.grown_idx] = True
        return flat.view_as(self.before)

    @property
    def dropped(self) -> torch.Tensor:
        """Bool tensor of the dropped positions."""
        return self._positions(self.dropped_idx)

    @property
    def grown(self) -> torch.Tensor:
        """Bool tensor of the new connections."""
        return self._positions(self.grown_idx)

    @property
    def changed(self) -> torch.Tensor:
        """Bool tensor of the positions whose connection changed (dropped or newly grown)."""
        return self._positions(torch.cat([self.dropped_idx, self.grown_idx]))


def drop_count(n_active: int, drop_fraction: float) -> int:
    """``floor(drop_fraction * n_active)``: how many connections one update replaces."""
    if not (0.0 <= drop_fraction <= 1.0):
        raise ValueError(f"expected drop_fraction in [0, 1], got {drop_fraction!r}")
    return math.floor(drop_fraction * n_active)


_EXACT_BELOW = 1 << 16  # below this many candidates a plain topk is as fast as anything


def flat_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a contiguous bool tensor, ascending.

    On CPU numpy's ``flatnonzero`` is several times faster than ``torch.nonzero`` on a
    weight-sized mask; elsewhere it is ``torch.nonzero``.
    """
    if flags.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flags.reshape(-1).numpy()))
    return flags.reshape(-1).nonzero().squeeze(1)


def top_indices(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest (or smallest) entries of the 1-D ``values``, unordered.

    Exactly ``torch.topk``'s selection, faster when ``k`` is a small part of a large input (RigL
    grows a few percent of a layer): a threshold read off an evenly strided sample keeps a
    candidate set a little larger than ``k`` (one compare pass), and the exact topk runs on the
    candidates alone; ties at the threshold are taken in index order. If the sample misjudged
    and too few entries reach the threshold, it falls back to a full topk. Deterministic: no
    random sampling.
    """
    n = values.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if n <= _EXACT_BELOW or 8 * k >= n:
        return torch.topk(values, k, largest=largest, sorted=False).indices
    stride = n // _EXACT_BELOW
    sample = values[::stride]
    # aim for about 1.5 k candidates, plus a floor against sampling noise
    wanted = min(sample.numel(), math.ceil(1.5 * k * sample.numel() / n) + 64)
    edge = torch.topk(sample, wanted, largest=largest, sorted=False).values
    threshold = edge.min() if largest else edge.max()
    beyond = flat_nonzero(values > threshold if largest else values < threshold)
    if beyond.numel() >= k:
        chosen = torch.topk(values[beyond], k, largest=largest, sorted=False).indices
        return beyond[chosen]
    # Fewer than k strictly beyond the threshold: all of them are in, and the rest are ties at
    # the threshold (many exact zeros in a gradient, say), taken in index order.
    ties = flat_nonzero(values == threshold)[: k - beyond.numel()]
    if beyond.numel() + ties.numel() == k:
        return torch.cat([beyond, ties])
    return torch.topk(values, k, largest=largest, sorted=False).indices


def update_mask(
    mask: torch.Tensor,
    drop_score: torch.Tensor,
    grow_score: torch.Tensor,
    drop_fraction: float,
    *,
    scratch: bool = False,
    absolute: bool = False,
) -> TopologyUpdate:
    """Drops the lowest-scored active weights and grows the highest-scored inactive ones.

    Args:
        mask: bool tensor, True where the connection is active (not modified).
        drop_score: same shape; the active entries with the smallest scores are dropped.
        grow_score: same shape; the entries with the largest scores among those inactive after
            the drop are grown (a just-dropped one may be chosen again).
        drop_fraction: fraction of the active count replaced, in [0, 1].
        scratch: ``grow_score`` is a temporary the caller owns and may be overwritten, which
            saves a weight-sized copy.
        absolute: drop by ``|drop_score|`` (RigL's magnitude), taken on the active entries only.

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
    active = flat_nonzero(flat)
    k = drop_count(active.numel(), drop_fraction)
    if k == 0:
        none = torch.empty(0, dtype=torch.long, device=mask.device)
        return TopologyUpdate(mask, none, none.clone(), 0)

    # drop: the k smallest scores among the active entries only
    candidates = drop_score.detach().reshape(-1)[active]
    if absolute:
        candidates = candidates.abs_()
    drop = active[top_indices(candidates, k, largest=False)]
    after = flat.clone()
    after[drop] = False
    # grow: the k largest scores among everything inactive now
    scores = grow_score.detach().reshape(-1)
    scores = scores.masked_fill_(after, -math.inf) if scratch else scores.masked_fill(after, -math.inf)
    grow = top_indices(scores, k, largest=True)

    new = ~flat[grow]  # grown entries that were inactive before the update
    grown = grow[new]
    regrown = k - grown.numel()
    kept_back = torch.zeros_like(flat)
    kept_back[grow] = True
    dropped = drop[~kept_back[drop]]
    return TopologyUpdate(mask, dropped, grown, regrown)


@torch.no_grad()
def zero_state_at(tensors: list[torch.Tensor], index: torch.Tensor) -> None:
    """Zeroes every tensor (optimizer state of a weight) at the flat positions ``index``."""
    for tensor in tensors:
        _zero_at(tensor, index)


def _zero_at(tensor: torch.Tensor, index: torch.Tensor) -> None:
    if tensor.is_contiguous():
        tensor.view(-1).index_fill_(0, index.to(tensor.device), 0)
    else:  # e.g. channels-last state: go through positions, not memory order
        flags = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
        flags[index.to(tensor.device)] = True
        tensor.masked_fill_(flags.view(tensor.shape), 0)


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
    flat = mask.view(-1)
    flat[update.dropped_idx] = False
    flat[update.grown_idx] = True
    changed = torch.cat([update.dropped_idx, update.grown_idx])
    _zero_at(weight, changed)
    zero_state_at([t for t in state if t.shape == weight.shape], changed)
