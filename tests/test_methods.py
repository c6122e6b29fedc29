"""The method family behind RigLScheduler(method=...): each keeps the invariants that apply to it.

static/SET/RigL keep every layer's count; SNFS and RigL-SG/SM move counts between layers but keep
the total; gradual pruning only shrinks masks and ends exactly at its target. All of them keep
inactive weights at zero, with zero gradient, and start new connections at zero with zeroed
optimizer state.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from invariants import assert_inactive_no_influence, assert_inactive_zero_grad
from strategies import build, net_specs

import fxsparse
from fxsparse import budgets
from fxsparse.schedules import GradualPruning, pruned_density

DROP_AND_GROW = ["static", "set", "rigl", "snfs", "rigl-sg", "rigl-sm"]
REDISTRIBUTING = {"snfs", "rigl-sg", "rigl-sm"}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _counts(sparse):
    return {fqn: int(m.sum()) for fqn, m in sparse.masks.items()}


def _state_at(optimizer, param, where):
    return [v[where] for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v) and v.shape == param.shape]


def test_every_method_is_registered_and_an_unknown_one_lists_them():
    assert set(DROP_AND_GROW) | {"pruning"} <= set(fxsparse.scheduler.available_methods())
    sparse = fxsparse.sparsify(torch.nn.Linear(4, 4), 0.5)
    with pytest.raises(ValueError, match="rigl-sg"):
        fxsparse.RigLScheduler(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), 10, method="nope")


@settings(max_examples=25, deadline=None)
@given(net_specs(), st.floats(0.1, 0.8), st.sampled_from(DROP_AND_GROW), st.sampled_from(sorted(OPTIMIZERS)))
def test_drop_and_grow_methods_keep_their_invariants(spec, density, method, opt_name):
    net = build(spec)
    sparse = fxsparse.sparsify(net, density, "erk", seed=spec.seed, **spec.capture_args())
    optimizer = OPTIMIZERS[opt_name](sparse.parameters())
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=16, delta_t=2, alpha=0.5, end_fraction=1.0, method=method)
    x = spec.input()
    start = _counts(sparse)
    total = sum(start.values())
    updates = 0
    for _ in range(16):
        before_masks = {f: m.clone() for f, m in sparse.masks.items()}
        sparse.train()
        sparse(x).square().mean().backward()
        assert_inactive_zero_grad(sparse)
        if scheduler.step():
            optimizer.step()
        else:
            updates += 1
            counts = _counts(sparse)
            assert sum(counts.values()) == total  # the parameter count never changes
            if method not in REDISTRIBUTING:
                assert counts == start
            for fqn, mask in sparse.masks.items():
                weight = sparse.get_parameter(fqn)
                grown = mask & ~before_masks[fqn]
                assert bool(weight.detach()[grown].eq(0).all()), f"{fqn}: grown weights start at 0"
                for state in _state_at(optimizer, weight, grown | (before_masks[fqn] & ~mask)):
                    assert bool(state.eq(0).all()), f"{fqn}: optimizer state not zeroed where the topology changed"
                assert 1 <= counts[fqn] <= mask.numel()
        optimizer.zero_grad()
        sparse.verify()  # exact per-layer counts (as the update left them), inactive weights zero
    assert updates == (0 if method == "static" else 8)
    assert_inactive_no_influence(sparse, x)


@settings(max_examples=25, deadline=None)
@given(net_specs(), st.floats(0.05, 0.9), st.sampled_from(["erk", "er", "uniform"]), st.integers(0, 4), st.integers(1, 4))
def test_pruning_only_shrinks_and_ends_exactly_at_the_target(spec, density, init, begin, frequency):
    net = build(spec)
    sparse = fxsparse.sparsify(net, 1.0, **spec.capture_args())
    shapes = {fqn: tuple(m.shape) for fqn, m in sparse.masks.items()}
    try:
        dense = [next(iter(shapes))] if init == "uniform" and len(shapes) > 1 else []  # as sparsify
        target = budgets.active_counts(shapes, budgets.layer_densities(shapes, density, init, dense=dense))
    except ValueError:  # a budget this net cannot meet (uniform with a huge first layer): refused alike
        with pytest.raises(ValueError):
            fxsparse.RigLScheduler(sparse, torch.optim.SGD(sparse.parameters(), lr=0.01), 24, method="pruning", density=density, init=init)
        return
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(
        sparse, optimizer, total_steps=24, delta_t=frequency, end_fraction=0.75, method="pruning",
        density=density, init=init, begin_step=begin,
    )
    x = spec.input()
    previous = _counts(sparse)
    for step in range(1, 25):
        before = {f: m.clone() for f, m in sparse.masks.items()}
        sparse.train()
        sparse(x).square().mean().backward()
        assert scheduler.step()  # pruning never skips the optimizer step
        optimizer.step()
        optimizer.zero_grad()
        counts = _counts(sparse)
        for fqn, mask in sparse.masks.items():
            assert counts[fqn] <= previous[fqn]  # density only falls
            assert not bool((mask & ~before[fqn]).any())  # masks only shrink: nothing grows
            assert counts[fqn] >= target[fqn]
        previous = counts
        sparse.verify()
        if step >= scheduler.t_end:
            assert counts == target, (step, counts, target)  # exactly the target from t_end on
    assert_inactive_no_influence(sparse, x)


def test_pruning_follows_the_cubic_and_removes_the_smallest_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    sparse = fxsparse.sparsify(net, 1.0)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.0)  # weights frozen: magnitudes known
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, 100, delta_t=10, end_fraction=1.0, method="pruning", density=0.2, init="er")
    final = budgets.active_counts(
        {f: tuple(m.shape) for f, m in sparse.masks.items()},
        budgets.layer_densities({f: tuple(m.shape) for f, m in sparse.masks.items()}, 0.2, "er"),
    )
    schedule = GradualPruning(0, 100, 10)
    weights = {f: p.detach().clone() for f, p in sparse.sparse_weights.items()}
    x = torch.randn(4, 32)
    for step in range(1, 101):
        sparse(x).sum().backward()
        scheduler.step()
        optimizer.step()
        optimizer.zero_grad()
        for fqn, mask in sparse.masks.items():
            d_final = final[fqn] / mask.numel()
            want = budgets.count_for_density(mask.numel(), pruned_density(1.0, d_final, schedule.fraction_pruned(step)))
            assert int(mask.sum()) == (final[fqn] if step == 100 else want)
            kept = weights[fqn].abs()[mask]
            gone = weights[fqn].abs()[~mask]
            if gone.numel():
                assert float(gone.max()) <= float(kept.min())  # the smallest magnitudes went first


def test_pruning_refuses_a_start_sparser_than_its_target():
    sparse = fxsparse.sparsify(torch.nn.Linear(16, 16), 0.1)
    with pytest.raises(ValueError, match="sparsify\\(model, 1.0\\)"):
        fxsparse.RigLScheduler(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), 10, method="pruning", density=0.5)
    with pytest.raises(ValueError, match="density="):
        fxsparse.RigLScheduler(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), 10, method="pruning")


def _two_layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(), torch.nn.Linear(40, 20))


def test_snfs_keeps_a_dense_momentum_every_step_and_grows_by_it():
    sparse = fxsparse.sparsify(_two_layers(), 0.3, "uniform", dense=[])
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=12, delta_t=4, alpha=0.3, end_fraction=1.0, method="snfs")
    gen = torch.Generator().manual_seed(1)
    expected = {}
    seen_update = False
    for step in range(1, 13):
        x = torch.randn(8, 20, generator=gen)
        sparse(x).square().mean().backward()
        grads = sparse.masker.grads
        assert set(grads) == set(sparse.masks)  # dense gradients captured on every step
        for fqn, g in grads.items():
            expected[fqn] = g.clone() if fqn not in expected else expected[fqn] * 0.9 + g
        masks_before = {f: m.clone() for f, m in sparse.masks.items()}
        if scheduler.step():
            optimizer.step()
            for fqn in expected:  # the scheduler's momentum is exactly m = 0.9 m + g
                torch.testing.assert_close(scheduler.momentum[fqn], expected[fqn])
        elif step < 12:
            seen_update = True
            for fqn, mask in sparse.masks.items():
                grown = mask & ~masks_before[fqn]
                inactive = ~mask
                if bool(grown.any()) and bool(inactive.any()):
                    score = expected[fqn].abs()
                    assert float(score[grown].min()) >= float(score[inactive].max())
        optimizer.zero_grad()
    assert seen_update
    assert scheduler.momentum == {}  # freed once the topology is frozen


def test_redistribution_moves_regrowth_to_the_layer_with_larger_mean_gradient():
    # scale the second layer's gradient up: RigL-SG gives it the regrowth, RigL keeps counts
    results = {}
    for method in ("rigl", "rigl-sg"):
        sparse = fxsparse.sparsify(_two_layers(), 0.3, "uniform", dense=[])
        optimizer = torch.optim.SGD(sparse.parameters(), lr=0.0, momentum=0.9)
        scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=4, delta_t=1, alpha=0.5, end_fraction=1.0, method=method)
        before = _counts(sparse)
        out = sparse(torch.randn(8, 20, generator=torch.Generator().manual_seed(0)))
        out.square().mean().mul(1.0).backward()
        sparse.get_parameter("2.weight")  # noqa: B018 - just present
        capture = sparse.masker.grads
        capture["2.weight"].mul_(1000.0)
        assert not scheduler.step()
        results[method] = (before, _counts(sparse))
    before, after = results["rigl"]
    assert before == after
    before, after = results["rigl-sg"]
    assert sum(before.values()) == sum(after.values())
    assert after["2.weight"] > before["2.weight"] and after["0.weight"] < before["0.weight"]


def test_rigl_sm_needs_momentum():
    sparse = fxsparse.sparsify(_two_layers(), 0.3)
    with pytest.raises(ValueError, match="momentum"):
        fxsparse.RigLScheduler(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), 10, method="rigl-sm")
    with pytest.raises(ValueError, match="delta_t >= 2"):
        fxsparse.RigLScheduler(sparse, torch.optim.Adam(sparse.parameters()), 10, delta_t=1, method="rigl-sm")


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdef"), st.tuples(st.integers(0, 50), st.floats(0, 10)), min_size=1),
    st.floats(0, 1),
)
def test_redistribute_is_exact_capped_and_follows_the_scores(layers, share):
    capacity = {k: c for k, (c, _) in layers.items()}
    scores = {k: s for k, (_, s) in layers.items()}
    total = math.floor(share * sum(capacity.values()))
    counts = budgets.redistribute(total, capacity, scores)
    assert sum(counts.values()) == total
    assert all(0 <= counts[k] <= capacity[k] for k in capacity)
    # a layer with a higher score and room to spare gets at least as much (up to rounding)
    for a in capacity:
        for b in capacity:
            if scores[a] > scores[b] and counts[a] < capacity[a]:
                assert counts[a] >= counts[b] - 1, (a, b, counts)
    # proportional where nothing is capped
    if all(counts[k] < capacity[k] for k in capacity) and sum(scores.values()) > 0:
        for k in capacity:
            assert abs(counts[k] - total * scores[k] / sum(scores.values())) < 1 + 1e-9


def test_gradient_accumulation_grows_from_the_sum_over_micro_batches():
    sparse = fxsparse.sparsify(_two_layers(), 0.3)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=10, delta_t=2, end_fraction=1.0)
    gen = torch.Generator().manual_seed(0)
    micro = [torch.randn(4, 20, generator=gen) for _ in range(3)]
    for x in micro:  # step 1: an ordinary step, accumulated over the micro-batches too
        sparse(x).square().mean().backward()
    assert scheduler.step()
    optimizer.step()
    optimizer.zero_grad()
    # the reference: each micro-batch's dense gradient dL/d(w*m), summed
    reference = {}
    for x in micro:
        probe = copy.deepcopy(sparse)
        probe.arm_growth(True)
        probe(x).square().mean().backward()
        for fqn, g in probe.masker.grads.items():
            reference[fqn] = reference.get(fqn, 0) + g
    for x in micro:  # step 2 (an update step): three micro-batches, one optimizer step
        sparse(x).square().mean().backward()
    for fqn, g in sparse.masker.grads.items():
        torch.testing.assert_close(g, reference[fqn])
    assert not scheduler.step()


def test_scheduler_state_dict_resumes_snfs_and_pruning_exactly():
    for method, kwargs, density in (("snfs", {}, 0.3), ("pruning", {"density": 0.2}, 1.0)):
        def run(split):
            torch.manual_seed(0)
            sparse = fxsparse.sparsify(_two_layers(), density)
            optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
            scheduler = fxsparse.RigLScheduler(sparse, optimizer, 12, delta_t=3, end_fraction=1.0, method=method, **kwargs)
            gen = torch.Generator().manual_seed(2)
            for step in range(1, 13):
                if step == split:
                    saved = copy.deepcopy((sparse.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
                    sparse = fxsparse.sparsify(_two_layers(seed=5), density)
                    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
                    scheduler = fxsparse.RigLScheduler(sparse, optimizer, 12, delta_t=3, end_fraction=1.0, method=method, **kwargs)
                    sparse.load_state_dict(saved[0], budget="adopt" if method == "pruning" else "keep")
                    optimizer.load_state_dict(saved[1])
                    scheduler.load_state_dict(saved[2])
                sparse(torch.randn(4, 20, generator=gen)).square().mean().backward()
                if scheduler.step():
                    optimizer.step()
                optimizer.zero_grad()
            return sparse

        straight, resumed = run(split=0), run(split=5)
        for fqn in straight.masks:
            assert torch.equal(straight.masks[fqn], resumed.masks[fqn]), (method, fqn)
            torch.testing.assert_close(straight.get_parameter(fqn), resumed.get_parameter(fqn))


def test_small_dense_matches_the_sparse_parameter_count():
    from fxsparse.models import WideResNet, small_cnn

    base = fxsparse.small_dense(lambda w: WideResNet(22, 2, width=w), 0.1, "erk")
    assert base.target == fxsparse.baselines.sparse_parameter_count(WideResNet(22, 2), 0.1, "erk")
    assert base.params == sum(p.numel() for p in base.model.parameters())
    assert abs(base.params - base.target) / base.target < 0.01, (base.params, base.target)
    # a coarse width (whole channels of a small net): the closest count that exists
    base = fxsparse.small_dense(lambda w: small_cnn(width=max(1, round(32 * w))), 0.2, "erk")
    counts = [sum(p.numel() for p in small_cnn(width=c).parameters()) for c in range(1, 33)]
    assert abs(base.params - base.target) == min(abs(c - base.target) for c in counts)
    assert base.width < 1.0


def test_lottery_ticket_rewinds_to_the_initial_weights_under_the_final_mask():
    net = _two_layers()
    initial = copy.deepcopy(net.state_dict())
    sparse = fxsparse.sparsify(net, 0.3)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, 10, delta_t=2, end_fraction=1.0)
    start = {f: m.clone() for f, m in sparse.masks.items()}
    for _ in range(10):
        sparse(torch.randn(4, 20)).square().mean().backward()
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(start[f], m) for f, m in sparse.masks.items())
    trained = {k: v.clone() for k, v in sparse.state_dict().items()}
    ticket = fxsparse.lottery_ticket(sparse, net)
    for name, value in sparse.state_dict().items():  # the trained model is untouched
        assert torch.equal(value, trained[name])
    for fqn, mask in ticket.masks.items():
        assert torch.equal(mask, sparse.masks[fqn])  # the final topology
        assert torch.equal(ticket.get_parameter(fqn).detach(), initial[fqn] * mask)  # rewound
    assert torch.equal(ticket.get_parameter("0.bias"), initial["0.bias"])
    assert int(ticket.get_buffer("fxsparse_updates")) == 0
    with pytest.raises(ValueError, match="missing"):
        fxsparse.lottery_ticket(sparse, {"0.weight": initial["0.weight"]})
