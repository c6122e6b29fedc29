"""Growth candidates: an update step that keeps no dense gradient selects what the dense one does.

A RigL update ranks ``|dL/d(w*m)|`` within each layer. When one backward makes the step's
gradient, the scheduler keeps only each layer's best inactive entries and its active ones as the
backward produces them (``fxsparse.topology.growth_candidates``); these tests check that this
selects exactly the dense update, ties included, and that the dense gradient is kept wherever
that would not be exact (accumulation, shared weights, redistribution).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxsparse
from fxsparse import topology


def _case(seed: int, n: int, ties: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(rng.random(n) < rng.uniform(0.02, 0.9))
    if ties == "integers":  # many equal scores, across the inactive and the just-dropped entries
        grad = torch.from_numpy(rng.integers(-3, 4, n).astype(np.float32))
        weight = torch.from_numpy(rng.integers(-4, 5, n).astype(np.float32)) * mask
    elif ties == "zeros":  # a gradient zero nearly everywhere (dead units)
        grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * (rng.random(n) < 0.05))
        weight = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * mask
    else:
        grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        weight = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * mask
    return mask, weight, grad


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**31), n=st.sampled_from([1, 5, 64, 700, 5000]),
    ties=st.sampled_from(["integers", "zeros", "none"]), fraction=st.floats(0.0, 1.0), spare=st.integers(0, 4),
)
def test_candidates_select_what_the_dense_gradient_selects(seed, n, ties, fraction, spare):
    mask, weight, grad = _case(seed, n, ties)
    k = topology.drop_count(int(mask.sum()), fraction)
    dense = topology.update_mask(mask, weight, grad.abs(), fraction, absolute=True)
    reduced = topology.update_from_candidates(
        mask, weight, topology.growth_candidates(mask, grad, k + spare), fraction, absolute=True
    )
    assert torch.equal(dense.mask, reduced.mask)
    assert torch.equal(torch.sort(dense.grown_idx).values, torch.sort(reduced.grown_idx).values)
    assert dense.regrown == reduced.regrown


@pytest.mark.parametrize("ties", ["integers", "zeros", "none"])
def test_candidates_are_exact_on_the_sampled_threshold_path(ties):
    # large layers take the sampled-threshold selection of topology._extreme (and its tie paths)
    for seed in range(12):
        mask, weight, grad = _case(seed, 300_000, ties)
        fraction = (0.05, 0.3, 0.9)[seed % 3]
        k = topology.drop_count(int(mask.sum()), fraction)
        candidates = topology.growth_candidates(mask, grad, k)
        assert candidates.index.size == min(k, int((~mask).sum()))
        dense = topology.update_mask(mask, weight, grad.abs(), fraction, absolute=True)
        reduced = topology.update_from_candidates(mask, weight, candidates, fraction, absolute=True)
        assert torch.equal(dense.mask, reduced.mask), seed


def test_ties_are_broken_by_position_whichever_side_they_are_on():
    # one total order (score, then ascending position): a just-dropped entry and an inactive one
    # of the same score are taken by position, on the small and on the sampled path
    for n in (40, 400_000):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 2:n // 2 + 10] = True
        weight = torch.zeros(n)
        weight[n // 2:n // 2 + 10] = torch.arange(1.0, 11.0)
        grow = torch.zeros(n)  # every score ties at zero: the lowest positions win
        update = topology.update_mask(mask, weight, grow, 0.3, absolute=True)
        assert sorted(update.grown_idx.tolist()) == [0, 1, 2]


def test_a_non_finite_gradient_is_flagged():
    mask, _, grad = _case(0, 100, "none")
    assert topology.growth_candidates(mask, grad, 3).finite
    grad[int((~mask).nonzero()[0])] = float("inf")
    assert not topology.growth_candidates(mask, grad, 3).finite
    grad.fill_(3e38)  # the sum overflows; the entries are finite
    assert topology.growth_candidates(mask, grad, 3).finite


def test_too_few_candidates_or_another_mask_are_refused():
    mask, weight, grad = _case(0, 100, "none")
    candidates = topology.growth_candidates(mask, grad, 2)
    with pytest.raises(ValueError, match="at least"):
        topology.update_from_candidates(mask, weight, candidates, 0.9, absolute=True)
    with pytest.raises(ValueError, match="expected candidates of this mask"):
        topology.update_from_candidates(~mask, weight, candidates, 0.1, absolute=True)


class _Tied(torch.nn.Module):
    """A conv stack and a weight used twice (its gradients are summed: kept dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.shared = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3))
        return self.head(self.shared(torch.tanh(self.shared(h))))


def _train(candidates: bool, opt_name: str, steps: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    sparse = fxsparse.sparsify(_Tied(), 0.2, "erk", dense=[])
    if opt_name == "adamw":
        optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=steps, delta_t=3, end_fraction=1.0,
                                       growth_candidates=candidates)
    gen = torch.Generator().manual_seed(1)
    masks, kept = [], []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        torch.nn.functional.cross_entropy(sparse(x), y).backward()
        kept.append((set(sparse.masker.candidates), set(sparse.masker.grads)))
        if scheduler.step():
            optimizer.step()
        else:
            masks.append({k: v.clone() for k, v in sparse.masks.items()})
        optimizer.zero_grad()
    return sparse, masks, kept


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_a_scheduled_run_with_candidates_equals_one_with_the_dense_gradient(opt_name):
    reduced, masks, kept = _train(True, opt_name)
    dense, dense_masks, dense_kept = _train(False, opt_name)
    assert len(masks) == 8 and len(masks) == len(dense_masks)
    for a, b in zip(masks, dense_masks):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for (name, p), (_, q) in zip(reduced.named_parameters(), dense.named_parameters()):
        assert torch.equal(p, q), name
    # every step ran one backward: each sparse layer kept candidates (a layer budgeted dense grows
    # nothing and keeps its gradient as before); the dense run kept every gradient dense
    sites = reduced._fxsparse.sites
    sparse_layers = {f for f, m in reduced.masks.items() if not bool(m.all())}
    assert len(sparse_layers) >= 3
    update_steps = [i for i in range(len(kept)) if kept[i][0] or kept[i][1]]
    assert update_steps == [2, 5, 8, 11, 14, 17, 20, 23]
    assert all(kept[i] == (sparse_layers, set(sites) - sparse_layers) for i in update_steps)
    assert all(not c and len(g) == 4 for c, g in (dense_kept[i] for i in update_steps))


def test_an_update_step_keeps_far_less_than_the_dense_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    sparse = fxsparse.sparsify(model, 0.1, "uniform", dense=[])
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.01)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=10, delta_t=2, end_fraction=1.0)
    for step in (1, 2):
        sparse(torch.randn(4, 256)).square().mean().backward()
        if step == 2:
            assert sparse.masker.grads == {}
            kept = sum(c.nbytes for c in sparse.masker.candidates.values())
            dense = sum(m.numel() * 4 for m in sparse.masks.values())
            assert 0 < kept < 0.25 * dense  # ~ (density + density * 0.3 * 3) of the dense bytes
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()
    assert scheduler.last_changes and all(c.grown > 0 for c in scheduler.last_changes.values())


def test_accumulation_starting_on_an_update_step_raises_then_runs_on_the_dense_gradient():
    def make():
        torch.manual_seed(0)
        sparse = fxsparse.sparsify(torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(), torch.nn.Linear(40, 20)), 0.3)
        optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
        return sparse, optimizer, fxsparse.RigLScheduler(sparse, optimizer, total_steps=10, delta_t=2, end_fraction=1.0)

    gen = torch.Generator().manual_seed(0)
    first, micro = torch.randn(4, 20, generator=gen), [torch.randn(4, 20, generator=gen) for _ in range(2)]
    sparse, optimizer, scheduler = make()
    reference, ref_opt, ref_sched = make()
    ref_sched.growth_candidates = False
    for module, opt, sched in ((sparse, optimizer, scheduler), (reference, ref_opt, ref_sched)):
        module(first).square().mean().backward()  # step 1: one backward
        assert sched.step()
        opt.step()
        opt.zero_grad()
    before = {k: v.clone() for k, v in sparse.masks.items()}
    for x in micro:  # step 2, an update step, accumulated over two micro-batches
        sparse(x).square().mean().backward()
    with pytest.raises(RuntimeError, match="more than one backward"):
        scheduler.step()
    assert all(torch.equal(before[k], v) for k, v in sparse.masks.items())
    optimizer.zero_grad()
    for module in (sparse, reference):  # the step run again: now on the dense, summed gradient
        for x in micro:
            module(x).square().mean().backward()
    assert sparse.masker.candidates == {} and set(sparse.masker.grads) == set(sparse.masks)
    assert not scheduler.step() and not ref_sched.step()
    assert all(torch.equal(reference.masks[k], v) for k, v in sparse.masks.items())


def test_candidates_are_refused_by_an_update_that_needs_the_dense_gradient():
    sparse = fxsparse.sparsify(torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(), torch.nn.Linear(40, 20)), 0.3)
    counts = {fqn: topology.drop_count(site.active, 0.3) for fqn, site in sparse._fxsparse.sites.items()}
    sparse.arm_growth(True, candidates=counts)
    sparse(torch.randn(4, 20)).square().mean().backward()
    before = copy.deepcopy(sparse.masks)
    with pytest.raises(ValueError, match="growth candidates"):
        sparse.rigl_step(0.3, redistribute="score")
    with pytest.raises(ValueError, match="keep them for at least"):
        sparse.rigl_step(0.6)  # more than they were kept for
    assert all(torch.equal(before[k], v) for k, v in sparse.masks.items())
    sparse.rigl_step(0.3)  # RigL ranks them
    sparse.verify()
