"""RigL as docs/rigl.md writes it, checked point by point in a real training loop.

Every update step of a short run is compared with a reference computed here, independently of
fxsparse's own code: the drop fraction f(t) = alpha/2 (1 + cos(pi t / t_end)), k = floor(f n) per
layer, the k smallest |w| dropped, the k largest |dL/d(w*m)| of the current batch grown (the
gradient taken from a plain copy of the network holding the masked weights), grown weights at
zero with their momentum zeroed, a regrown connection keeping its value, no weight step on an
update iteration, equal counts before and after, no update after t_end. The extended study
(docs/extended_training.md) cites this test as its implementation check.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fxsparse

pytestmark = pytest.mark.usefixtures("front_end")  # every test under both front-ends (tests/frontends.py)

TOTAL, DELTA_T, ALPHA, END = 48, 4, 0.3, 0.75


def _net() -> nn.Module:
    # tanh, not ReLU: no unit is ever dead, so no gradient is exactly zero and the reference
    # below has no ties to break (a tie would make "the k largest" ambiguous)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3), nn.Tanh(), nn.Conv2d(12, 16, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10),
    )


def _reference_gradients(plain: nn.Module, sparse: fxsparse.SparseGraphModule, x, y) -> dict[str, torch.Tensor]:
    """dL/d(w*m) on this batch, from a plain copy of the network holding the masked weights."""
    with torch.no_grad():
        for name, tensor in plain.named_parameters():
            mask = sparse.masks.get(name)
            source = sparse.get_parameter(name)
            tensor.copy_(source * mask if mask is not None else source)
    plain.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(plain(x), y).backward()
    return {name: plain.get_parameter(name).grad.clone() for name in sparse.masks}


def _reference_mask(mask: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor | None:
    """RigL's new mask by the notes: drop the k smallest |w| among the active, grow the k largest
    |grad| among the inactive after the drop. None when a tie makes either choice ambiguous."""
    flat_mask, w, g = mask.flatten(), weight.flatten().abs(), grad.flatten().abs()
    active = flat_mask.nonzero().flatten()
    by_magnitude = active[w[active].argsort()]
    if 0 < k < len(active) and w[by_magnitude[k - 1]] == w[by_magnitude[k]]:
        return None
    after_drop = flat_mask.clone()
    after_drop[by_magnitude[:k]] = False
    candidates = (~after_drop).nonzero().flatten()
    by_gradient = candidates[g[candidates].argsort(descending=True)]
    if 0 < k < len(candidates) and g[by_gradient[k - 1]] == g[by_gradient[k]]:
        return None
    new = after_drop.clone()
    new[by_gradient[:k]] = True
    return new.view_as(mask)


def _check_layer(name, old_mask, new_mask, old_w, new_w, grad, momentum, k) -> bool:
    """Checks one layer's update against the notes; False if a tie left the reference ambiguous."""
    assert new_mask.sum() == old_mask.sum(), f"{name}: the active count changed"
    reference = _reference_mask(old_mask, old_w, grad, k)
    if reference is None:
        return False
    assert torch.equal(new_mask, reference), f"{name}: the new mask is not the notes' drop/grow (k={k})"
    grown = new_mask & ~old_mask  # new connections (a regrown one was active before)
    kept = new_mask & old_mask  # survivors and regrown connections
    assert torch.equal(new_w[grown], torch.zeros_like(new_w[grown])), f"{name}: a grown weight is not zero"
    assert torch.equal(momentum[grown], torch.zeros_like(momentum[grown])), f"{name}: grown momentum not reset"
    # no weight step on an update iteration: survivors and regrown connections keep their value
    assert torch.equal(new_w[kept], old_w[kept]), f"{name}: a kept weight moved on an update step"
    assert not new_w[~new_mask].any(), f"{name}: an inactive weight is not zero"
    return True


@pytest.mark.parametrize("seed", [0, 1])
def test_every_update_follows_the_rigl_notes(seed):
    torch.manual_seed(seed)
    net = _net()
    plain = copy.deepcopy(net)
    sparse = fxsparse.sparsify(net, density=0.15, init="erk", seed=seed)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    sched = fxsparse.RigLScheduler(sparse, opt, total_steps=TOTAL, delta_t=DELTA_T, alpha=ALPHA, end_fraction=END)
    t_end = int(END * TOTAL)
    gen = torch.Generator().manual_seed(100 + seed)
    updates, checked, changed = [], 0, 0
    for step in range(1, TOTAL + 1):
        x, y = torch.randn(16, 3, 10, 10, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        nn.functional.cross_entropy(sparse(x), y).backward()
        before_masks = {n: m.clone() for n, m in sparse.masks.items()}
        before_w = {n: sparse.get_parameter(n).detach().clone() for n in sparse.masks}
        grads = _reference_gradients(plain, sparse, x, y)
        if sched.step():
            opt.step()
        else:
            updates.append(step)
            fraction = ALPHA / 2 * (1 + math.cos(math.pi * step / t_end))
            for name in sparse.masks:
                weight = sparse.get_parameter(name)
                k = math.floor(fraction * int(before_masks[name].sum()))
                momentum = opt.state[weight].get("momentum_buffer")
                momentum = torch.zeros_like(weight) if momentum is None else momentum
                checked += _check_layer(name, before_masks[name], sparse.masks[name], before_w[name],
                                        weight.detach(), grads[name], momentum, k)
                changed += not torch.equal(before_masks[name], sparse.masks[name])
        opt.zero_grad(set_to_none=True)
    # an update every delta_t steps until t_end (where f = 0), none after
    assert updates == list(range(DELTA_T, t_end + 1, DELTA_T))
    assert checked >= 0.9 * len(updates) * len(sparse.masks) and changed > len(updates)
    sparse.verify()


def test_the_conformance_check_catches_a_wrong_update():
    """The check is not vacuous: dropping the largest weights, growing by the smallest gradient,
    a grown weight left nonzero or a kept weight stepped each fail it."""
    torch.manual_seed(0)
    mask = torch.rand(8, 8) < 0.5
    w = torch.randn(8, 8) * mask
    grad = torch.randn(8, 8)
    k = 3
    right = _reference_mask(mask, w, grad, k)
    assert _check_layer("w", mask, right, w, w * right, grad, torch.zeros(8, 8), k)
    wrong_drop = _reference_mask(mask, -1 / (w.abs() + 1e-3) * mask, grad, k)  # drops the largest
    wrong_grow = _reference_mask(mask, w, 1 / grad, k)  # grows the smallest gradients
    for bad in (wrong_drop, wrong_grow):
        with pytest.raises(AssertionError, match="drop/grow"):
            _check_layer("w", mask, bad, w, w * bad, grad, torch.zeros(8, 8), k)
    grown = right & ~mask
    with pytest.raises(AssertionError, match="grown weight"):
        _check_layer("w", mask, right, w, w * right + grown * 0.5, grad, torch.zeros(8, 8), k)
    with pytest.raises(AssertionError, match="moved"):
        _check_layer("w", mask, right, w, (w + 0.01) * right * ~grown, grad, torch.zeros(8, 8), k)
