"""The extension example outside the package (examples/mest.py): a method from the literature that
fxsparse does not ship, added as a subclass, trains under the scheduler with every invariant."""

from __future__ import annotations

import math

import pytest
import torch
from invariants import assert_inactive_zero_grad
from scripts import load_script

import fxsparse
from fxsparse.registry import METHODS


@pytest.fixture(scope="module")
def mest():
    if "mest" in METHODS:  # registered once per process
        return METHODS.get("mest")
    return load_script("examples/mest.py").MEST


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_the_example_method_drops_by_its_own_score_and_grows_at_random(mest):
    assert "mest" in fxsparse.available_methods() and issubclass(mest, fxsparse.methods.SET)
    sparse = fxsparse.sparsify(_net(), 0.3, "uniform", dense=[])
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.TopologyScheduler(sparse, optimizer, total_steps=20, delta_t=4, method="mest")
    gen = torch.Generator().manual_seed(1)
    updates = 0
    for step in range(1, 21):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        torch.nn.functional.cross_entropy(sparse(x), y).backward()
        if scheduler.is_update_step(step):
            assert sparse.masker.grads  # armed: the drop score reads the gradient
            before = {f: m.clone() for f, m in sparse.masks.items()}
            scores = {f: mest.reference(sparse.get_parameter(f).detach(), g) for f, g in sparse.masker.grads.items()}
        if scheduler.step():
            optimizer.step()
        else:
            updates += 1
            for fqn, mask in sparse.masks.items():
                old = before[fqn]
                assert int(mask.sum()) == int(old.sum())  # counts kept
                k = math.floor(scheduler.drop_fraction(step) * int(old.sum()))
                dropped = old & ~mask
                kept = old & mask
                # what left was no better by MEST's score than what stayed, except connections
                # dropped and grown back at random in the same update (they count as staying)
                if bool(dropped.any()) and bool(kept.any()):
                    best_dropped = float(scores[fqn][dropped].max())
                    below = int((scores[fqn][kept] < best_dropped).sum())
                    assert below <= scheduler.last_changes[fqn].regrown, (fqn, below)
                assert int(dropped.sum()) <= k
        optimizer.zero_grad()
    assert updates == len([s for s in range(1, 21) if scheduler.is_update_step(s)]) > 0
    sparse.verify()
    sparse(torch.randn(4, 12)).sum().backward()
    assert_inactive_zero_grad(sparse)
