"""Budgets are pure maths over shapes: properties with no model and no tracing."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fxsparse import budgets
from fxsparse.budgets import active_counts, count_for_density, layer_densities, register_init

shape = st.one_of(
    st.tuples(st.integers(1, 256), st.integers(1, 256)),  # linear [out, in]
    st.tuples(st.integers(1, 128), st.integers(1, 64), st.sampled_from([1, 3, 5, 7]), st.sampled_from([1, 3, 5, 7])),
)
shape_maps = st.lists(shape, min_size=1, max_size=12).map(lambda shapes: {f"l{i}.weight": s for i, s in enumerate(shapes)})
density = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


def _check_budget(shapes, densities, target):
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    assert all(0.0 < d <= 1.0 for d in densities.values()), densities
    # the real-valued budget is met exactly
    assert math.isclose(sum(densities[n] * sizes[n] for n in shapes), target * total, rel_tol=1e-9, abs_tol=1e-6)
    counts = active_counts(shapes, densities)
    # integer counts: within one weight per layer of the target
    assert abs(sum(counts.values()) - target * total) <= len(shapes)
    for n in shapes:
        assert 1 <= counts[n] <= sizes[n]
        assert abs(counts[n] - densities[n] * sizes[n]) < 1.0


@given(shape_maps, density, st.sampled_from(["uniform", "er", "erk"]))
def test_every_scheme_meets_the_budget_with_no_layer_above_one(shapes, target, init):
    _check_budget(shapes, layer_densities(shapes, target, init), target)


@given(shape_maps, density)
def test_erk_is_proportional_to_its_raw_score_below_saturation(shapes, target):
    densities = layer_densities(shapes, target, "erk")
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    sparse = [n for n in shapes if densities[n] < 1.0]
    ratios = [densities[n] / raw[n] for n in sparse]
    if ratios:
        # one eps for every non-dense layer
        assert max(ratios) - min(ratios) <= 1e-9 * max(ratios)
        eps = ratios[0]
        # the dense ones are exactly those eps would push to or beyond density 1
        for n in shapes:
            if densities[n] == 1.0:
                assert eps * raw[n] >= 1.0 - 1e-9, (n, eps * raw[n])


@given(shape_maps, density)
def test_er_ignores_kernel_dims_and_erk_counts_them(shapes, target):
    er = layer_densities(shapes, target, "er")
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    free = [n for n in shapes if er[n] < 1.0]
    if len(free) >= 2:
        a, b = free[0], free[1]
        assert math.isclose(er[a] / er[b], raw[a] / raw[b], rel_tol=1e-9)


@given(shape_maps, density)
def test_uniform_gives_one_density_to_every_free_layer(shapes, target):
    densities = layer_densities(shapes, target, "uniform")
    assert max(densities.values()) - min(densities.values()) <= 1e-12 or all(d == 1.0 for d in densities.values())


@given(shape_maps, density)
def test_dense_layers_come_out_of_the_budget(shapes, target):
    first = next(iter(shapes))
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    assume(len(shapes) > 1 and sizes[first] < target * sum(sizes.values()) * (1 - 1e-9))
    densities = layer_densities(shapes, target, "uniform", dense=[first])
    assert densities[first] == 1.0
    _check_budget(shapes, densities, target)


def test_dense_layers_beyond_the_budget_are_an_error():
    with pytest.raises(ValueError, match="alone hold 100"):
        layer_densities({"a": (10, 10), "b": (10, 10)}, 0.25, "erk", dense=["a"])


def test_density_one_is_all_dense():
    shapes = {"a": (3, 3, 3, 3), "b": (100, 50)}
    assert layer_densities(shapes, 1.0, "erk") == {"a": 1.0, "b": 1.0}


def test_erk_matches_a_hand_computation():
    # conv 16x3x3x3 (432 weights, raw 25/432), linear 10x16 (160, raw 26/160), density 0.5:
    # eps * (25 + 26) = 0.5 * 592 -> eps = 296/51; the linear stays below 1 (0.943).
    shapes = {"conv": (16, 3, 3, 3), "fc": (10, 16)}
    d = layer_densities(shapes, 0.5, "erk")
    eps = 0.5 * 592 / 51
    assert math.isclose(d["conv"], eps * 25 / 432) and math.isclose(d["fc"], eps * 26 / 160)


def test_count_rule_rounds_half_up_and_keeps_one():
    assert count_for_density(10, 0.25) == 3  # 2.5 rounds up
    assert count_for_density(10, 0.24) == 2
    assert count_for_density(1000, 1e-6) == 1
    assert count_for_density(7, 1.0) == 7


def test_unknown_scheme_lists_the_valid_ones_and_registry_extends(monkeypatch):
    monkeypatch.setattr(budgets, "_INITS", dict(budgets._INITS))  # the registration is undone after
    with pytest.raises(ValueError, match=r"\['er', 'erk', 'uniform'"):
        layer_densities({"a": (2, 2)}, 0.5, "nope")

    @register_init("test-sqrt")
    def _sqrt(s):
        return 1.0 / math.sqrt(math.prod(s))

    d = layer_densities({"a": (4, 4), "b": (16, 16)}, 0.1, "test-sqrt")
    assert math.isclose(d["a"] / d["b"], 4.0)
    with pytest.raises(ValueError, match="already registered"):
        register_init("test-sqrt")(_sqrt)
