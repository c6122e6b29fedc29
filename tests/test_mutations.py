"""The invariant checks can fail: each runs against a deliberately broken piece of fxsparse.

Every case patches one function with a plausible bug, runs the same scenario the property tests
run, and expects the check to raise AssertionError; the unpatched run must pass.
"""

from __future__ import annotations

import pytest
import torch

import fxsparse
from fxsparse import masking, topology
from invariants import (
    assert_budget,
    assert_inactive_no_influence,
    assert_inactive_zero_grad,
    assert_update_invariants,
    snapshot,
    train_step,
)

pytestmark = pytest.mark.usefixtures("front_end")  # every test under both front-ends (tests/frontends.py)


def _scenario():
    """sparsify, train, then one RigL update, checked with every invariant."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10),
    )
    x = torch.randn(4, 3, 8, 8)
    sparse = fxsparse.sparsify(net, 0.3, "erk")
    assert_budget(sparse, 0.3, "erk")
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    train_step(sparse, opt, x)
    assert_inactive_zero_grad(sparse)  # armed (a fresh module): the recorded-gradient path
    opt.step()
    sparse.arm_growth(False)
    train_step(sparse, opt, x)
    assert_inactive_zero_grad(sparse)  # an ordinary step: the one pass at the end of the backward
    opt.step()
    sparse.arm_growth(True)
    train_step(sparse, opt, x)
    before = snapshot(sparse, opt)
    sparse.rigl_step(0.4, optimizer=opt)
    assert_update_invariants(before, sparse, opt, 0.4)
    assert_inactive_no_influence(sparse, x)


def test_scenario_passes_unpatched():
    _scenario()


_update_mask = topology.update_mask
_apply_update = topology.apply_update


def _grows_one_extra(mask, drop, grow, fraction, **kw):
    result = _update_mask(mask, drop, grow, fraction, **kw)
    spare = (~result.mask).reshape(-1).nonzero()[0]
    return topology.TopologyUpdate(mask, result.dropped_idx, torch.cat([result.grown_idx, spare]), result.regrown)


def _grows_weakest(mask, drop, grow, fraction, **kw):
    return _update_mask(mask, drop, -grow, fraction, **kw)


def _drops_strongest(mask, drop, grow, fraction, **kw):
    if kw.pop("absolute", False):
        drop = drop.abs()
    return _update_mask(mask, -drop, grow, fraction, **kw)


def _keeps_dropped_values(weight, mask, update, state=()):
    flat = mask.view(-1)
    flat[update.dropped_idx] = False
    flat[update.grown_idx] = True
    weight.view(-1)[update.grown_idx] = 0
    topology.zero_state_at(list(state), torch.cat([update.dropped_idx, update.grown_idx]))


def _random_init_for_new(weight, mask, update, state=()):
    _apply_update(weight, mask, update, state)
    weight.add_(torch.randn_like(weight) * update.grown)


def _forgets_optimizer_state(weight, mask, update, state=()):
    _apply_update(weight, mask, update, [])


def _grad_not_masked(weight, mask, inplace=True):
    return weight.grad  # the bug: inactive weights get gradient


def _forward_not_masked(weights, masks):
    pass  # the bug: inactive weights are not zeroed before the forward reads them


def _grads_not_masked(weights, masks):
    pass  # the bug: the pass at the end of a backward leaves inactive gradient entries


MUTATIONS = {
    "grows one extra": (topology, "update_mask", _grows_one_extra),
    "grows by smallest gradient": (topology, "update_mask", _grows_weakest),
    "drops the largest weights": (topology, "update_mask", _drops_strongest),
    "dropped weights keep their value": (topology, "apply_update", _keeps_dropped_values),
    "new connections start random": (topology, "apply_update", _random_init_for_new),
    "optimizer state not zeroed": (topology, "apply_update", _forgets_optimizer_state),
    "inactive weights get gradient": (masking, "mask_grad_", _grad_not_masked),
    "forward ignores the mask": (masking, "zero_inactive_all_", _forward_not_masked),
    "backward pass leaves inactive gradients": (masking, "mask_grads_all_", _grads_not_masked),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_invariant_check_catches_its_bug(name, monkeypatch):
    module, attr, broken = MUTATIONS[name]
    monkeypatch.setattr(module, attr, broken)
    with pytest.raises(AssertionError):
        _scenario()
