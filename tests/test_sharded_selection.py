"""The sharded topology update (fxsparse.sharding.plan) selects what one process selects from the
whole tensor, for every split of the rows over ranks: a property over adversarial inputs (all
scores equal, few distinct values so that ties cross shard boundaries, rows not divisible by
the number of ranks, empty shards, k beyond a shard's candidates, k = 0).

The ranks are threads here and their all_gather a barrier (the same code path as under
torch.distributed except for the transport); tests/test_fsdp.py runs it on 2 gloo processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsparse import sharding, topology


def sharded_plan(mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor, k: int, g: int, absolute: bool, ranks: int):
    results, gather = sharding.simulate(mask, drop, grow, k, g, absolute, ranks)
    return results, gather.collectives


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


@pytest.mark.parametrize("threshold", [False, True], ids=["one round", "threshold"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_sharded_update_is_the_one_process_update_for_every_split(case, threshold, monkeypatch):  # the same patch each example
    # "threshold": every selection of more than one rank takes the three-round path (a sampled
    # threshold, then only the candidates beyond it), as a large layer does
    monkeypatch.setattr(sharding, "THRESHOLD_FROM", 1 if threshold else 1 << 16)
    mask, drop, grow, k, g, absolute, ranks = case
    whole = topology._update(mask.clone(), drop, grow, k, g, False, absolute)
    results, calls = sharded_plan(mask, drop, grow, k, g, absolute, ranks)
    for dropped, grown, regrown in results:  # every rank holds the same, global update
        assert np.array_equal(np.sort(dropped), np.sort(whole.dropped_idx.numpy()))
        assert np.array_equal(np.sort(grown), np.sort(whole.grown_idx.numpy()))
        assert regrown == whole.regrown
    rounds = 3 if threshold and ranks > 1 else 1
    assert calls <= rounds * ((k > 0) + (g > 0))  # k = 0: no collective at all
    assert calls >= (k > 0) + (g > 0)


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

