"""Sharded weights (FSDP2's ``fully_shard``): masks, zeroing and the exact topology update on shards.

``fully_shard`` makes every parameter of the modules it wraps a DTensor sharded along dim 0
(``Shard(0)`` on a 1-D mesh; ``(Replicate(), Shard(0))`` under HSDP): each rank holds a run of
rows, which is a run of flat (row-major) positions ``[offset, offset + numel)``. FSDP gathers a
module's weights for its forward and backward and frees them after; what persists, and what the
optimizer steps, is the shard. So everything fxsparse does to a weight is done to its shard:

- **Masks are sharded like their weights** (:func:`shard_masks`): the same mesh, placements and
  rows, made from the rank's rows of the full mask (every rank holds the same full mask before,
  from the same seed), so no rank keeps a full-size mask.
- **Zeroing acts on the shard** (:func:`zero_shards`, run by the sparse module's ``__call__``
  before FSDP's own pre-forward gathers anything): the gathered weight then holds exact zeros at
  every inactive position, so the forward computes with ``w * m`` without reading a mask, and a
  write into a gathered copy (which FSDP discards at reshard) never happens.
- **The gradient mask acts on the shard**: FSDP runs a sharded parameter's post-accumulate-grad
  hooks with the reduce-scattered (already averaged) ``Shard(0)`` gradient; the masker masks its
  local part when the backward ends and, on growth steps, keeps that dense local part first
  (the growth gradient ``dL/d(w*m)``: the forward read ``w == w * m``).
- **The exact topology** (:func:`update_mask`): one total order, (score, then flat position),
  selects on every shard split what one process selects. Each rank selects its best
  ``min(k, local candidates)`` under that order (a rank's share of the global best ``k`` is among
  its local best ``k``), the ranks all-gather them (position and key, 12 bytes a candidate,
  padded to ``k``), and every rank merges the same list into the same ``k``. The drop runs
  first, then the growth among the positions inactive after it (a just-dropped one may come
  back). Ties across the shard boundary, empty shards, ``k`` beyond a shard's candidates and
  ``k == 0`` (no collective at all) follow from that order. The update is written by global
  position; each rank applies the positions in its rows to its shards of the weight, mask and
  optimizer state (:func:`apply_update`).

Nothing here runs unless a sparse weight is a DTensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxsparse.topology import TopologyUpdate, _as_numpy, _extreme, _keys, _pick, _zero_at, drop_count

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["is_sharded", "local", "Span", "span_of", "shard_like", "shard_masks", "sharded_sites",
           "rows_of", "all_sum", "all_true", "select", "gathered_bytes",
           "update_mask", "apply_update", "local_scores", "count_active"]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter ``fully_shard`` sharded, its mask, its state)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a DTensor (its storage: writes reach the shard), else ``tensor``."""
    return tensor._local_tensor if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class Span:
    """Where a rank's shard lies in the whole tensor: flat positions ``[offset, offset + numel)``.

    Attributes:
        offset: the flat position of the shard's first element.
        numel: elements in the shard (0 for an empty shard: more ranks than rows).
        group: the process group of the sharded mesh dimension (the ranks that split the rows).
        ranks: how many ranks split the rows.
    """

    offset: int
    numel: int
    group: Any
    ranks: int

    def holds(self, index: np.ndarray) -> np.ndarray:
        """The local positions of those global ``index`` entries that lie in this shard."""
        inside = (index >= self.offset) & (index < self.offset + self.numel)
        return index[inside] - self.offset


def span_of(tensor: torch.Tensor) -> Span:
    """The :class:`Span` of a DTensor sharded by rows. Raises ValueError for another sharding."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    if len(sharded) != 1 or placements[sharded[0]].dim != 0 or not all(
            isinstance(p, (Shard, Replicate)) for p in placements):
        raise ValueError(
            f"fxsparse: a sparse weight is sharded as {placements} on a {mesh.ndim}-D mesh; fxsparse supports "
            "row sharding, one Shard(0) (FSDP2's fully_shard, HSDP's (Replicate(), Shard(0))). Shard sparse "
            "weights with fully_shard's default shard_placement_fn"
        )
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    row = math.prod(tensor.shape[1:])
    dim = sharded[0]
    return Span(offset[0] * row, math.prod(shape), mesh.get_group(dim), mesh.size(dim))


def rows_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the whole-tensor ``full`` (of ``like``'s global shape), as ``like``'s
    local part is laid out: a new tensor (no view keeps ``full`` alive)."""
    span = span_of(like)
    return full.reshape(-1)[span.offset: span.offset + span.numel].reshape(like._local_tensor.shape).clone()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (every rank holds the same whole tensor) as a DTensor of ``like``'s mesh,
    placements and rows: each rank keeps its rows only; no communication."""
    assert DTensor is not None
    part = rows_of(full, like).to(local(like).device)
    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=_contiguous_stride(like.shape))


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))


def sharded_sites(sparse: Any) -> list[str]:
    """The sparse weights of ``sparse`` that are DTensors (empty when it is not sharded)."""
    return [fqn for fqn, site in sparse._fxsparse.sites.items() if not site.compact and is_sharded(sparse._leaf_weight(fqn))]


def shard_masks(sparse: Any) -> bool:
    """Makes every mask of a sharded weight a DTensor sharded like it (idempotent); True when
    any sparse weight is sharded. Raises ValueError before any change for what cannot be
    sharded: a compact layer, a parametrized weight."""
    sites = sparse._fxsparse.sites
    names = sharded_sites(sparse)
    if not names:
        return False
    compact = [fqn for fqn, site in sites.items() if site.compact]
    if compact:
        raise ValueError(
            f"fxsparse: {len(compact)} layer(s) use the compact layout ({compact[0]!r} ...), which stores a layer as "
            "its active values and cannot be sharded by fully_shard; sparsify with layout='masked' to train under FSDP"
        )
    for fqn in names:
        site = sites[fqn]
        weight = sparse._leaf_weight(fqn)
        owner_name, _, name = site.mask.rpartition(".")
        owner = sparse.get_submodule(owner_name)
        mask = owner._buffers[name]
        if is_sharded(mask):
            if mask.device_mesh != weight.device_mesh or tuple(mask.placements) != tuple(weight.placements):
                raise ValueError(f"fxsparse: the mask of {fqn} is sharded unlike its weight; shard the weight only")
            continue
        if mask.shape != weight.shape:
            raise ValueError(f"fxsparse: the mask of {fqn} has shape {tuple(mask.shape)}, its weight {tuple(weight.shape)}")
        owner._buffers[name] = shard_like(mask.to(torch.bool), weight)
    return True


# --------------------------------------------------------------------------- collectives
def _world(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def all_sum(value: int | float, group: Any = None, dtype: torch.dtype = torch.int64) -> Any:
    """The sum of ``value`` over the ranks of ``group`` (a scalar all-reduce)."""
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=dtype)
    dist.all_reduce(tensor, group=group)
    return tensor.item()


def all_true(flag: bool, group: Any = None) -> bool:
    """Whether ``flag`` holds on every rank of ``group``."""
    return all_sum(0 if flag else 1, group) == 0


# Selection: the positions and keys of one selection travel as one int64 tensor per rank
# (positions, then the keys' float64 bits), padded to k: one all_gather.
_PAD = -1


def gathered_bytes(k: int, ranks: int) -> int:
    """The bytes one rank receives in one :func:`select` of ``k`` over ``ranks`` ranks."""
    return 0 if k <= 0 else 16 * k * ranks


def select(
    values: np.ndarray, k: int, largest: bool, where: np.ndarray, inside: bool, span: Span, *,
    absolute: bool = False, extra: np.ndarray | None = None,
) -> np.ndarray:
    """The global flat positions of the ``k`` largest (smallest) keys over the domain split
    across the ranks of ``span``: each rank's domain is its local positions ``i`` with
    ``where[i] == inside`` plus its local ``extra`` positions; keys are ``values`` (``|values|``
    with ``absolute``). The same array on every rank, ties by ascending global position: what
    :func:`fxsparse.topology._extreme` selects from the whole tensor. A collective (unless
    ``k <= 0``): every rank of the group calls it with the same ``k``."""
    import torch.distributed as dist

    if k <= 0:
        return np.empty(0, dtype=np.int64)
    mine = _extreme(values, k, largest, where, inside, absolute=absolute, extra=extra) if values.size else np.empty(0, np.int64)
    keys = _keys(values, mine, absolute).astype(np.float64)
    packed = torch.full((2 * k,), _PAD, dtype=torch.int64)
    packed[: mine.size] = torch.from_numpy(mine.astype(np.int64) + span.offset)
    packed[k: k + mine.size] = torch.from_numpy(keys).view(torch.int64)
    parts = [torch.empty_like(packed) for _ in range(span.ranks)]
    dist.all_gather(parts, packed, group=span.group)
    index = np.concatenate([p[:k].numpy() for p in parts])
    key = np.concatenate([p[k:].view(torch.float64).numpy() for p in parts])
    valid = index != _PAD
    index, key = index[valid], key[valid]
    if index.size == 0:
        return index
    # duplicates arrive from replicas (HSDP's replicate dimension is not in the group: none here)
    return np.sort(_pick(index, key, k, largest))


# ----------------------------------------------------------------------- the topology update
def local_scores(score: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rank's part of a score for the sharded ``like``: a DTensor's local part, or the rows
    of a whole-tensor score (SET's random scores, drawn whole so that every shard split draws
    the same numbers)."""
    if is_sharded(score):
        return score._local_tensor
    if tuple(score.shape) != tuple(like.shape):
        raise ValueError(f"expected a score of the weight's shape {tuple(like.shape)}, got {tuple(score.shape)}")
    return rows_of(score, like)


def count_active(mask: torch.Tensor) -> int:
    """The active entries of a sharded mask, over all its shards."""
    span = span_of(mask)
    return int(all_sum(int(mask._local_tensor.count_nonzero()), span.group))


def update_mask(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int, g: int, absolute: bool,
) -> TopologyUpdate:
    """:func:`fxsparse.topology.update_mask`'s selection on a sharded mask (drop ``k``, grow
    ``g``): the same update as one process makes from the whole tensors, by global position."""
    span = span_of(mask)
    flat = mask._local_tensor.reshape(-1).numpy()
    drop = select(_as_numpy(local_scores(drop_score, mask)), k, False, flat, True, span, absolute=absolute)
    grow = select(_as_numpy(local_scores(grow_score, mask)), g, True, flat, False, span, extra=span.holds(drop))
    back = np.isin(grow, drop, assume_unique=True)  # dropped and grown again: it keeps its value
    dropped = drop[~np.isin(drop, grow[back], assume_unique=True)]
    return TopologyUpdate(mask, torch.from_numpy(dropped), torch.from_numpy(grow[~back]), int(back.sum()))


def prune_counts(mask: torch.Tensor, count: int) -> tuple[int, int]:
    """(active, how many a prune to ``count`` drops) of a sharded mask."""
    active = count_active(mask)
    return active, active - count


def drop_and_grow_counts(mask: torch.Tensor, drop_fraction: float, grow_count: int | None) -> tuple[int, int, int]:
    """(active, k, g) of a sharded mask's update: counted over all shards."""
    active = count_active(mask)
    k = drop_count(active, drop_fraction)
    return active, k, k if grow_count is None else grow_count


@torch.no_grad()
def apply_update(weight: torch.Tensor, mask: torch.Tensor, update: TopologyUpdate, state: list[torch.Tensor] = ()) -> None:  # type: ignore[assignment]
    """:func:`fxsparse.topology.apply_update` on shards: each rank writes the positions in its
    rows into its part of the mask, the weight and every state tensor of the weight's shape."""
    span = span_of(mask)
    dropped = torch.from_numpy(span.holds(update.dropped_idx.numpy()))
    grown = torch.from_numpy(span.holds(update.grown_idx.numpy()))
    _zero_at(local(mask), dropped, False)
    _zero_at(local(mask), grown, True)
    changed = torch.cat([dropped, grown])
    for tensor in [weight, *(t for t in state if tuple(t.shape) == tuple(weight.shape))]:
        _zero_at(local(tensor), changed)
