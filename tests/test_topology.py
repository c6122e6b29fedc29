"""Drop/grow and schedules are pure maths on tensors: checked against a full-sort reference."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxsparse
from fxsparse import topology
from fxsparse.schedules import cosine_drop_fraction, end_step, is_update_step


@st.composite
def layers(draw: st.DrawFn):
    """A mask and distinct drop/grow scores (so the right answer is unique)."""
    shape = draw(st.sampled_from([(7,), (4, 5), (3, 2, 3, 3), (16, 9), (1, 1)]))
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**20))
    gen = torch.Generator().manual_seed(seed)
    active = draw(st.integers(1, n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:active]] = True
    drop = torch.randperm(n, generator=gen).float().view(shape)
    grow = torch.randperm(n, generator=gen).float().view(shape)
    return mask.view(shape), drop, grow


def reference_update(mask, drop, grow, fraction):
    """RigL's update by full sorts, the plainest statement of the rule."""
    flat, d, g = mask.flatten().clone(), drop.flatten(), grow.flatten()
    k = math.floor(fraction * int(flat.sum()))
    active = flat.nonzero().flatten().tolist()
    for i in sorted(active, key=lambda i: d[i].item())[:k]:
        flat[i] = False
    inactive = (~flat).nonzero().flatten().tolist()
    for i in sorted(inactive, key=lambda i: -g[i].item())[:k]:
        flat[i] = True
    return flat.view_as(mask)


def check_update(update_mask, mask, drop, grow, fraction):
    result = update_mask(mask, drop, grow, fraction)
    assert torch.equal(result.mask, reference_update(mask, drop, grow, fraction))
    assert int(result.mask.sum()) == int(mask.sum())
    assert torch.equal(result.dropped, mask & ~result.mask)
    assert torch.equal(result.grown, result.mask & ~mask)
    k = math.floor(fraction * int(mask.sum()))
    assert result.regrown == k - int(result.grown.sum())


@given(layers(), st.floats(0.0, 1.0))
def test_update_mask_matches_the_full_sort_reference(layer, fraction):
    check_update(topology.update_mask, *layer, fraction)


def _drops_largest(mask, drop, grow, fraction):
    return topology.update_mask(mask, -drop, grow, fraction)


def _grows_smallest(mask, drop, grow, fraction):
    return topology.update_mask(mask, drop, -grow, fraction)


def _one_too_many(mask, drop, grow, fraction):
    result = topology.update_mask(mask, drop, grow, fraction)
    spare = (~result.mask).reshape(-1).nonzero()[:1].reshape(-1)
    return topology.TopologyUpdate(mask, result.dropped_idx, torch.cat([result.grown_idx, spare]), result.regrown)


@pytest.mark.parametrize("broken", [_drops_largest, _grows_smallest, _one_too_many])
def test_the_reference_check_catches_broken_updates(broken):
    # a layer where each mutation must show: 10 weights, 6 active, drop half
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    drop = torch.arange(10.0)
    grow = torch.tensor([0.0, 1, 2, 3, 4, 5, 9, 8, 7, 6])
    check_update(topology.update_mask, mask, drop, grow, 0.5)
    with pytest.raises(AssertionError):
        check_update(broken, mask, drop, grow, 0.5)


def test_apply_update_zeroes_changed_weights_and_state_only():
    mask = torch.tensor([True, True, False, False])
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    momentum = torch.ones(4)
    scalar_step = torch.tensor(5.0)
    result = topology.update_mask(mask, weight.abs(), torch.tensor([0.0, 0.0, 1.0, 0.0]), 0.5)
    topology.apply_update(weight, mask, result, [momentum, scalar_step])
    assert mask.tolist() == [False, True, True, False]
    assert weight.tolist() == [0.0, 2.0, 0.0, 4.0]  # dropped and grown zeroed; inactive left as they were
    assert momentum.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert float(scalar_step) == 5.0


@given(st.integers(1, 300_000), st.integers(0, 2**16), st.booleans(), st.sampled_from([1, 7, 1000, 30_000]))
def test_top_indices_selects_exactly_what_topk_selects(n, seed, largest, k):
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randperm(n, generator=gen).float()  # distinct: the answer is unique
    got = topology.top_indices(values, k, largest)
    want = torch.topk(values, k, largest=largest).indices
    assert torch.equal(torch.sort(got).values, torch.sort(want).values)


def test_top_indices_with_ties_and_infinities_returns_k_valid_picks():
    values = torch.cat([torch.full((200_000,), -math.inf), torch.zeros(100_000), torch.ones(5)])
    got = topology.top_indices(values, 1000, largest=True)
    assert got.numel() == 1000 and got.unique().numel() == 1000
    assert bool((values[got] >= 0).all()) and set(range(300_000, 300_005)) <= set(got.tolist())

@given(st.integers(1, 10_000), st.floats(0.01, 1.0), st.floats(0.0, 1.0))
def test_cosine_schedule(total, end_fraction, alpha):
    t_end = end_step(total, end_fraction)
    if t_end == 0:
        return
    assert math.isclose(cosine_drop_fraction(0, alpha, t_end), alpha, abs_tol=1e-12)
    assert cosine_drop_fraction(t_end, alpha, t_end) == pytest.approx(0.0, abs=1e-12)
    assert cosine_drop_fraction(t_end + 1, alpha, t_end) == 0.0
    values = [cosine_drop_fraction(t, alpha, t_end) for t in range(0, t_end + 1, max(1, t_end // 50))]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # non-increasing


def test_update_steps():
    assert [t for t in range(1, 1001) if is_update_step(t, 100, 750)] == [100, 200, 300, 400, 500, 600, 700]
    with pytest.raises(ValueError, match="end_fraction"):
        end_step(100, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        cosine_drop_fraction(1, 2.0, 10)


def sorted_reference(mask, drop, grow, fraction):
    """The reference rule with vectorized sorts, for layers too large for the loop above."""
    flat, d, g = mask.flatten().clone(), drop.flatten(), grow.flatten()
    k = math.floor(fraction * int(flat.sum()))
    active = flat.nonzero().flatten()
    flat[active[torch.sort(d[active], stable=True).indices[:k]]] = False
    inactive = (~flat).nonzero().flatten()
    flat[inactive[torch.sort(g[inactive], descending=True, stable=True).indices[:k]]] = True
    return flat.view_as(mask)


@st.composite
def large_layers(draw: st.DrawFn):
    """Layers big enough for the sampled-threshold path, with conv-like structure in the
    growth scores (whole kernel taps with zero gradient, as at 1x1 feature maps)."""
    out_ch, in_ch = draw(st.sampled_from([(256, 128), (512, 64), (96, 160)]))
    n = out_ch * in_ch * 9
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    density = draw(st.sampled_from([0.01, 0.05, 0.1, 0.5, 0.9]))
    mask = torch.rand(n, generator=gen) < density
    drop = torch.randperm(n, generator=gen).float() - n / 2  # distinct, signed: |.| may tie
    drop = drop + 0.25  # ... but not after abs: x + 0.25 != -(y + 0.25) for integers x, y
    grow = torch.randperm(n, generator=gen).float()
    if draw(st.booleans()):
        taps = grow.view(out_ch, in_ch, 3, 3)
        taps[:, :, 0, :] = -1.0 - torch.arange(out_ch * in_ch * 3).float().view(out_ch, in_ch, 3)  # distinct, lowest
    shape = (out_ch, in_ch, 3, 3)
    return mask.view(shape), drop.view(shape), grow.view(shape)


@settings(max_examples=25, deadline=None)
@given(large_layers(), st.sampled_from([0.05, 0.3, 0.5, 1.0]), st.booleans())
def test_update_mask_on_large_layers_matches_the_reference(layer, fraction, absolute):
    mask, drop, grow = layer
    drop_key = drop.abs() if absolute else drop
    want = sorted_reference(mask, drop_key, grow, fraction)
    got = topology.update_mask(mask, drop, grow.clone(), fraction, absolute=absolute)
    assert torch.equal(got.mask, want)
    assert torch.equal(got.dropped, mask & ~want) and torch.equal(got.grown, want & ~mask)
    # the device-agnostic path agrees
    k = topology.drop_count(int(mask.sum()), fraction)
    other = topology._update_mask_torch(mask, drop, grow.clone(), k, k, False, absolute)
    assert torch.equal(other.mask, want)


@pytest.mark.parametrize("zeros", [0.5, 0.97, 1.0])
def test_update_mask_with_mostly_zero_gradients_grows_the_largest_and_keeps_counts(zeros):
    gen = torch.Generator().manual_seed(3)
    n = 400_000
    mask = torch.rand(n, generator=gen) < 0.1
    grow = torch.rand(n, generator=gen)
    grow[torch.rand(n, generator=gen) < zeros] = 0.0  # massive ties at zero
    weight = torch.randn(n, generator=gen)
    result = topology.update_mask(mask, weight, grow, 0.3, absolute=True)
    new = result.mask
    assert int(new.sum()) == int(mask.sum())
    k = math.floor(0.3 * int(mask.sum()))
    assert result.grown_idx.numel() + result.regrown == k
    after_drop = mask & ~result.dropped
    grown_scores = grow[new & ~after_drop]
    left_scores = grow[~new]
    assert float(grown_scores.min()) >= float(left_scores.max())  # nothing better was left out
    kept = weight.abs()[mask & new]
    gone = weight.abs()[mask & ~new]
    assert float(gone.max()) <= float(kept.min()) or result.regrown > 0


def test_map_layers_runs_large_items_on_threads_in_order_and_raises_their_errors(monkeypatch):
    monkeypatch.setattr(topology, "_PARALLEL_FROM", 10)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads = set()

    def square(x):
        threads.add(threading.get_ident())
        if x == 7:
            raise KeyError(x)
        return x * x

    items, sizes = [1, 2, 3, 4, 5], [100, 1, 50, 200, 2]
    assert topology.map_layers(square, items, sizes) == [1, 4, 9, 16, 25]
    assert len(threads) > 1  # the large items ran beside the caller
    assert topology.map_layers(square, items, sizes, parallel=False) == [1, 4, 9, 16, 25]
    with pytest.raises(KeyError):
        topology.map_layers(square, [1, 7, 3], [100, 100, 100])


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_threaded_update_equals_the_serial_one(grow):
    def run(threads):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(700, 600), torch.nn.ReLU(), torch.nn.Linear(600, 500))
        sparse = fxsparse.sparsify(model, density=0.2, seed=3)
        sparse(torch.randn(8, 700)).square().sum().backward()
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            sparse.rigl_step(0.3, grow=grow)
            sparse.prune({name: int(mask.sum()) // 2 for name, mask in sparse.masks.items()})
        finally:
            torch.set_num_threads(previous)
        return {name: mask.clone() for name, mask in sparse.masks.items()}

    serial, threaded = run(1), run(2)
    assert all(torch.equal(serial[name], threaded[name]) for name in serial)


@pytest.mark.parametrize("zeros", [0.5, 0.97, 1.0])
@pytest.mark.parametrize("absolute", [False, True])
def test_ties_at_the_threshold_are_taken_lowest_index_first_as_a_stable_sort_does(zeros, absolute):
    """A residual branch behind a zero-initialized norm has an all-zero gradient: the grow
    selection then ties at zero over millions of entries, and only the missing count of them
    (lowest indices first, just-dropped ones included) is taken, as a stable sort would."""
    gen = torch.Generator().manual_seed(5)
    n = 300_000
    mask = torch.rand(n, generator=gen) < 0.1
    grow = torch.rand(n, generator=gen)
    grow[torch.rand(n, generator=gen) < zeros] = 0.0
    drop = torch.randperm(n, generator=gen).float() - n / 2 + 0.25  # distinct, also after abs
    want = sorted_reference(mask, drop.abs() if absolute else drop, grow, 0.3)
    got = topology.update_mask(mask, drop, grow.clone(), 0.3, absolute=absolute)
    assert torch.equal(got.mask, want)
    k = topology.drop_count(int(mask.sum()), 0.3)
    assert torch.equal(topology._update_mask_torch(mask, drop, grow.clone(), k, k, False, absolute).mask, want)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000), density=st.floats(0.05, 0.9), levels=st.integers(1, 6), fraction=st.floats(0.0, 0.5),
    absolute=st.booleans(), exact_below=st.sampled_from([1 << 16, 64]), seed=st.integers(0, 10**6),
)
def test_the_device_agnostic_selection_makes_the_cpu_selection_ties_included(
        n, density, levels, fraction, absolute, exact_below, seed):
    """The torch path (CUDA's, and any non-float score's) selects in the CPU path's total order,
    score then ascending flat index: scores of few distinct values are mostly ties."""
    import fxsparse.topology as topology

    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=generator) < density
    active = int(mask.sum())
    drop = torch.randint(-levels, levels + 1, (n,), generator=generator).float()
    grow = torch.randint(0, levels + 1, (n,), generator=generator).float()
    k = int(fraction * active)
    saved = topology._EXACT_BELOW
    topology._EXACT_BELOW = exact_below  # small: the sampled threshold path runs too
    try:
        on_cpu = topology._update_mask_cpu(mask.clone(), drop, grow, k, k, absolute)
        on_any = topology._update_mask_torch(mask.clone(), drop, grow, k, k, False, absolute)
    finally:
        topology._EXACT_BELOW = saved
    assert sorted(on_cpu.dropped_idx.tolist()) == sorted(on_any.dropped_idx.tolist())
    assert sorted(on_cpu.grown_idx.tolist()) == sorted(on_any.grown_idx.tolist())
    assert on_cpu.regrown == on_any.regrown
