"""FLOP and model-size accounting: the papers' anchors, density 1, monotonicity, FLOP budgets."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxsparse
import fxsparse.accounting
import fxsparse.models
from fxsparse import budgets
from fxsparse.accounting import GradualPruning, flop_report, flops, layer_flops, training_cost
from strategies import build, net_specs, sparsify


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def test_linear_and_conv_counts_are_two_per_multiply_accumulate():
    assert flops(_mlp(), torch.randn(8, 32)) == 2 * (32 * 64 + 64 * 10)
    assert flops(_mlp(), torch.randn(8, 32), per_sample=False) == 8 * 2 * (32 * 64 + 64 * 10)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1, groups=1), torch.nn.Conv2d(16, 16, 3, groups=4))
    # 2 * out elements * (in/groups * k * k)
    want = 2 * (16 * 8 * 8) * (3 * 9) + 2 * (16 * 6 * 6) * (4 * 9)
    assert flops(conv, torch.randn(2, 3, 8, 8)) == want


def test_dense_wrn22_2_at_32x32_is_3_15e8():
    model = fxsparse.models.wrn22_2(num_classes=10)
    got = flops(model, torch.randn(1, 3, 32, 32))
    assert got == pytest.approx(3.15e8, rel=0.01)
    assert got == 315_460_096  # the hook counter of fxsparse.models agrees to the FLOP


def test_dense_resnet50_at_224x224_is_8_2e9():
    model = timm.create_model("resnet50", pretrained=False)
    assert flops(model, torch.randn(1, 3, 224, 224)) == pytest.approx(8.2e9, rel=0.01)


def test_counting_leaves_the_model_untouched():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flop_report(model, torch.randn(4, 3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("wrn22_2", 32), ("resnet50", 32), ("vit_tiny_patch16_224", 224)])
def test_density_one_counts_what_the_original_counts_and_reports_every_weight(name, size):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x = torch.randn(2, 3, size, size)
    sparse = fxsparse.sparsify(model, 1.0, "erk", example_inputs=x)
    dense_report, sparse_report = flop_report(model, x), flop_report(sparse, x)
    assert sparse_report.sparse_flops == dense_report.dense_flops
    assert flops(sparse, x) == flops(model, x)
    weights = {r.name for r in sparse_report.rows if r.kind == "weight"}
    assert set(sparse.masks) <= weights
    if name.startswith("vit"):
        # attention's q @ k^T and attn @ v: dense products of two activations, reported apart
        assert sparse_report.activation_flops > 0
        assert any(r.kind == "activation" for r in sparse_report.rows)
    else:
        assert sparse_report.activation_flops == 0
    assert "inference FLOPs per sample" in str(sparse_report)


def test_sparse_flops_follow_each_layer_density():
    x = torch.randn(4, 3, 32, 32)
    sparse = fxsparse.sparsify(fxsparse.models.wrn22_2(num_classes=10), 0.1, "erk", example_inputs=x)
    report = flop_report(sparse, x)
    dense = layer_flops(sparse, x)
    for row in report.rows:
        mask = sparse.masks[row.name]
        assert row.density == int(mask.sum()) / mask.numel()
        assert row.sparse_flops == pytest.approx(row.density * dense[row.name] * 4)
    assert report.sparse_flops == pytest.approx(sum(r.sparse_flops for r in report.rows) / 4)
    summary = str(sparse.summary())
    assert "sparse FLOPs" in summary


@settings(max_examples=20, deadline=None)
@given(net_specs(), st.floats(0.05, 0.9), st.floats(0.05, 0.9), st.sampled_from(["erk", "uniform"]))
def test_sparse_flops_are_monotone_in_density_and_sum_over_layers(spec, d1, d2, init):
    net = build(spec)
    x = spec.input(2)
    lo, hi = sorted((d1, d2))
    reports = []
    for d in (lo, hi):
        sparse = sparsify(net, d, init, dense=[])
        report = flop_report(sparse, x)
        assert report.sparse_flops == pytest.approx(sum(r.sparse_flops for r in report.rows) / 2)
        reports.append(report)
    assert reports[0].sparse_flops <= reports[1].sparse_flops + 1e-6


def test_model_size_counts_active_weights_a_bit_per_mask_entry_and_dense_params():
    sparse = fxsparse.sparsify(_mlp(), 0.25, "uniform", dense=[])
    report = flop_report(sparse, torch.randn(1, 32))
    masks = sparse.masks
    want = sum(int(m.sum()) * 4 + math.ceil(m.numel() / 8) for m in masks.values()) + (64 + 10) * 4
    assert report.size_bytes == want
    assert report.dense_size_bytes == (32 * 64 + 64 + 64 * 10 + 10) * 4


def test_training_costs_follow_the_papers_formulas():
    f_s, f_d = 1.0, 10.0
    assert training_cost("dense", f_s, f_d) == 30.0
    assert training_cost("static", f_s, f_d) == training_cost("set", f_s, f_d) == 3.0
    assert training_cost("snfs", f_s, f_d) == 12.0
    assert training_cost("rigl", f_s, f_d, delta_t=100) == pytest.approx((300 + 2 + 10) / 101)
    with pytest.raises(ValueError, match="method"):
        training_cost("magic", f_s, f_d)
    x = torch.randn(1, 32)
    sparse = fxsparse.sparsify(_mlp(), 0.1, "erk")
    report = flop_report(sparse, x, total_steps=1000, pruning=GradualPruning(100, 700, 100))
    costs = {m: report.training(m) for m in fxsparse.accounting.METHODS}
    assert costs["dense"].multiplier == 1.0
    assert costs["static"].multiplier == pytest.approx(report.inference_multiplier)
    assert costs["static"].multiplier < costs["rigl"].multiplier < costs["snfs"].multiplier < 1.0
    assert costs["static"].multiplier < costs["pruning"].multiplier < 1.0
    # RigL per run: 7 updates (every 100 steps until 750) cost 2 f_S + f_D, the rest 3 f_S
    f_s, f_d = report.sparse_flops, report.dense_flops
    assert costs["rigl"].per_run == pytest.approx(993 * 3 * f_s + 7 * (2 * f_s + f_d))
    with pytest.raises(ValueError, match="pruning"):
        flop_report(sparse, x).training("pruning")


def test_pruning_schedule_is_the_cubic():
    schedule = GradualPruning(begin=0, end=1000, frequency=1)
    assert schedule.fraction_pruned(0) == 0.0
    assert schedule.fraction_pruned(500) == pytest.approx(1 - 0.5**3)
    assert schedule.fraction_pruned(1000) == 1.0
    with pytest.raises(ValueError):
        GradualPruning(begin=10, end=5)


# ------------------------------------------------------------------------------ FLOP budgets
@st.composite
def layer_costs(draw: st.DrawFn):
    n = draw(st.integers(1, 8))
    shapes, costs = {}, {}
    for i in range(n):
        shape = (draw(st.integers(1, 64)), draw(st.integers(1, 64)), *draw(st.sampled_from([(), (1, 1), (3, 3)])))
        shapes[f"l{i}"] = shape
        costs[f"l{i}"] = float(math.prod(shape) * draw(st.sampled_from([1, 4, 64, 1024])))
    return shapes, costs


@given(layer_costs(), st.floats(0.01, 1.0), st.sampled_from(["uniform", "er", "erk"]))
def test_flop_budget_is_met_within_one_weight_per_layer(layer, density, init):
    shapes, costs = layer
    densities = budgets.layer_densities(shapes, density, init, costs=costs)
    assert all(0.0 < d <= 1.0 for d in densities.values())
    counts = budgets.active_counts(shapes, densities)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    achieved = sum(counts[n] / sizes[n] * costs[n] for n in shapes)
    slack = sum(costs[n] / sizes[n] for n in shapes)  # one weight's FLOPs per layer
    # the count rule keeps at least one weight per layer, which can overshoot a tiny target
    floor = sum(costs[n] / sizes[n] for n in shapes if counts[n] == 1)
    assert achieved <= density * sum(costs.values()) + slack + floor
    assert achieved >= density * sum(costs.values()) - slack


def test_sparsify_with_a_flop_budget_meets_it_on_wrn():
    x = torch.randn(1, 3, 32, 32)
    model = fxsparse.models.wrn22_2(num_classes=10)
    per_layer = layer_flops(model, x)
    for init in ("uniform", "erk"):
        sparse = fxsparse.sparsify(model, 0.1, init, example_inputs=x, budget="flops")
        report = flop_report(sparse, x)
        weight_rows = [r for r in report.rows if r.kind == "weight" and r.name in sparse.masks]
        dense_total = sum(per_layer[r.name] for r in weight_rows)
        achieved = sum(r.sparse_flops for r in weight_rows)
        slack = sum(per_layer[r.name] / r.params for r in weight_rows)
        assert abs(achieved - 0.1 * dense_total) <= slack
    with pytest.raises(ValueError, match="example_inputs"):
        fxsparse.sparsify(model, 0.1, budget="flops")
    with pytest.raises(ValueError, match="budget"):
        fxsparse.sparsify(model, 0.1, budget="energy", example_inputs=x)
