"""Invariants 1-6 (docs/invariants.md) as properties over generated MLPs and CNNs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxsparse
from fxsparse.checks import check_model
from invariants import (
    assert_budget,
    assert_inactive_no_influence,
    assert_inactive_zero_grad,
    assert_update_invariants,
    snapshot,
    train_step,
)
from strategies import build, densities, heavy, net_specs, sparsify

INITS = ["uniform", "er", "erk"]


def _expected_weights(spec) -> set[str]:
    """The weights a correct discovery must find in a generated net, by construction."""
    names = {f"convs.{i}.weight" for i in range(len(spec.convs))}
    names |= {f"linears.{i}.weight" for i in range(len(spec.hidden))}
    names |= {"head.weight"}
    if spec.shared:
        names.add("shared.weight")
    if spec.tied:
        names.add("tie_a.weight")
    if spec.functional:
        names.add("proj")
    return names


@given(net_specs(), densities(), st.sampled_from(INITS), st.integers(0, 3))
def test_sparsify_finds_every_weight_with_its_exact_budget(spec, density, init, seed):
    model = build(spec)
    before = copy.deepcopy(model.state_dict())
    sparse = sparsify(model, density, init, seed=seed)
    assert set(sparse.masks) == _expected_weights(spec)
    assert_budget(sparse, density, init)
    sparse.verify()
    # the model it was given is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


@heavy()
@given(net_specs())
def test_density_one_computes_exactly_what_the_model_computes(spec):
    model = build(spec)
    sparse = fxsparse.sparsify(model, 1.0, **spec.capture_args())
    x = spec.input()
    model.eval(), sparse.eval()
    with torch.no_grad():
        assert torch.equal(model(x), sparse(x))
    model.train(), sparse.train()
    torch.manual_seed(0)
    out_model = model(x)
    out_model.square().mean().backward()
    out_sparse = sparse(x)
    out_sparse.square().mean().backward()
    assert torch.equal(out_model, out_sparse)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, p in sparse.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


@heavy()
@given(net_specs(), densities(), st.sampled_from(INITS))
def test_inactive_weights_cannot_influence_output_and_get_no_gradient(spec, density, init):
    sparse = sparsify(build(spec), density, init)
    x = spec.input()
    assert_inactive_no_influence(sparse, x)
    sparse.train()
    sparse(x).square().mean().backward()
    assert_inactive_zero_grad(sparse)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@heavy()
@given(
    net_specs(),
    st.floats(0.05, 0.9),
    st.sampled_from(INITS),
    st.sampled_from(sorted(OPTIMIZERS)),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    st.sampled_from(["gradient", "random"]),
)
def test_rigl_steps_keep_counts_zero_new_weights_and_their_state(spec, density, init, opt_name, fractions, grow):
    sparse = sparsify(build(spec), density, init)
    optimizer = OPTIMIZERS[opt_name](sparse.parameters())
    x = spec.input()
    for fraction in fractions:
        train_step(sparse, optimizer, x)
        optimizer.step()  # momentum / Adam moments become non-zero
        train_step(sparse, optimizer, x)
        before = snapshot(sparse, optimizer)
        changes = sparse.rigl_step(fraction, optimizer=optimizer, grow=grow)
        assert_update_invariants(before, sparse, optimizer, fraction, grow)
        assert {f: c.active for f, c in changes.items()} == {f: int(m.sum()) for f, m in sparse.masks.items()}
        assert sparse.masker.grads == {}
        sparse.verify()
        assert_inactive_no_influence(sparse, x)
        sparse.train()
        train_step(sparse, optimizer, x)
        assert_inactive_zero_grad(sparse)


@heavy()
@given(net_specs(), densities(), st.sampled_from(INITS), st.integers(0, 1000))
def test_state_dict_deepcopy_and_dtype_keep_masks_and_outputs(spec, density, init, seed):
    model = build(spec)
    sparse = sparsify(model, density, init, seed=seed)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    x = spec.input()
    train_step(sparse, optimizer, x)
    sparse.rigl_step(0.5, optimizer)
    sparse.eval()
    with torch.no_grad():
        reference = sparse(x)

    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    fresh = sparsify(model, density, init, seed=seed + 1)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    copied = copy.deepcopy(sparse)
    wide = copy.deepcopy(sparse).to(torch.float64)
    whole = io.BytesIO()
    torch.save(sparse, whole)
    pickled = torch.load(io.BytesIO(whole.getvalue()), weights_only=False)
    assert isinstance(pickled, fxsparse.SparseGraphModule)
    for other in (fresh, copied, wide, pickled):
        other.eval()
        assert other.masks.keys() == sparse.masks.keys()
        for fqn, mask in sparse.masks.items():
            assert other.masks[fqn].dtype == torch.bool
            assert torch.equal(other.masks[fqn], mask), fqn
        other.verify()
        with torch.no_grad():
            out = other(x.to(torch.float64) if other is wide else x)
        if other is wide:
            torch.testing.assert_close(out, reference.double(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out, reference)
    assert int(fresh.get_buffer("fxsparse_updates")) == 1
    # a copy is independent: updating it leaves the original's masks alone
    snapshot_masks = {f: m.clone() for f, m in sparse.masks.items()}
    copied.train()
    train_step(copied, torch.optim.SGD(copied.parameters(), lr=0.1), x)
    copied.rigl_step(1.0)
    assert all(torch.equal(snapshot_masks[f], m) for f, m in sparse.masks.items())


@given(net_specs(), densities(), st.sampled_from(INITS), st.integers(0, 1000))
def test_same_seed_same_masks(spec, density, init, seed):
    model = build(spec)
    a = sparsify(model, density, init, seed=seed)
    b = sparsify(model, density, init, seed=seed)
    assert all(torch.equal(a.masks[f], b.masks[f]) for f in a.masks)
    x = spec.input()
    for sparse in (a, b):
        train_step(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), x)
        sparse.rigl_step(0.3)
        train_step(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), x)
        sparse.rigl_step(0.3, grow="random")
    assert all(torch.equal(a.masks[f], b.masks[f]) for f in a.masks)


def test_different_seeds_give_different_masks():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    a = fxsparse.sparsify(net, 0.3, seed=0)
    b = fxsparse.sparsify(net, 0.3, seed=1)
    assert not all(torch.equal(a.masks[f], b.masks[f]) for f in a.masks)


def test_tied_and_shared_weights_get_one_mask_and_one_growth_gradient():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.s = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.s(self.s(self.b(self.a(x))))

    sparse = fxsparse.sparsify(Tied(), 0.5)
    assert sorted(sparse.masks) == ["a.weight", "s.weight"]
    masked_nodes = [n for n in sparse.graph.nodes if n.op == "call_module" and n.target == "fxsparse_masker"]
    assert sorted(n.kwargs["name"] for n in masked_nodes) == ["a.weight", "a.weight", "s.weight"]  # one per name read
    assert sparse.get_parameter("a.weight") is sparse.get_parameter("b.weight")
    x = torch.randn(4, 8)
    sparse(x).sum().backward()
    assert sparse.masker.grads.keys() == {"a.weight", "s.weight"}
    # the captured gradient is the total over both uses: compare with autograd on w*m directly
    w = (sparse.get_parameter("s.weight") * sparse.masks["s.weight"]).detach().requires_grad_()
    wa = sparse.get_parameter("a.weight") * sparse.masks["a.weight"]
    h = torch.nn.functional.linear(x, wa, sparse.get_parameter("a.bias"))
    h = torch.nn.functional.linear(h, wa, sparse.get_parameter("b.bias"))
    out = torch.nn.functional.linear(torch.nn.functional.linear(h, w, sparse.get_parameter("s.bias")), w, sparse.get_parameter("s.bias"))
    (g,) = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(sparse.masker.grads["s.weight"], g)


def test_functional_weights_and_views_are_found():
    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 8))
            self.v = torch.nn.Parameter(torch.randn(8, 4))
            self.pos = torch.nn.Parameter(torch.randn(1, 8))  # added, not multiplied: stays dense
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            x = torch.nn.functional.linear(x, self.w.t()) + self.pos
            x = torch.nn.functional.linear(x, self.lin.weight, self.lin.bias)
            return torch.einsum("bi,ij->bj", x, self.v)

    sparse = fxsparse.sparsify(Functional(), 0.5, "uniform", dense=[])
    assert sorted(sparse.masks) == ["lin.weight", "v", "w"]
    x = torch.randn(3, 16)
    assert_inactive_no_influence(sparse, x)


def test_conv_variants_are_rewritten_faithfully():
    layers = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular"),
        torch.nn.ConvTranspose1d(4, 4, 3, stride=2, output_padding=1, groups=2),
        torch.nn.Conv1d(4, 6, 3, padding="same", dilation=2, padding_mode="reflect"),
    )
    net3d = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ConvTranspose3d(4, 2, 2, stride=2))
    for model, x in [(layers, torch.randn(2, 2, 10)), (net3d, torch.randn(1, 2, 4, 4, 4))]:
        sparse = fxsparse.sparsify(model, 1.0)
        with torch.no_grad():
            assert torch.equal(model(x), sparse(x))
        assert all(n.op != "call_module" or n.target == "fxsparse_masker" for n in sparse.graph.nodes)


def test_summary_lists_every_layer_and_the_total():
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    sparse = fxsparse.sparsify(net, 0.2, "er")
    text = str(sparse.summary())
    assert "0.weight" in text and "2.weight" in text and "20x10" in text
    summary = sparse.summary()
    assert summary.total == 300 and summary.active == sum(int(m.sum()) for m in sparse.masks.values())


def test_state_dict_has_every_parameter_under_its_original_name_and_the_masks():
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(4, 4)
            self.unused = torch.nn.Linear(4, 4)
            self.register_buffer("scratch", torch.ones(1), persistent=False)

        def forward(self, x):
            return self.used(x) * self.scratch

    model = WithUnused()
    sparse = fxsparse.sparsify(model, 0.5)
    keys = set(sparse.state_dict())
    assert set(model.state_dict()) <= keys
    assert "used.weight_mask" in keys and "scratch" not in keys
    assert keys - set(model.state_dict()) == {"used.weight_mask", "fxsparse_updates"}


def test_dense_and_exclude_patterns():
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 40), torch.nn.Linear(40, 5))
    sparse = fxsparse.sparsify(net, 0.3, "erk", dense=["0.*"], exclude=["3.weight"])
    assert sorted(sparse.masks) == ["0.weight", "2.weight"]
    assert bool(sparse.masks["0.weight"].all())
    assert ("3.weight", "excluded by exclude=") in sparse.skipped
    assert abs(sparse.density - 0.3) * 1000 <= 2
    with pytest.raises(ValueError, match="dense=\\[\\]"):
        fxsparse.sparsify(net, 0.1, "uniform")  # the dense first layer alone exceeds 10%
    uniform = fxsparse.sparsify(net, 0.3, "uniform")
    assert bool(uniform.masks["0.weight"].all())  # the papers' default: first layer dense
    fully = fxsparse.sparsify(net, 0.3, "uniform", dense=[])
    assert not bool(fully.masks["0.weight"].all())
    explicit = fxsparse.sparsify(net, 0.3, {"0.weight": 0.5})
    assert int(explicit.masks["0.weight"].sum()) == 100 and int(explicit.masks["3.weight"].sum()) == 60


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_density_is_a_clear_error_and_touches_nothing(bad):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises((ValueError, TypeError), match="expected density"):
        fxsparse.sparsify(net, bad)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_other_bad_inputs_are_clear_errors():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"one of \['er', 'erk', 'uniform'\]"):
        fxsparse.sparsify(net, 0.5, init="erdos")
    with pytest.raises(ValueError, match="unknown"):
        fxsparse.sparsify(net, 0.5, init={"nope.weight": 0.3})
    with pytest.raises(TypeError, match="nn.Module"):
        fxsparse.sparsify(lambda x: x, 0.5)
    with pytest.raises(ValueError, match="no convolution, linear or matmul|found none"):
        fxsparse.sparsify(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.LayerNorm(4)), 0.5)
    with pytest.raises(ValueError, match="match none"):
        fxsparse.sparsify(net, 0.5, dense=["missing.*"])
    with pytest.raises(ValueError, match="looks already sparsified"):
        fxsparse.sparsify(fxsparse.sparsify(net, 0.5), 0.5)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert list(net.named_buffers()) == [] and not hasattr(net, "fxsparse_masker")


def test_untraceable_model_names_the_module_and_the_fix():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Branchy()
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.block(x))

    model = Outer()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"inside 'block' \(Branchy\).*register_leaf_module"):
        fxsparse.sparsify(model, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_registered_leaf_module_is_traced_around_and_unknown_weights_inside_listed_as_skipped():
    @fxsparse.register_leaf_module
    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)  # a Linear inside: the module-level fallback masks it
            self.raw = torch.nn.Parameter(torch.randn(4, 4))  # used somehow: left dense, said why

        def forward(self, x):
            return self.lin(x) @ self.raw if x.sum() > 0 else -x

    model = torch.nn.Sequential(Opaque(), torch.nn.Linear(4, 2))
    sparse = fxsparse.sparsify(model, 0.5)
    assert list(sparse.masks) == ["0.lin.weight", "1.weight"]
    assert sparse.skipped[0][0] == "0.raw" and "opaque leaf" in sparse.skipped[0][1]
    assert "register_leaf_weights" in sparse.skipped[0][1]
    fxsparse.register_leaf_weights(Opaque, ["raw"])
    assert sorted(fxsparse.sparsify(model, 0.5).masks) == ["0.lin.weight", "0.raw", "1.weight"]


class _Leafy(torch.nn.Module):
    """Weights the graph cannot see: MultiheadAttention's projections and an LSTM's matrices."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = torch.nn.LSTM(8, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)
        h, _ = self.attn(h, h, h)
        h, _ = self.rnn(h)
        return self.head(h.mean(1))


def test_weights_inside_opaque_leaves_get_the_same_invariants():
    torch.manual_seed(0)
    model = _Leafy()
    sparse = fxsparse.sparsify(model, 0.3)
    inside = ["attn.in_proj_weight", "attn.out_proj.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert set(inside) <= set(sparse.masks) and sparse.skipped == []
    x = torch.randn(2, 3, 6, 6)
    assert_budget(sparse, 0.3, "erk")
    assert_inactive_no_influence(sparse, x)
    sparse.zero_grad()
    sparse(x).square().sum().backward()
    assert_inactive_zero_grad(sparse)
    # the captured growth gradient is dL/d(w*m), dense: autograd on a copy holding w*m
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, mask in sparse.masks.items():
            reference.get_parameter(fqn).copy_(sparse.get_parameter(fqn) * mask)
    reference(x).square().sum().backward()
    for fqn in inside:
        torch.testing.assert_close(sparse.masker.grads[fqn], reference.get_parameter(fqn).grad)
        assert bool((sparse.masker.grads[fqn] * ~sparse.masks[fqn]).ne(0).any())
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    sparse.rigl_step(0.3, opt)
    sparse.verify()
    # masks persist through state_dict and deepcopy like any other
    copied = copy.deepcopy(sparse)
    assert all(torch.equal(copied.masks[f], m) for f, m in sparse.masks.items())
    state = sparse.state_dict()
    assert all(f"{fqn}_mask" in state for fqn in inside)
    fresh = fxsparse.sparsify(model, 0.3, seed=1)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[f], m) for f, m in sparse.masks.items())
    torch.testing.assert_close(fresh(x), sparse(x))


class _Recurrent(torch.nn.Module):
    """Stacked LSTM and GRU: torch.export leaves one aten.lstm / aten.gru node per module, reading
    every layer's matrices from a list argument."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 8, num_layers=2, batch_first=True)
        self.gru = torch.nn.GRU(8, 6, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.head(h[:, -1])


def test_recurrent_weights_are_masked_under_torch_export():
    # export's aten.lstm(input, hx, params, ...) reads the matrices from its list argument: they
    # were neither masked nor listed (transformers' Parakeet RNN-T decoder under 5.25)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    sparse = fxsparse.sparsify(_Recurrent(), 0.5, "uniform", dense=[], example_inputs=x, capture="export")
    matrices = {n for n, p in _Recurrent().named_parameters() if p.dim() == 2 and not n.startswith("head")}
    assert len(matrices) == 8 and matrices <= set(sparse.masks) and not sparse.skipped
    assert not any(sparse._fxsparse.sites[fqn].opaque for fqn in matrices)  # masked in the graph
    assert_inactive_no_influence(sparse, x)
    sparse(x).square().sum().backward()
    assert_inactive_zero_grad(sparse)
    assert matrices <= set(sparse.masker.grads)
    report = check_model(_Recurrent(), x, capture="export")
    assert report.ok, report.failure


def test_a_copy_of_an_unpickled_module_keeps_its_state():
    import pickle

    sparse = fxsparse.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), 0.5)
    loaded = pickle.loads(pickle.dumps(sparse))
    copied = copy.deepcopy(loaded)  # lost the state: torch does not copy the pickled `meta` back
    assert set(copied.masks) == set(sparse.masks)
    assert all(torch.equal(copied.masks[f], m) for f, m in sparse.masks.items())
    copied(torch.randn(3, 4)).sum().backward()
    copied.rigl_step(0.3)
    copied.verify()


def test_rigl_step_without_backward_is_a_clear_error():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    sparse = fxsparse.sparsify(net, 0.5)
    with pytest.raises(ValueError, match="loss.backward"):
        sparse.rigl_step(0.3)
    sparse.arm_growth(False)
    sparse(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="arm_growth"):
        sparse.rigl_step(0.3)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="drop_fraction"):
            sparse.rigl_step(bad)
    with pytest.raises(ValueError, match="grow"):
        sparse.rigl_step(0.3, grow="momentum?")
    sparse.rigl_step(0.3, grow="random")  # SET needs no gradient
    sparse.verify()


def test_capture_keeps_last_backward_or_accumulates_micro_batches():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8))
    sparse = fxsparse.sparsify(net, 0.5)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    sparse(x1).sum().backward()
    first = sparse.masker.grads["0.weight"].clone()
    sparse(x2).sum().backward()
    second = sparse.masker.grads["0.weight"].clone()
    assert not torch.equal(first, second)  # replaced by the last backward
    sparse.arm_growth(accumulate=True)
    sparse(x1).sum().backward()
    sparse(x2).sum().backward()
    torch.testing.assert_close(sparse.masker.grads["0.weight"], first + second)
    sparse.arm_growth(False)
    sparse(x1).sum().backward()
    assert sparse.masker.grads == {}


def test_gradient_is_masked_on_every_path_and_the_growth_gradient_stays_dense():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 6))
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x):
            # w also feeds a sum, whose backward hands out an expanded view
            return self.lin(torch.nn.functional.linear(x, self.w)) + self.w.sum()

    sparse = fxsparse.sparsify(Mixed(), 0.5, "uniform", dense=[])
    x = torch.randn(5, 6)
    for armed in (False, True):
        sparse.zero_grad()
        sparse.arm_growth(armed)
        # a loss term on the parameter outside the module, and two accumulated backward passes
        for _ in range(2):
            (sparse(x).square().sum() + sparse.get_parameter("w").abs().sum()).backward()
        # reference: the same computation by hand on w * m
        w = sparse.get_parameter("w").detach().requires_grad_()
        lw = sparse.get_parameter("lin.weight").detach().requires_grad_()
        mw, ml = sparse.masks["w"].float(), sparse.masks["lin.weight"].float()
        for _ in range(2):
            wm = w * mw
            out = torch.nn.functional.linear(torch.nn.functional.linear(x, wm), lw * ml, sparse.get_parameter("lin.bias")) + wm.sum()
            (out.square().sum() + wm.abs().sum()).backward()
        torch.testing.assert_close(sparse.get_parameter("w").grad, w.grad)
        torch.testing.assert_close(sparse.get_parameter("lin.weight").grad, lw.grad)
        if armed:  # the dense growth gradient is intact: masking .grad left it alone
            assert bool((sparse.masker.grads["lin.weight"] * ~sparse.masks["lin.weight"]).ne(0).any())
    # a copy masks its own gradients; the original keeps masking its own
    copied = copy.deepcopy(sparse)
    for module in (copied, sparse, copied):
        module.zero_grad()
        module(x).square().sum().backward()
        for fqn, mask in module.masks.items():
            assert bool((module.get_parameter(fqn).grad * ~mask).eq(0).all()), fqn


def test_check_model_reports_the_first_failing_check(monkeypatch):
    from fxsparse import checks

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    report = checks.check_model(net, torch.randn(3, 8))
    assert report.ok and report.coverage == 1.0 and set(report.passed) == set(checks.CHECKS)
    # a broken update that loses a connection is caught by the counts after rigl_step
    real = fxsparse.topology.apply_update

    def loses_one(weight, mask, update, state=()):
        real(weight, mask, update, state)
        mask.view(-1)[mask.view(-1).nonzero()[0]] = False

    monkeypatch.setattr(fxsparse.topology, "apply_update", loses_one)
    report = checks.check_model(net, torch.randn(3, 8))
    assert not report.ok and report.failure.startswith("rigl_step:")


def test_a_layer_whose_output_never_reaches_the_loss_grows_from_a_zero_gradient():
    """A pooler computed and thrown away (LayoutLM, SigLIP's head): its dense gradient is exactly
    zero, so an update proceeds (drop by magnitude, grow among zeros) instead of refusing."""

    class Discarded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.pooler, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            pooled = torch.tanh(self.pooler(h))  # noqa: F841 - computed, not used
            return self.head(h)

    torch.manual_seed(0)
    sparse = fxsparse.sparsify(Discarded(), 0.5)
    assert "pooler.weight" in sparse.masks
    sparse(torch.randn(4, 6)).sum().backward()
    assert "pooler.weight" not in sparse.masker.grads
    counts = {f: int(m.sum()) for f, m in sparse.masks.items()}
    sparse.rigl_step(0.5)
    assert counts == {f: int(m.sum()) for f, m in sparse.masks.items()}
    sparse.verify()
