"""sparsify(model, density=None, init="zeros"): a pruned checkpoint's zeros are its topology."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse

pytestmark = pytest.mark.usefixtures("front_end")  # both front-ends (tests/frontends.py)


def _pruned(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small conv net pruned one-shot by magnitude, per layer at different sparsities."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    kept = {}
    with torch.no_grad():
        for name, keep in (("0.weight", 0.5), ("2.weight", 0.2), ("5.weight", 0.05)):
            weight = model.get_parameter(name)
            threshold = weight.abs().flatten().kthvalue(int((1 - keep) * weight.numel())).values
            weight.mul_(weight.abs() > threshold)
            kept[name] = weight != 0
    return model, kept


def test_each_layer_keeps_exactly_the_checkpoints_nonzeros():
    model, kept = _pruned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = fxsparse.sparsify(model, None, "zeros", example_inputs=torch.randn(2, 3, 8, 8))
    assert set(sparse.masks) == set(kept)
    for fqn, mask in kept.items():
        assert torch.equal(sparse.masks[fqn], mask), fqn
        assert sparse._fxsparse.sites[fqn].active == int(mask.sum())  # the budget is what it has
        torch.testing.assert_close(sparse.sparse_weights[fqn].detach(), model.get_parameter(fqn).detach())
    total = sum(m.numel() for m in kept.values())
    assert sparse.density == pytest.approx(sum(int(m.sum()) for m in kept.values()) / total)
    report = str(sparse.summary())  # reported per layer
    lines = {line.split()[0]: line.split() for line in report.splitlines() if line.strip()}
    for fqn, mask in kept.items():
        assert {str(int(mask.sum())), str(mask.numel())} <= set(lines[fqn]), fqn  # active, total
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # yours untouched
    x = torch.randn(4, 3, 8, 8)
    model.eval(), sparse.eval()
    torch.testing.assert_close(sparse(x), model(x))


def test_fine_tuning_keeps_the_topology_or_improves_it_at_the_same_counts():
    model, kept = _pruned()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for method in ("static", "rigl"):
        sparse = fxsparse.sparsify(model, None, "zeros")
        opt = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
        scheduler = fxsparse.RigLScheduler(sparse, opt, total_steps=12, delta_t=3, end_fraction=1.0, method=method)
        for _ in range(12):
            F.cross_entropy(sparse(x), y).backward()
            if scheduler.step():
                opt.step()
            opt.zero_grad()
        sparse.verify()
        for fqn, mask in kept.items():
            assert int(sparse.masks[fqn].sum()) == int(mask.sum())
            assert torch.equal(sparse.masks[fqn], mask) == (method == "static"), (method, fqn)


def test_dense_names_a_layer_kept_whole_and_bad_calls_are_clear_errors():
    model, kept = _pruned()
    sparse = fxsparse.sparsify(model, None, "zeros", dense=["5.weight"])
    assert bool(sparse.masks["5.weight"].all()) and torch.equal(sparse.masks["2.weight"], kept["2.weight"])
    with pytest.raises(ValueError, match="density must be None"):
        fxsparse.sparsify(model, 0.1, "zeros")
    with pytest.raises(TypeError, match="expected density"):
        fxsparse.sparsify(model, None, "erk")
    with torch.no_grad():
        model.get_parameter("2.weight").zero_()
    with pytest.raises(ValueError, match=r"no nonzero weight in \['2.weight'\]"):
        fxsparse.sparsify(model, None, "zeros")
