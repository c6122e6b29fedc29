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
  its local best ``k``), the ranks all-gather them (position and key, 16 bytes a candidate,
  padded to ``k``; on large layers only those beyond a sampled threshold, :func:`select`), and every rank merges the same list into the same ``k``. The drop runs
  first, then the growth among the positions inactive after it (a just-dropped one may come
  back). Ties across the shard boundary, empty shards, ``k`` beyond a shard's candidates and
  ``k == 0`` (no collective at all) follow from that order. The update is written by global
  position; each rank applies the positions in its rows to its shards of the weight, mask and
  optimizer state (:func:`apply_update`).

Nothing here runs unless a sparse weight is a DTensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxsparse.topology import TopologyUpdate, _as_numpy, _extreme, _keys, _pick, _zero_at

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["is_sharded", "local", "Span", "span_of", "shard_like", "shard_masks", "sharded_sites",
           "rows_of", "all_sum", "all_true", "all_true_each", "candidates", "merge", "select", "plan", "all_gather_in", "traffic", "THRESHOLD_FROM", "ThreadGather", "simulate",
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
    from fxsparse.layouts import layout_of  # the layouts use this module's collectives

    return [fqn for fqn in sparse._fxsparse.sites if layout_of(sparse, fqn).keeps_parameter
            and is_sharded(sparse._leaf_weight(fqn))]


def shard_masks(sparse: Any) -> int:
    """Makes every mask of a sharded weight a DTensor sharded like it (idempotent); returns how
    many it sharded now. Raises ValueError before any change for what cannot be sharded: a
    compact layer, a block whose forward never runs, a weight read through a computed kernel."""
    sites = sparse._fxsparse.sites
    names = sharded_sites(sparse)
    if not names:
        return 0
    if not any(not is_sharded(sparse._mask(fqn)) for fqn in names):
        return 0
    _refuse_inlined_blocks(sparse)
    from fxsparse.layouts import layout_of

    held = [fqn for fqn in sites if not layout_of(sparse, fqn).shardable]
    if held:
        layout = sites[held[0]].layout
        raise ValueError(
            f"fxsparse: {len(held)} layer(s) use the {layout} layout ({held[0]!r} ...), which fully_shard cannot shard "
            "(it stores a layer as its own tensors, not the module's Parameter); sparsify with layout='masked' to "
            "train under FSDP"
        )
    kernels = [fqn for fqn in names if getattr(sites[fqn], "kernel", "")]
    if kernels:
        raise ValueError(
            f"fxsparse: {len(kernels)} sharded weight(s) are read through a kernel computed from them "
            f"({kernels[0]!r} ...: weight standardization), whose mask and growth gradient are not sharded yet; "
            "leave those layers unsharded (fully_shard the other blocks), or train without FSDP"
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
    return len(names)


def _refuse_inlined_blocks(sparse: Any) -> None:
    """Raises ValueError when ``fully_shard`` wrapped a submodule whose forward never runs (the
    graph inlines it): FSDP would never gather its weights."""
    from torch.distributed.fsdp import FSDPModule

    stray = [name for name, module in sparse.named_modules()  # a kept block's class says so (SparseBlock)
             if name and isinstance(module, FSDPModule) and not getattr(type(module), "fxsparse_block", False)]
    if stray:
        raise ValueError(
            f"fxsparse: fully_shard wrapped {stray[0]!r}{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}, "
            "whose forward never runs: the sparse module's graph computes it inline, so FSDP would never gather "
            "its weights. Call sparse.keep_blocks() (the model's repeated blocks; or keep_blocks(['path', ...])) "
            "right after sparsify and before fully_shard, and wrap the blocks it returns: "
            "for path in sparse.keep_blocks(): fully_shard(sparse.get_submodule(path))"
        )


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


def all_true_each(flags: list[bool], group: Any = None) -> list[bool]:
    """Per entry, whether it holds on every rank of ``group``: one all-reduce for all of them."""
    import torch.distributed as dist

    if not flags:
        return []
    tensor = torch.tensor([0 if f else 1 for f in flags], dtype=torch.int64)
    dist.all_reduce(tensor, group=group)
    return [int(v) == 0 for v in tensor]


# Selection: the positions and keys of one selection travel as one int64 tensor per rank
# (positions, then the keys' float64 bits), padded to k: one all_gather.
_PAD = -1


def candidates(
    values: np.ndarray, k: int, largest: bool, where: np.ndarray, inside: bool, offset: int, *,
    absolute: bool = False, extra: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One rank's part of a selection: the global positions and keys (float64) of the best
    ``min(k, domain)`` of its shard (which starts at flat position ``offset``) under the order
    (key, then position); its domain is its local positions ``i`` with ``where[i] == inside``
    plus its local ``extra`` positions; keys are ``values`` (``|values|`` with ``absolute``).
    Whatever the global best ``k`` hold of this shard is among these."""
    if k <= 0 or values.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    mine = _extreme(values, k, largest, where, inside, absolute=absolute, extra=extra)
    return mine.astype(np.int64) + offset, _keys(values, mine, absolute).astype(np.float64)


def merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int, largest: bool) -> np.ndarray:
    """The global best ``k`` (ascending positions) of every rank's :func:`candidates`: one
    total order, (key, then position), whatever the split."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    index = np.concatenate([p[0] for p in parts])
    key = np.concatenate([p[1] for p in parts])
    if index.size == 0:
        return index
    return np.sort(_pick(index, key, k, largest))


Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every rank's tensor of one all_gather, in rank order


@dataclass
class Traffic:
    """What the topology updates of this process received: collectives and bytes (the
    all_gathers of the selections; the scalar all-reduces of counts are not counted)."""

    collectives: int = 0
    received: int = 0


traffic = Traffic()  # read (and reset) by benchmarks/fsdp.py


def all_gather_in(group: Any, ranks: int) -> Gather:
    """The all_gather of ``group`` (``ranks`` ranks) as a :data:`Gather`."""
    import torch.distributed as dist

    def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(ranks)]
        dist.all_gather(out, tensor, group=group)
        traffic.collectives += 1
        traffic.received += ranks * tensor.numel() * tensor.element_size()
        return out

    return gather


# From this many candidates a rank could send (k times the ranks), a selection first finds a
# threshold that the global best k all reach, from a sample of every rank's candidates, and each
# rank sends only those beyond it: what a rank receives stays near k entries whatever the number
# of ranks (instead of k from every rank). Below it, one all_gather of everything costs less.
THRESHOLD_FROM = 1 << 16
_SAMPLES_PER_RANK = 8  # quantiles of its candidates a rank shares per rank in the group


def select(
    values: np.ndarray, k: int, largest: bool, where: np.ndarray, inside: bool, offset: int, gather: Gather, ranks: int, *,
    absolute: bool = False, extra: np.ndarray | None = None,
) -> np.ndarray:
    """The global flat positions of the ``k`` largest (smallest) keys over a domain split across
    ranks (this rank's part described as in :func:`candidates`): the same array on every rank,
    ties by ascending global position, what :func:`fxsparse.topology._extreme` selects from the
    whole tensor. A collective through ``gather`` (unless ``k <= 0``): every rank calls it with
    the same ``k``.

    Each rank's best ``min(k, domain)`` are candidates. With few of them overall (below
    :data:`THRESHOLD_FROM`) every rank sends all of its own, padded to ``k`` (positions, then
    the keys' float64 bits, one int64 tensor). Otherwise three rounds: every rank shares
    quantiles of its candidates' keys (``q`` candidates at least as good as key ``s``); every
    rank computes the same threshold ``T``, the best sampled key whose guaranteed count over the
    ranks reaches ``k``, so the global ``k``-th key is at least as good as ``T`` and every one of
    the best ``k`` is among the candidates as good as ``T``; the ranks share how many those are,
    and send only them, padded to the largest count."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    index, keys = candidates(values, k, largest, where, inside, offset, absolute=absolute, extra=extra)
    if ranks > 1 and k * ranks >= THRESHOLD_FROM:
        index, keys = _beyond_threshold(index, keys, k, largest, ranks, gather)
        width = int(max(t.item() for t in gather(torch.tensor([index.size], dtype=torch.int64))))
    else:
        width = k
    if width == 0:
        return np.empty(0, dtype=np.int64)
    packed = torch.full((2 * width,), _PAD, dtype=torch.int64)
    packed[: index.size] = torch.from_numpy(index)
    packed[width: width + index.size] = torch.from_numpy(keys).view(torch.int64)
    parts = []
    for part in gather(packed):
        valid = part[:width] != _PAD
        parts.append((part[:width][valid].numpy(), part[width:].view(torch.float64)[valid].numpy()))
    return merge(parts, k, largest)


def _beyond_threshold(
    index: np.ndarray, keys: np.ndarray, k: int, largest: bool, ranks: int, gather: Gather,
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's candidates as good as the threshold every rank computes alike (see :func:`select`)."""
    samples = _SAMPLES_PER_RANK * ranks
    order = np.argsort(-keys if largest else keys, kind="stable")  # best first
    best = keys[order]
    packed = torch.full((2 * samples,), _PAD, dtype=torch.int64)  # (count, key bits) pairs
    if best.size:  # the count at a quantile, and the key there
        counts = np.unique(np.ceil(np.arange(1, samples + 1) * best.size / samples).astype(np.int64))
        packed[: counts.size] = torch.from_numpy(counts)
        packed[samples: samples + counts.size] = torch.from_numpy(best[counts - 1].astype(np.float64)).view(torch.int64)
    pairs = []  # of every rank: sampled keys, best first, and how many of its candidates are at least as good
    for part in gather(packed):
        valid = part[:samples] != _PAD
        pairs.append((part[samples:].view(torch.float64)[valid].numpy(), part[:samples][valid].numpy()))
    tried = np.unique(np.concatenate([p[0] for p in pairs]))
    tried = tried[::-1] if largest else tried  # best first
    guaranteed = np.zeros(tried.size, dtype=np.int64)  # over the ranks, at least this many as good as each
    for sampled, counts in pairs:
        if sampled.size:
            reach = np.searchsorted(-sampled, -tried, side="right") if largest else np.searchsorted(sampled, tried, side="right")
            guaranteed += np.where(reach > 0, counts[np.maximum(reach - 1, 0)], 0)
    enough = np.flatnonzero(guaranteed >= k)
    if enough.size == 0:  # fewer than k candidates in all: every one of them
        return index, keys
    threshold = tried[enough[0]]  # the best threshold whose guaranteed count reaches k
    keep = keys >= threshold if largest else keys <= threshold
    return index[keep], keys[keep]


def plan(
    flat: np.ndarray, drop_values: np.ndarray, grow_values: np.ndarray, k: int, g: int, absolute: bool, offset: int,
    gather: Gather, ranks: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One rank's part of a sharded drop-and-grow: (dropped, grown, regrown) by global position,
    the same on every rank. ``flat``: the rank's mask part (flat bool); ``drop_values`` /
    ``grow_values``: its scores; drop ``k`` by (|score| with ``absolute``), then grow ``g``
    among the positions inactive after the drop (a just-dropped one may come back: regrown)."""
    drop = select(drop_values, k, False, flat, True, offset, gather, ranks, absolute=absolute)
    mine = drop[(drop >= offset) & (drop < offset + flat.size)] - offset
    grow = select(grow_values, g, True, flat, False, offset, gather, ranks, extra=mine)
    back = np.isin(grow, drop, assume_unique=True)  # dropped and grown again: it keeps its value
    dropped = drop[~np.isin(drop, grow[back], assume_unique=True)]
    return dropped, grow[~back], int(back.sum())


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
    """The active entries of a mask; of a sharded one, over all its shards (a collective)."""
    if not is_sharded(mask):
        return int(mask.count_nonzero())
    span = span_of(mask)
    return int(all_sum(int(mask._local_tensor.count_nonzero()), span.group))


def update_mask(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int, g: int, absolute: bool,
) -> TopologyUpdate:
    """:func:`fxsparse.topology.update_mask`'s selection on a sharded mask (drop ``k``, grow
    ``g``): the same update as one process makes from the whole tensors, by global position."""
    span = span_of(mask)
    flat = mask._local_tensor.reshape(-1).numpy()
    drop, grow = _as_numpy(local_scores(drop_score, mask)), _as_numpy(local_scores(grow_score, mask))
    dropped, grown, regrown = plan(flat, drop, grow, k, g, absolute, span.offset, all_gather_in(span.group, span.ranks), span.ranks)
    return TopologyUpdate(mask, torch.from_numpy(dropped), torch.from_numpy(grown), regrown)


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


# ------------------------------------------------------------------- one process, many ranks
class ThreadGather:
    """all_gather among ``ranks`` threads of one process, counting what rank 0 receives: to run
    the sharded update of a whole tensor as any number of ranks would (:func:`simulate`)."""

    def __init__(self, ranks: int) -> None:
        import threading

        self.slots: list[torch.Tensor | None] = [None] * ranks
        self.barrier = threading.Barrier(ranks)
        self.collectives = 0
        self.received = 0  # bytes, by rank 0

    def of(self, rank: int) -> Gather:
        def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            out = [slot.clone() for slot in self.slots if slot is not None]
            self.barrier.wait()
            if rank == 0:
                self.collectives += 1
                self.received += sum(t.numel() * t.element_size() for t in out)
            return out

        return gather


def simulate(
    mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor, k: int, g: int, absolute: bool, ranks: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], ThreadGather]:
    """:func:`plan` of whole tensors split by rows over ``ranks`` ranks (FSDP2's split: ceil(rows
    / ranks) rows a rank, the last ones short or empty), the ranks as threads: every rank's result
    and the gather (collectives, bytes rank 0 received)."""
    import threading

    rows = mask.shape[0]
    row = math.prod(mask.shape[1:])
    size = math.ceil(rows / ranks)
    gather = ThreadGather(ranks)
    results: list[Any] = [None] * ranks
    errors: list[BaseException] = []
    flat_mask, flat_drop, flat_grow = mask.reshape(-1).numpy(), _as_numpy(drop), _as_numpy(grow)

    def run(rank: int) -> None:
        start, stop = min(rank * size, rows) * row, min((rank + 1) * size, rows) * row
        try:
            results[rank] = plan(flat_mask[start:stop], flat_drop[start:stop], flat_grow[start:stop], k, g, absolute,
                                 start, gather.of(rank), ranks)
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(error)
            gather.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, gather
