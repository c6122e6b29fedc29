"""The invariants (docs/invariants.md) as checks that raise AssertionError, shared by every test.

Each check is also run against deliberately broken code in test_mutations.py, to show it can
fail.
"""

from __future__ import annotations

import copy
import math

import torch

import fxsparse
from fxsparse.budgets import active_counts, layer_densities

__all__ = [
    "assert_budget",
    "assert_counts_unchanged",
    "assert_inactive_no_influence",
    "assert_inactive_zero_grad",
    "assert_update_invariants",
    "snapshot",
    "train_step",
]


def assert_budget(sparse: fxsparse.SparseGraphModule, density: float, init: str = "erk") -> None:
    """Invariant 1 at sparsify: every layer holds exactly its budget; total within a weight a layer."""
    masks = sparse.masks
    shapes = {fqn: tuple(m.shape) for fqn, m in masks.items()}
    dense = [next(iter(shapes))] if init == "uniform" and len(shapes) > 1 else []
    expected = active_counts(shapes, layer_densities(shapes, density, init, dense=dense))
    for fqn, mask in masks.items():
        assert mask.dtype == torch.bool, (fqn, mask.dtype)
        assert int(mask.sum()) == expected[fqn], (fqn, int(mask.sum()), expected[fqn])
    total = sum(m.numel() for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    assert abs(active - density * total) <= len(masks), (active, density * total, len(masks))


def assert_counts_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for fqn in before:
        assert int(before[fqn].sum()) == int(after[fqn].sum()), (fqn, int(before[fqn].sum()), int(after[fqn].sum()))


def assert_inactive_no_influence(sparse: fxsparse.SparseGraphModule, x: torch.Tensor) -> None:
    """Invariant 3a: perturbing inactive weights leaves the output bit-identical."""
    sparse.eval()
    with torch.no_grad():
        reference = sparse(x)
        perturbed = copy.deepcopy(sparse)
        gen = torch.Generator().manual_seed(0)
        for fqn, mask in perturbed.masks.items():
            weight = perturbed.get_parameter(fqn)
            noise = torch.randn(weight.shape, generator=gen) * 10 + 1
            weight.add_(noise * ~mask)
        out = perturbed(x)
    assert torch.equal(reference, out), float((reference - out).abs().max())


def assert_inactive_zero_grad(sparse: fxsparse.SparseGraphModule) -> None:
    """Invariant 3b: after a backward, inactive weights have exactly zero gradient."""
    for fqn, mask in sparse.masks.items():
        grad = sparse.get_parameter(fqn).grad
        assert grad is not None, f"{fqn} got no gradient"
        assert bool((grad * ~mask).eq(0).all()), f"{fqn}: inactive weights have gradient"


def snapshot(sparse: fxsparse.SparseGraphModule, optimizer: torch.optim.Optimizer) -> dict:
    weights = {fqn: p.detach().clone() for fqn, p in sparse.sparse_weights.items()}
    masks = {fqn: m.clone() for fqn, m in sparse.masks.items()}
    state = {
        fqn: {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape}
        for fqn, p in sparse.sparse_weights.items()
    }
    grads = {fqn: g.clone() for fqn, g in sparse.masker.grads.items()}
    return {"weights": weights, "masks": masks, "state": state, "grads": grads}


def assert_update_invariants(
    before: dict, sparse: fxsparse.SparseGraphModule, optimizer: torch.optim.Optimizer,
    drop_fraction: float, grow: str = "gradient",
) -> None:
    """Invariants 1 and 4 across one rigl_step, given a snapshot taken just before it."""
    masks = sparse.masks
    assert_counts_unchanged(before["masks"], masks)
    for fqn, mask in masks.items():
        old = before["masks"][fqn]
        weight = sparse.get_parameter(fqn).detach()
        grown = mask & ~old
        dropped = old & ~mask
        n_active = int(old.sum())
        k = math.floor(drop_fraction * n_active) if n_active < old.numel() else 0
        assert int(grown.sum()) <= k, (fqn, int(grown.sum()), k)
        assert int(grown.sum()) == int(dropped.sum())
        # new connections start at 0 with zero optimizer state; dropped ones are zeroed
        assert bool(weight[grown].eq(0).all()), f"{fqn}: grown weights are not zero"
        assert bool(weight[dropped].eq(0).all()), f"{fqn}: dropped weights are not zero"
        assert bool((weight * ~mask).eq(0).all()), f"{fqn}: inactive weights are not zero"
        # connections that stayed keep their value
        stay = mask & old
        assert torch.equal(weight[stay], before["weights"][fqn][stay]), f"{fqn}: kept weights changed"
        state = optimizer.state.get(sparse.get_parameter(fqn), {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == weight.shape:
                assert bool(value[grown | dropped].eq(0).all()), f"{fqn}: optimizer {key} not zeroed"
                assert torch.equal(value[stay], before["state"][fqn][key][stay]), f"{fqn}: {key} changed"
        if grow == "gradient" and bool(grown.any()):
            # grown connections beat every connection left inactive on |dL/d(w*m)|
            score = before["grads"][fqn].abs()
            inactive = ~mask
            if bool(inactive.any()):
                assert float(score[grown].min()) >= float(score[inactive].max()), f"{fqn}: grew a weaker connection"
        if bool(dropped.any()) and bool(stay.any()):
            # what was dropped was no larger than anything never dropped (ties and regrowth aside)
            w_old = before["weights"][fqn].abs()
            kept_sorted = torch.sort(w_old[stay]).values
            n_small = int((kept_sorted < float(w_old[dropped].max())).sum())
            regrown = k - int(grown.sum())
            assert n_small <= regrown, f"{fqn}: dropped a larger weight than one it kept"


def train_step(sparse: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    loss = sparse(x).square().mean()
    loss.backward()
    return loss.detach()
