"""Drop and grow on tensors: the topology update of RigL and SET, as pure functions.

Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020), section 3: with
``n`` active weights and drop fraction ``f``, ``k = floor(f * n)`` active weights with the
smallest drop score are removed, then the ``k`` weights with the largest grow score among those
inactive after the drop are added. A connection dropped and regrown in the same update keeps its
value; every layer keeps its active count. RigL scores drops by ``|w|`` and growth by
``|dL/d(w*m)|``; SET (Mocanu et al. 2018) grows uniformly at random, i.e. by a random score.

Selection touches only what it must: the drop is a selection over the active entries alone;
the growth a selection over candidates pre-filtered by a threshold read off a spread sample
(see :func:`top_indices`); no sort. On CPU the selection is numpy's introselect, elsewhere
``torch.topk``; both select in one total order (score, then ascending flat index), so identical
inputs give identical masks on every device and every DDP rank.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "TopologyUpdate", "drop_count", "flat_nonzero", "top_indices", "update_mask", "prune_mask", "apply_update",
    "zero_state_at", "map_layers", "GrowthCandidates", "growth_candidates", "merged_candidates", "update_from_candidates",
]


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


_EXACT_BELOW = 1 << 16  # below this many candidates a plain selection is as fast as anything


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

    ``torch.topk``'s selection with ties at the edge taken in index order (:func:`_exact_top`),
    faster when ``k`` is a small part of a large input: a threshold read off a spread
    sample keeps a candidate set a little larger than ``k`` (one compare pass), and the exact
    topk runs on the candidates alone; ties at the threshold are taken in index order. If the
    sample misjudged, it falls back to a full topk. Deterministic: no random sampling. The
    device-agnostic path of :func:`update_mask`; on CPU it uses :func:`_extreme` instead.
    """
    n = values.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if n <= _EXACT_BELOW or 8 * k >= n:
        return _exact_top(values, k, largest)
    sample = values[_sample_positions(n, values.device)]
    wanted = min(sample.numel(), math.ceil(1.25 * k * sample.numel() / n) + 32)
    edge = torch.topk(sample, wanted, largest=largest, sorted=False).values
    threshold = edge.min() if largest else edge.max()
    beyond = flat_nonzero(values > threshold if largest else values < threshold)
    if beyond.numel() >= k:  # ascending positions, so ties keep index order
        return beyond[_exact_top(values[beyond], k, largest)]
    # Fewer than k strictly beyond the threshold: all of them are in, and the rest are ties at
    # the threshold (many exact zeros in a gradient, say), taken in index order.
    ties = flat_nonzero(values == threshold)[: k - beyond.numel()]
    if beyond.numel() + ties.numel() == k:
        return torch.cat([beyond, ties])
    return _exact_top(values, k, largest)


def _exact_top(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Positions of the ``k`` largest (smallest) of the 1-D ``values`` in one total order, value
    then ascending position, on every device: ``torch.topk`` finds the k-th value, and the ties
    at it are taken in index order (``torch.topk`` breaks them in no defined order on CUDA). The
    CPU selection (:func:`_pick`) uses the same order, so both select alike."""
    if k >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    edge = torch.topk(values, k, largest=largest, sorted=False).values
    kth = edge.min() if largest else edge.max()
    beyond = flat_nonzero(values > kth if largest else values < kth)
    ties = flat_nonzero(values == kth)[: k - beyond.numel()]
    if beyond.numel() + ties.numel() == k:
        return torch.cat([beyond, ties])
    return torch.topk(values, k, largest=largest, sorted=False).indices  # a NaN k-th value compares false


def _sample_positions(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``min(n, 16384)`` distinct ascending positions spread over ``range(n)`` with no period.

    One position per stratum of ``n / 16384`` entries, at an offset that a Weyl sequence
    ``i * P`` moves around the stratum. A plain stride keeps landing on the same kernel tap or
    channel of a conv weight (a stride of 36 over a 3x3 kernel reads one tap only, and at 1x1
    feature maps the corner taps get no gradient), which biases the threshold; ascending
    positions keep the gathers sequential.
    """
    return torch.tensor(_positions(n), device=device)


@functools.lru_cache(maxsize=256)
def _positions(n: int) -> np.ndarray:
    if n <= _SAMPLE:
        return np.arange(n)
    i = np.arange(_SAMPLE, dtype=np.int64)
    starts = (i * n) // _SAMPLE
    widths = ((i + 1) * n) // _SAMPLE - starts
    offsets = ((i * _WEYL_PRIME) % _SAMPLE * widths) // _SAMPLE
    positions = starts + offsets
    positions.flags.writeable = False  # cached: shared by every caller
    return positions


_SAMPLE = 1 << 14  # sample size for a threshold: a few hundred entries beyond it suffice
_WEYL_PRIME = 2_654_435_761
_CHUNK = 1 << 17  # scan chunk: its key and flag buffers stay in cache and are reused
_buffers = threading.local()


def _scratch(dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable chunk buffer: scans allocate no weight-sized temporaries.

    Fresh memory is expensive (every new page faults in; measured here at about 3 ns per
    byte, far more than reading it), so a weight-sized temporary costs more than a pass.
    """
    cache = getattr(_buffers, "arrays", None)
    if cache is None:
        cache = _buffers.arrays = {}
    if dtype not in cache:
        cache[dtype] = np.empty(_CHUNK, dtype=dtype)
    return cache[dtype]


def _scan(
    values: np.ndarray,
    compare: np.ufunc,
    threshold: float,
    where: np.ndarray,
    inside: bool,
    absolute: bool,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ascending flat indices ``i`` with ``where[i] == inside`` and ``compare(key_i, threshold)``,
    and their keys; with ``limit``, the scan may stop once it has found that many (the result
    then holds at least ``limit``, the smallest indices).

    ``key_i`` is ``|values[i]|`` if ``absolute`` else ``values[i]``. One pass, chunk by chunk;
    the keys are taken while the chunk is in cache (a later gather would miss it).
    """
    keys, flags = _scratch(values.dtype), _scratch(np.dtype(bool))
    found, found_keys = [], []
    count = 0
    for start in range(0, values.size, _CHUNK):
        if limit is not None and count >= limit:
            break
        stop = min(values.size, start + _CHUNK)
        key = values[start:stop]
        if absolute:
            key = np.abs(key, out=keys[: stop - start])
        hit = compare(key, threshold, out=flags[: stop - start])
        # keep the domain: hit & where, or hit & ~where (True > False)
        (np.logical_and if inside else np.greater)(hit, where[start:stop], out=hit)
        index = np.flatnonzero(hit)
        if index.size:
            found_keys.append(key[index])
            found.append(index + start)
            count += index.size
    if not found:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=values.dtype)
    return np.concatenate(found), np.concatenate(found_keys)


def _keys(values: np.ndarray, index: np.ndarray, absolute: bool) -> np.ndarray:
    gathered = values[index]
    return np.abs(gathered, out=gathered) if absolute else gathered


def _partition(keys: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Positions of the ``k`` largest (smallest) ``keys``: numpy's introselect, deterministic."""
    if k >= keys.size:
        return np.arange(keys.size)
    if largest:
        return np.argpartition(keys, keys.size - k)[keys.size - k :]
    return np.argpartition(keys, k - 1)[:k]


def _pick(index: np.ndarray, keys: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The ``index`` entries of the ``k`` largest (smallest) ``keys``; ties by ascending index.

    The selection is that of one total order, (key, then index ascending), whatever order
    ``index`` is in: :func:`update_from_candidates` relies on it to select what a dense
    update selects.

    Finds the k-th key by partitioning a copy of the keys (moving 4-byte values, not 8-byte
    indices as ``argpartition`` does), then keeps what lies beyond it and the first ties.
    """
    if k >= keys.size:
        return index
    rank = keys.size - k if largest else k - 1
    edge = keys.copy()
    edge.partition(rank)
    kth = edge[rank]
    reached = keys >= kth if largest else keys <= kth
    if np.count_nonzero(reached) == k:  # no ties at the k-th key: the common case
        return np.compress(reached, index)
    chosen = np.compress(keys > kth if largest else keys < kth, index)
    # ties at the k-th key in ascending index, wherever ``index`` came from (a domain, then extras)
    chosen = np.concatenate([chosen, np.sort(np.compress(keys == kth, index))[: k - chosen.size]])
    if chosen.size != k:  # a NaN k-th key compares false with everything
        return index[_partition(keys, k, largest)]
    return chosen


def _extreme(
    values: np.ndarray,
    k: int,
    largest: bool,
    where: np.ndarray,
    inside: bool,
    *,
    absolute: bool = False,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """Flat indices of the ``k`` largest (smallest) keys in a domain, exactly, on CPU.

    The domain is every ``i`` with ``where[i] == inside``, plus the indices ``extra`` (which
    must lie outside it); keys are ``values`` or ``|values|``. A threshold read off a spread
    sample of the domain keeps a little more than ``k`` candidates in one chunked pass (no
    weight-sized temporary: no sort, no mask copy, no index list of the whole domain), and the
    exact selection runs on those. Every entry beyond the threshold is a candidate, so the
    result is exact. Ties at the k-th key are broken by ascending flat index, on every path (one
    total order: key, then index); a misjudged sample falls back to the whole domain.
    """
    extra = np.empty(0, dtype=np.int64) if extra is None else extra
    in_where = int(np.count_nonzero(where))
    domain = (in_where if inside else where.size - in_where) + extra.size
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if domain <= _EXACT_BELOW or values.size <= 2 * _EXACT_BELOW:
        return _extreme_exact(values, k, largest, where, inside, absolute, extra)
    positions = _positions(values.size)
    positions = positions[where[positions] == inside]
    if positions.size == 0:
        return _extreme_exact(values, k, largest, where, inside, absolute, extra)
    sample = _keys(values, positions, absolute)
    wanted = min(sample.size, math.ceil(1.15 * k * sample.size / domain) + 32)
    rank = sample.size - wanted if largest else wanted - 1
    sample.partition(rank)  # in place: the sample is a copy of ours
    threshold = sample[rank]
    beyond, equal = (np.greater if largest else np.less), np.equal
    extra_keys = _keys(values, extra, absolute)
    found, found_keys = _scan(values, beyond, threshold, where, inside, absolute)
    if extra.size:
        extra_beyond = beyond(extra_keys, threshold)
        found = np.concatenate([found, extra[extra_beyond]])
        found_keys = np.concatenate([found_keys, extra_keys[extra_beyond]])
    if found.size >= k:
        return _pick(found, found_keys, k, largest)
    # fewer than k strictly beyond: all of them are in, the rest are ties at the threshold, the
    # lowest indices first. Only as many are needed as are missing: a layer whose gradient is
    # zero nearly everywhere (a residual branch behind a zero-initialized norm) ties millions.
    need = k - found.size
    tied, _ = _scan(values, equal, threshold, where, inside, absolute, limit=need)
    ties = np.sort(np.concatenate([tied[:need], extra[equal(extra_keys, threshold)]]))
    if found.size + ties.size >= k:
        return np.concatenate([found, ties[:need]])
    return _extreme_exact(values, k, largest, where, inside, absolute, extra)


def _extreme_exact(
    values: np.ndarray, k: int, largest: bool, where: np.ndarray, inside: bool, absolute: bool, extra: np.ndarray
) -> np.ndarray:
    domain = np.flatnonzero(where if inside else ~where)
    if extra.size:
        domain = np.concatenate([domain, extra])
    return _pick(domain, _keys(values, domain, absolute), k, largest)


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16
        flat = flat.float()
    return flat.numpy()


def update_mask(
    mask: torch.Tensor,
    drop_score: torch.Tensor,
    grow_score: torch.Tensor,
    drop_fraction: float,
    *,
    scratch: bool = False,
    absolute: bool = False,
    grow_count: int | None = None,
) -> TopologyUpdate:
    """Drops the lowest-scored active weights and grows the highest-scored inactive ones.

    Args:
        mask: bool tensor, True where the connection is active (not modified).
        drop_score: same shape; the active entries with the smallest scores are dropped.
        grow_score: same shape; the entries with the largest scores among those inactive after
            the drop are grown (a just-dropped one may be chosen again).
        drop_fraction: fraction of the active count replaced, in [0, 1].
        scratch: ``grow_score`` is a temporary the caller owns and may be overwritten, which
            saves a weight-sized copy off CPU (on CPU no copy is made either way).
        absolute: drop by ``|drop_score|`` (RigL's magnitude), taken on the active entries only.
        grow_count: how many to grow; by default as many as were dropped. A redistributing
            method (SNFS, RigL-SG/SM) moves active weights between layers with it; 0 only drops
            (magnitude pruning).

    Returns:
        A :class:`TopologyUpdate` whose mask has ``active - k + grow_count`` active entries
        (``k = floor(drop_fraction * active)``): by default exactly as many as ``mask``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"expected a bool mask, got {mask.dtype}")
    if drop_score.shape != mask.shape or grow_score.shape != mask.shape:
        raise ValueError(
            f"expected scores of the mask's shape {tuple(mask.shape)}, got drop "
            f"{tuple(drop_score.shape)} and grow {tuple(grow_score.shape)}"
        )
    active = int(mask.count_nonzero())
    k = drop_count(active, drop_fraction)
    grow_count = k if grow_count is None else grow_count
    room = mask.numel() - active + k  # inactive after the drop, just-dropped ones included
    if isinstance(grow_count, bool) or not isinstance(grow_count, int) or not (0 <= grow_count <= room):
        raise ValueError(
            f"expected grow_count in [0, {room}] (the entries inactive after dropping {k} of "
            f"{active}), got {grow_count!r}"
        )
    return _update(mask, drop_score, grow_score, k, grow_count, scratch, absolute)


def _update(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int, g: int, scratch: bool, absolute: bool
) -> TopologyUpdate:
    on_cpu = mask.device.type == drop_score.device.type == grow_score.device.type == "cpu"
    numeric = drop_score.is_floating_point() and grow_score.is_floating_point()
    if on_cpu and numeric:
        return _update_mask_cpu(mask, drop_score, grow_score, k, g, absolute)
    return _update_mask_torch(mask, drop_score, grow_score, k, g, scratch, absolute)


def prune_mask(mask: torch.Tensor, score: torch.Tensor, count: int) -> TopologyUpdate:
    """Drops the active entries of smallest ``|score|`` until ``count`` remain (masks only
    shrink): the step of gradual magnitude pruning (Zhu & Gupta 2017). Nothing is grown."""
    active = int(mask.count_nonzero())
    if isinstance(count, bool) or not isinstance(count, int) or not (0 <= count <= active):
        raise ValueError(f"expected a count in [0, {active}] (pruning only removes), got {count!r}")
    if score.shape != mask.shape:
        raise ValueError(f"expected a score of the mask's shape {tuple(mask.shape)}, got {tuple(score.shape)}")
    return _update(mask, score, score, active - count, 0, False, True)


def _none(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


def _update_mask_cpu(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int, g: int, absolute: bool
) -> TopologyUpdate:
    flat = mask.reshape(-1).numpy()
    if k == 0 and g == 0:
        return TopologyUpdate(mask, _none(), _none(), 0)
    drop = _extreme(_as_numpy(drop_score), k, False, flat, True, absolute=absolute)
    # grow among the inactive entries and those just dropped (which may come back)
    grow = _extreme(_as_numpy(grow_score), g, True, flat, False, extra=drop)
    return _settle(mask, flat, drop, grow, g)


def _settle(mask: torch.Tensor, flat: np.ndarray, drop: np.ndarray, grow: np.ndarray, g: int) -> TopologyUpdate:
    """The update of dropping ``drop`` and growing ``grow``: a grown entry that was just dropped
    is regrown (neither dropped nor grown)."""
    new = ~flat[grow]
    grown = grow[new]
    dropped = drop
    if grown.size < g:  # some dropped entries came back: they are not dropped after all
        regrown = grow[~new]
        # Mark them by clearing their mask bits for a moment (through numpy, which leaves the
        # tensor's version counter alone): cheaper than a set difference (a sort) of k indices.
        flat[regrown] = False
        dropped = drop[flat[drop]]
        flat[regrown] = True
    return TopologyUpdate(mask, torch.from_numpy(dropped), torch.from_numpy(grown), g - grown.size)


@dataclass(frozen=True)
class GrowthCandidates:
    """What a gradient-grown update needs of one layer's dense growth gradient, kept when the
    backward ends instead of the gradient itself (:func:`growth_candidates`).

    Attributes:
        count: how many the update may grow at most.
        index: flat positions of the ``count`` largest ``|grad|`` among the inactive entries
            (ties by ascending position), in no particular order.
        keys: ``|grad|`` at ``index``.
        active: ``|grad|`` at every active entry, in ascending position (a dropped weight may
            be grown back).
        finite: whether the whole gradient was finite.
    """

    count: int
    index: np.ndarray
    keys: np.ndarray
    active: np.ndarray
    finite: bool

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.keys.nbytes + self.active.nbytes


def growth_candidates(mask: torch.Tensor, grad: torch.Tensor, count: int) -> GrowthCandidates:
    """Reduces a layer's dense growth gradient to what an update growing at most ``count`` by
    ``|grad|`` reads (CPU tensors): the ``count`` best inactive entries and the active ones.

    Exact: the ``g <= count`` entries of largest ``|grad|`` among those inactive after a drop
    (inactive before, or just dropped) are among these, in the same total order (``|grad|``,
    then ascending position) as :func:`update_mask`'s, so :func:`update_from_candidates`
    selects what :func:`update_mask` selects from the dense gradient.
    """
    flat = mask.reshape(-1).numpy()
    values = _as_numpy(grad.contiguous())
    index = _extreme(values, count, True, flat, False, absolute=True)
    keys = np.abs(values[index])
    active = np.compress(flat, values)  # several times faster than values[flat]
    np.abs(active, out=active)
    # one sum (NaN and inf survive it); the exact check only when it is not finite (an overflow)
    finite = bool(np.isfinite(values.sum())) or bool(np.isfinite(values).all())
    return GrowthCandidates(count, index, keys, active, finite)


def merged_candidates(parts: Iterable[tuple[int, GrowthCandidates]], count: int) -> GrowthCandidates:
    """The :func:`growth_candidates` of a whole gradient from those of consecutive blocks of it,
    ``(offset of the block's first entry, its candidates)`` in order: the ``count`` best inactive
    entries of the whole are among the blocks' ``count`` best (the same total order: ``|grad|``,
    then ascending position), and the active entries are the blocks' in turn. Merged as the
    blocks come (at most twice ``count`` entries held)."""
    index, keys = np.zeros(0, np.int64), np.zeros(0)
    active, finite = [], True
    for offset, part in parts:
        index = np.concatenate([index, part.index.astype(np.int64) + offset])
        keys = np.concatenate([keys, part.keys]) if keys.size else part.keys
        if index.size > count:
            best = _best(index, keys, count)
            index, keys = index[best], keys[best]
        active.append(part.active)
        finite = finite and part.finite
    return GrowthCandidates(count, index, keys, np.concatenate(active) if active else np.zeros(0), finite)


def _best(index: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Where the ``k`` largest ``keys`` are (ties by ascending ``index``), as a bool array."""
    rank = keys.size - k
    edge = keys.copy()
    edge.partition(rank)
    kth = edge[rank]
    if kth != kth:  # a NaN among the keys: the whole order, sorted (the update refuses it anyway)
        chosen = np.zeros(keys.size, dtype=bool)
        chosen[np.lexsort((index, -keys))[:k]] = True
        return chosen
    chosen = keys > kth
    ties = np.flatnonzero(keys == kth)
    need = k - int(np.count_nonzero(chosen))
    chosen[ties[np.argsort(index[ties], kind="stable")[:need]]] = True
    return chosen


def update_from_candidates(
    mask: torch.Tensor, drop_score: torch.Tensor, candidates: GrowthCandidates, drop_fraction: float,
    *, absolute: bool = False, active_scores: bool = False,
) -> TopologyUpdate:
    """:func:`update_mask` growing by ``|grad|`` as many as it drops, with the gradient reduced
    to ``candidates`` (:func:`growth_candidates` of the same mask): the same update, CPU only.
    ``active_scores``: ``drop_score`` holds the active entries' scores only, in ascending
    position (a compact layer's values), not a tensor of the mask's shape."""
    flat = mask.reshape(-1).numpy()
    active = int(np.count_nonzero(flat))
    if candidates.active.size != active:
        raise ValueError(f"expected candidates of this mask ({active} active), got {candidates.active.size}")
    k = drop_count(active, drop_fraction)
    if k > candidates.count:
        raise ValueError(
            f"the growth candidates were kept for up to {candidates.count} new connections, but this update "
            f"replaces {k} (drop_fraction {drop_fraction}); keep them for at least {k}, or keep the dense gradient"
        )
    if k == 0:
        return TopologyUpdate(mask, _none(), _none(), 0)
    # the drop, selected among the active entries taken out in ascending position: their rank
    # there orders them as their position does (the same ties), and indexes candidates.active
    kept = _as_numpy(drop_score.contiguous()) if active_scores else np.compress(flat, _as_numpy(drop_score))
    rank = _extreme(kept, k, False, np.ones(kept.size, dtype=bool), True, absolute=absolute)
    drop = np.flatnonzero(flat)[rank]
    index = np.concatenate([candidates.index, drop])
    keys = np.concatenate([candidates.keys, candidates.active[rank]])
    grow = _pick(index, keys, k, True)
    return _settle(mask, flat, drop, grow, k)


def _update_mask_torch(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int, g: int, scratch: bool, absolute: bool
) -> TopologyUpdate:
    flat = mask.reshape(-1)
    if k == 0 and g == 0:
        return TopologyUpdate(mask, _none(mask.device), _none(mask.device), 0)
    active = flat_nonzero(flat)
    # drop: the k smallest scores among the active entries only
    candidates = drop_score.detach().reshape(-1)[active]
    if absolute:
        candidates = candidates.abs_()
    drop = active[top_indices(candidates, k, largest=False)]
    after = flat.clone()
    after[drop] = False
    # grow: the g largest scores among everything inactive now
    scores = grow_score.detach().reshape(-1)
    scores = scores.masked_fill_(after, -math.inf) if scratch else scores.masked_fill(after, -math.inf)
    grow = top_indices(scores, g, largest=True)
    new = ~flat[grow]  # grown entries that were inactive before the update
    grown = grow[new]
    after[grow] = True  # now the new mask: a dropped entry still inactive stayed dropped
    dropped = drop[~after[drop]]
    return TopologyUpdate(mask, dropped, grown, g - grown.numel())


_T = TypeVar("_T")
_R = TypeVar("_R")
_PARALLEL_FROM = 1 << 18  # elements: a smaller layer's selection is not worth a thread hand-off
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def map_layers(fn: Callable[[_T], _R], items: Sequence[_T], sizes: Sequence[int], *, parallel: bool = True) -> list[_R]:
    """``[fn(item) for item in items]``, the large items (by ``sizes``) spread over threads.

    The CPU selection is numpy (introselect, ufuncs, nonzero), which releases the GIL, so the
    layers of one update run concurrently on as many threads as torch uses
    (``torch.get_num_threads()``). The results are in ``items``' order; an item's exception is
    raised once every item has finished. ``fn`` must be safe to call from several threads.
    """
    workers = min(torch.get_num_threads(), os.cpu_count() or 1)
    large = sorted((i for i, n in enumerate(sizes) if n >= _PARALLEL_FROM), key=lambda i: -sizes[i])
    if not parallel or workers < 2 or len(large) < 2:
        return [fn(item) for item in items]
    key = (os.getpid(), workers)  # a pool made before a fork has no threads in the child
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="fxsparse-topology")
    futures = {i: pool.submit(fn, items[i]) for i in large}
    try:  # the small items here, while the pool runs the large ones
        done = {i: fn(item) for i, item in enumerate(items) if i not in futures}
    finally:
        wait(futures.values())  # nothing runs on after this returns or raises
    done.update((i, future.result()) for i, future in futures.items())
    return [done[i] for i in range(len(items))]


@torch.no_grad()
def zero_state_at(tensors: list[torch.Tensor], index: torch.Tensor) -> None:
    """Zeroes every tensor (optimizer state of a weight) at the flat positions ``index``."""
    for tensor in tensors:
        _zero_at(tensor, index)


def _zero_at(tensor: torch.Tensor, index: torch.Tensor, value: float | bool = 0) -> None:
    """Sets the entries at flat (logical, row-major) positions ``index`` to ``value``."""
    if tensor.is_contiguous():
        tensor.view(-1).index_fill_(0, index.to(tensor.device), value)
    else:  # e.g. a channels-last weight, state or mask: go through positions, not memory order
        flags = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
        flags[index.to(tensor.device)] = True
        tensor.masked_fill_(flags.view(tensor.shape), value)


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
    _zero_at(mask, update.dropped_idx, False)
    _zero_at(mask, update.grown_idx, True)
    for changed in (update.dropped_idx, update.grown_idx):
        _zero_at(weight, changed)
        zero_state_at([t for t in state if t.shape == weight.shape], changed)
