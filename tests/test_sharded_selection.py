"""The sharded topology update (fxsparse.sharding.plan) selects what one process selects from the
whole tensor, for every split of the rows over ranks: a property over adversarial inputs (all
scores equal, few distinct values so that ties cross shard boundaries, rows not divisible by
the number of ranks, empty shards, k beyond a shard's candidates, k = 0).

The ranks are threads here and their all_gather a barrier (the same code path as under
torch.distributed except for the transport); tests/test_fsdp.py runs it on 2 gloo processes."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsparse import sharding, topology


class _ThreadGather:
    """all_gather among ``ranks`` threads."""

    def __init__(self, ranks: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * ranks
        self.barrier = threading.Barrier(ranks)
        self.calls = 0

    def of(self, rank: int):
        def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            out = [s.clone() for s in self.slots]
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return out
        return gather


def _row_split(rows: int, ranks: int) -> list[tuple[int, int]]:
    """FSDP2's Shard(0) split (torch.chunk): ceil(rows / ranks) rows a rank, the last ones short or empty."""
    size = math.ceil(rows / ranks)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(ranks)]


def sharded_plan(mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor, k: int, g: int, absolute: bool, ranks: int):
    row = math.prod(mask.shape[1:])
    gather = _ThreadGather(ranks)
    results: list = [None] * ranks
    errors: list = []

    def run(rank: int) -> None:
        start, stop = _row_split(mask.shape[0], ranks)[rank]
        part = slice(start * row, stop * row)
        try:
            results[rank] = sharding.plan(
                mask.reshape(-1)[part].numpy(), drop.reshape(-1)[part].numpy(), grow.reshape(-1)[part].numpy(),
                k, g, absolute, start * row, gather.of(rank),
            )
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            errors.append(error)
            gather.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results, gather.calls


@st.composite
def _cases(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    ranks = draw(st.integers(1, 5))
    n = rows * cols
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).reshape(rows, cols)
    kind = draw(st.sampled_from(["equal", "few", "signed", "spread"]))

    def scores():
        if kind == "equal":
            return torch.full((rows, cols), 0.5, dtype=torch.float64)
        if kind == "few":  # ties everywhere, across every boundary
            return torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=n, max_size=n)), dtype=torch.float64).reshape(rows, cols)
        if kind == "signed":
            return torch.tensor(draw(st.lists(st.sampled_from([-2.0, -1.0, 1.0, 2.0]), min_size=n, max_size=n)), dtype=torch.float64).reshape(rows, cols)
        return torch.tensor(draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=n, max_size=n)), dtype=torch.float64).reshape(rows, cols)

    drop, grow = scores(), scores().abs()
    active = int(mask.sum())
    k = draw(st.integers(0, active))
    g = draw(st.integers(0, n - active + k))
    return mask, drop, grow, k, g, draw(st.booleans()), ranks


@settings(max_examples=200, deadline=None)
@given(_cases())
def test_sharded_update_is_the_one_process_update_for_every_split(case):
    mask, drop, grow, k, g, absolute, ranks = case
    whole = topology._update(mask.clone(), drop, grow, k, g, False, absolute)
    results, calls = sharded_plan(mask, drop, grow, k, g, absolute, ranks)
    for dropped, grown, regrown in results:  # every rank holds the same, global update
        assert np.array_equal(np.sort(dropped), np.sort(whole.dropped_idx.numpy()))
        assert np.array_equal(np.sort(grown), np.sort(whole.grown_idx.numpy()))
        assert regrown == whole.regrown
    assert calls == (k > 0) + (g > 0)  # k = 0: no collective at all


def test_ties_across_the_shard_boundary_go_to_the_lower_position():
    # every score equal: the drop takes the 3 active entries of lowest position (2, 3, 4; rank 0
    # holds rows 0-2, rank 1 rows 3-4), the growth the 3 lowest of those inactive after it (0, 1,
    # and 2 again, which keeps its value)
    mask = torch.ones(5, 2, dtype=torch.bool)
    mask[0] = False
    scores = torch.ones(5, 2, dtype=torch.float64)
    results, _ = sharded_plan(mask, scores, scores, 3, 3, True, 2)
    whole = topology._update(mask.clone(), scores, scores, 3, 3, False, True)
    assert results[0][0].tolist() == results[1][0].tolist() == sorted(whole.dropped_idx.tolist()) == [3, 4]
    assert results[0][1].tolist() == results[1][1].tolist() == sorted(whole.grown_idx.tolist()) == [0, 1]
    assert results[0][2] == results[1][2] == whole.regrown == 1


def test_a_rank_without_rows_takes_part_and_selects_nothing_of_its_own():
    mask = torch.tensor([[True, False], [False, True]])
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    results, calls = sharded_plan(mask, scores, scores, 1, 1, True, 4)  # ranks 2 and 3 hold no rows
    assert calls == 2
    assert all(r[0].tolist() == [0] and r[1].tolist() == [2] for r in results)


def test_merge_refuses_nothing_and_keeps_one_total_order():
    parts = [(np.array([5, 1]), np.array([1.0, 1.0])), (np.array([3]), np.array([1.0])), (np.empty(0, np.int64), np.empty(0))]
    assert sharding.merge(parts, 2, True).tolist() == [1, 3]
    assert sharding.merge(parts, 0, True).tolist() == []
    assert sharding.merge(parts, 9, False).tolist() == [1, 3, 5]


@pytest.mark.parametrize("k", [0, 1, 4])
def test_gathered_bytes(k):
    assert sharding.gathered_bytes(k, 8) == 16 * k * 8
