"""A method is its hooks: a subclass that overrides drop scores and grow counts is run by the one
update loop with every invariant kept (total count, zero-started growth, zeroed optimizer state),
and the loop follows exactly what the hooks say."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from invariants import assert_inactive_zero_grad
from strategies import build, net_specs

import fxsparse
from fxsparse.methods import RigL, register_method
from fxsparse.registry import METHODS


class LargestTakesAll(RigL):
    """Drops by |w| times a factor that depends on the position (another order than magnitude's),
    and sends the whole network's regrowth to the
    layers with most room, in order (a redistribution no shipped method makes)."""

    name = "test-largest-takes-all"

    def drop_scores(self, sparse, fqn, weight, mask, grad):
        factor = 1.0 + torch.arange(weight.numel(), device=weight.device).view(weight.shape) % 3
        return weight.abs() * factor

    def grow_counts(self, sparse, drop_fraction, grads, optimizer):
        sites = sparse._fxsparse.sites
        names = [f for f, s in sites.items() if s.active < math.prod(s.shape)]
        total = sum(math.floor(drop_fraction * sites[f].active) for f in names)
        counts = {}
        for fqn in sorted(names, key=lambda f: -(math.prod(sites[f].shape) - sites[f].active)):
            room = math.prod(sites[fqn].shape) - sites[fqn].active + math.floor(drop_fraction * sites[fqn].active)
            counts[fqn] = min(room, total)
            total -= counts[fqn]
        return counts


if LargestTakesAll.name not in METHODS:
    register_method(LargestTakesAll)


@settings(max_examples=20, deadline=None)
@given(net_specs(), st.floats(0.1, 0.7))
def test_a_method_made_of_hooks_keeps_the_invariants_and_does_what_its_hooks_say(spec, density):
    sparse = fxsparse.sparsify(build(spec), density, "erk", seed=spec.seed, **spec.capture_args())
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.TopologyScheduler(sparse, optimizer, total_steps=8, delta_t=2, alpha=0.5,
                                           end_fraction=1.0, method=LargestTakesAll.name)
    assert isinstance(scheduler.spec, LargestTakesAll)
    x = spec.input()
    total = sum(int(m.sum()) for m in sparse.masks.values())
    hooks = LargestTakesAll()
    for step in range(1, 9):
        sparse(x).square().mean().backward()
        before = {f: m.clone() for f, m in sparse.masks.items()}
        weights = {f: sparse.get_parameter(f).detach().clone() for f in sparse.masks}
        if scheduler.is_update_step(step):
            want = hooks.grow_counts(sparse, scheduler.drop_fraction(step), {}, optimizer)
        if scheduler.step():
            optimizer.step()
            optimizer.zero_grad()
            continue
        optimizer.zero_grad()
        assert sum(int(m.sum()) for m in sparse.masks.values()) == total
        for fqn, mask in sparse.masks.items():
            old = before[fqn]
            change = scheduler.last_changes[fqn]
            if fqn in want:  # grew what grow_counts said (regrown ones count as grown back)
                assert change.grown + change.regrown == want[fqn], (fqn, change, want[fqn])
            grown = mask & ~old
            assert bool(sparse.get_parameter(fqn).detach()[grown].eq(0).all())
            dropped, stayed = old & ~mask, old & mask
            if bool(dropped.any()) and bool(stayed.any()):  # dropped by the hook's score
                score = hooks.drop_scores(sparse, fqn, weights[fqn], old, None)
                below = int((score[stayed] < float(score[dropped].max())).sum())
                assert below <= change.regrown, (fqn, below, change)
        sparse.verify()
    sparse(x).square().mean().backward()
    assert_inactive_zero_grad(sparse)
