"""No weight hides: a weight passed into a function the graph keeps whole is masked or listed.

``torch.fx.wrap`` / ``fxsparse.register_leaf_function`` / timm's no-trace functions become single
``call_function`` nodes. A weight given to one as an argument and used there by a conv, linear or
matmul gets the module-level fallback (zeroed before the forward, gradient masked on the
parameter, growth gradient hooked there); where fxsparse cannot tell how the function uses it,
it is listed in ``skipped`` with the reason. The invariant "every conv/linear/matmul weight is
masked or in ``skipped``" is checked against :func:`fxsparse.checks.product_weights`, which
watches the product kernels run (no graph analysis involved).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from invariants import assert_inactive_no_influence, assert_inactive_zero_grad
from mode_models import HELPERS, DeclaredNet, WrappedNet

import fxsparse
import importlib
from fxsparse.checks import check_model, product_weights
from fxsparse.probe import SparseReads

X = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))


def _net(helpers, seed=0):
    torch.manual_seed(seed)
    return WrappedNet(helpers)


@settings(max_examples=25)
@given(
    helpers=st.lists(st.sampled_from(sorted(HELPERS)), min_size=1, max_size=4, unique=True),
    with_inputs=st.booleans(),
    capture=st.sampled_from(["symbolic", "export"]),
    density=st.sampled_from([0.3, 0.6]),
)
def test_every_product_weight_passed_into_a_wrapped_function_is_masked_or_listed(helpers, with_inputs, capture, density):
    model = _net(tuple(helpers))
    inputs = X if with_inputs or capture == "export" else None
    sparse = fxsparse.sparsify(copy.deepcopy(model), density, "uniform", dense=[], example_inputs=inputs, capture=capture)
    skipped = dict(sparse.skipped)
    # the invariant, against the product kernels that really run
    watched = product_weights(model, (X,), {})
    hidden = set(watched) - set(sparse.masks) - set(skipped)
    assert not hidden, hidden
    for helper in helpers:
        kind, traceable = HELPERS[helper]
        for fqn in WrappedNet.WEIGHTS[helper]:
            if kind == "none":  # a position embedding: no product weight, neither masked nor listed
                assert fqn not in sparse.masks and fqn not in skipped and fqn not in watched
            elif kind == "computed" and capture == "export":  # inlined: the kernel is in the graph, masked there
                assert fqn in sparse.masks and sparse._fxsparse.sites[fqn].kernel == "graph", skipped
            elif kind == "computed":
                assert fqn in skipped and "left dense" in skipped[fqn], skipped
            elif traceable or inputs is not None:
                assert fqn in sparse.masks, (fqn, skipped)
            else:  # untraceable and nothing to run it on: listed with what to do
                assert "register_leaf_function" in skipped[fqn] and "example_inputs" in skipped[fqn]
    # exact budgets, and the masked weights keep every invariant
    for fqn, mask in sparse.masks.items():
        assert int(mask.sum()) == sparse._fxsparse.sites[fqn].active
    sparse.train()
    sparse(X).square().mean().backward()
    assert_inactive_zero_grad(sparse)
    assert set(sparse.masker.grads) == set(sparse.masks)
    for fqn, grad in sparse.masker.grads.items():  # dense: inactive entries too
        assert bool((grad * ~sparse.masks[fqn]).ne(0).any()) or sparse.masks[fqn].all(), fqn
    assert_inactive_no_influence(sparse, X)
    assert not sparse_reads(sparse, X)  # every product reads zeros where the mask is False
    sparse.rigl_step(0.3)
    sparse.verify()
    # density 1.0 computes what the model computes
    full = fxsparse.sparsify(copy.deepcopy(model), 1.0, example_inputs=inputs, capture=capture).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(X), model.eval()(X), rtol=1e-6, atol=1e-6)


def test_the_fallback_zeroes_before_the_forward_and_masks_the_gradient_on_the_parameter():
    sparse = fxsparse.sparsify(_net(("traceable_attention",)), 0.3, "uniform", dense=[])
    weight, mask = sparse.get_parameter("qkv.weight"), sparse.masks["qkv.weight"]
    assert sparse._fxsparse.sites["qkv.weight"].opaque  # the module-level fallback
    with torch.no_grad():
        weight.data.add_(~mask * 5.0)  # an edit nothing records
    out = sparse(X)
    assert bool((weight * ~mask).eq(0).all())  # zeroed by the prologue, before the read
    out.sum().backward()
    assert bool((weight.grad * ~mask).eq(0).all())


def test_check_model_fails_a_model_whose_wrapped_weights_stay_dense_unreported(monkeypatch):
    model = _net(("traceable_attention", "gated"))
    assert check_model(model, X).ok
    find_weights = importlib.import_module("fxsparse.passes.find_weights")  # the package re-exports the function
    monkeypatch.setattr(find_weights, "_is_leaf_call", lambda node: False)  # the analysis before issue 26
    report = check_model(model, X)
    assert not report.ok and report.failure.startswith("covered:"), report.failure
    assert "gate (read by a product kernel)" in report.failure and "neither masked nor listed" in report.failure


def test_declared_weight_arguments_are_taken_at_their_word():
    from mode_models import declared_linear

    fxsparse.register_leaf_function(declared_linear)
    with_no_inputs = fxsparse.sparsify(DeclaredNet(), 0.5, "uniform", dense=[])
    assert "w" in dict(with_no_inputs.skipped)  # a branch on a shape: cannot be told
    watched = fxsparse.sparsify(DeclaredNet(), 0.5, "uniform", dense=[], example_inputs=torch.randn(2, 8))
    assert "w" in watched.masks and "scale" not in watched.masks  # seen running
    fxsparse.register_leaf_function(declared_linear, weights=["w"])
    sparse = fxsparse.sparsify(DeclaredNet(), 0.5, "uniform", dense=[])
    assert "w" in sparse.masks and "scale" not in sparse.masks and "scale" not in dict(sparse.skipped)
    computed = fxsparse.sparsify(DeclaredNet(computed=True), 0.5, "uniform", dense=[])
    assert "w" not in computed.masks and "passed as the declared weight argument 'w'" in dict(computed.skipped)["w"]
    with pytest.raises(ValueError, match="expected weights= to name arguments"):
        fxsparse.register_leaf_function(declared_linear, weights=["weight"])


def test_weights_read_where_no_weight_is_expected_are_listed():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.latent = torch.nn.Parameter(torch.randn(4, 8))  # a learned query fed through q
            self.q = torch.nn.Linear(8, 8)
            self.rnn = torch.nn.GRU(8, 8)
            self.extra = torch.nn.Parameter(torch.randn(3, 8))  # a learned initial state
            self.head = torch.nn.Linear(8, 2)
            self.unused = torch.nn.Linear(8, 8)

        def forward(self, x):
            q = self.q(self.latent)
            out, _ = self.rnn(x + q.unsqueeze(1), self.extra.unsqueeze(0))
            return self.head(out.mean(0))

    sparse = fxsparse.sparsify(Net(), 0.5)
    skipped = dict(sparse.skipped)
    assert "input operand of q" in skipped["latent"]
    assert "the forward does not call" in skipped["unused.weight"]
    assert "into the opaque leaf module 'rnn'" in skipped["extra"]
    assert {"q.weight", "head.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= set(sparse.masks)
    assert check_model(Net(), torch.randn(4, 3, 8)).ok


def sparse_reads(sparse, x):
    """The weights some product of ``sparse`` read nonzero where their mask is False."""
    twin = copy.deepcopy(sparse)
    tensors = {**dict(twin.named_parameters()), **dict(twin.named_buffers())}
    with torch.no_grad(), SparseReads(tensors, twin.masks) as reads:
        twin(x)
    return reads.dense


def test_a_standardized_convolution_inside_an_opaque_leaf_is_masked_on_its_kernel():
    timm_layers = pytest.importorskip("timm.layers")

    @fxsparse.register_leaf_module
    class Block(torch.nn.Module):  # opaque: its convolutions reach the graph only through the fallback
        def __init__(self):
            super().__init__()
            self.std = timm_layers.StdConv2d(3, 4, 3)
            self.plain = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.plain(self.std(x))

    net = torch.nn.Sequential(Block(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 2))
    sparse = fxsparse.sparsify(net, 0.5, "uniform", dense=[])
    # the layer inside the leaf is replaced by its own trace, which masks the standardized kernel
    assert "0.std.weight" in sparse.masks and sparse._fxsparse.sites["0.std.weight"].kernel == "0.std"
    assert not sparse.skipped
    assert not sparse_reads(sparse, torch.randn(2, 3, 8, 8))
    assert {"0.plain.weight", "2.weight"} <= set(sparse.masks)  # a plain conv inside keeps the fallback
    assert check_model(net, torch.randn(2, 3, 8, 8)).ok


def test_a_weight_computed_before_a_wrapped_call_is_listed_where_a_product_reads_it():
    """``helper(x, w / w.norm(...))``: the argument is no parameter, the product inside reads a
    function of one. Listed as computed (traced into, watched running, or unknown without inputs);
    a computed argument no product reads is not listed once fxsparse can tell."""
    from mode_models import ComputedArgsNet as Net

    for inputs in (None, X):
        sparse = fxsparse.sparsify(Net(), 0.5, "uniform", dense=[], example_inputs=inputs)
        skipped = dict(sparse.skipped)
        assert set(sparse.masks) == {"head.weight"}
        assert skipped["normalized"].startswith("computed from it by truediv and passed as 'w' into the wrapped "
                                                "function mode_models.plain_linear; there: computed into the weight")
        assert "by mul and passed as 'w'" in skipped["scaled"] and "left dense" in skipped["scaled"]
        if inputs is None:
            assert "cannot trace into" in skipped["scaled"] and "example_inputs" in skipped["scaled"]
        else:
            assert "cannot trace into" not in skipped["scaled"]
        assert "pos" not in skipped  # traced into: a sum, no product
    assert check_model(Net(), X).ok
    find_weights = importlib.import_module("fxsparse.passes.find_weights")
    original = find_weights._computed_operand_params
    try:  # the analysis that did not look at computed arguments: the check catches it
        find_weights._computed_operand_params = lambda *args: {}
        report = check_model(Net(), X)
    finally:
        find_weights._computed_operand_params = original
    assert not report.ok and "normalized (computed into a product's operand)" in report.failure, report.failure


def test_a_model_passing_itself_into_a_wrapped_function_gets_a_clear_error_or_the_export_front_end():
    from mode_models import RootNet

    model = RootNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"RootNet passes itself \(self\) as an argument to through_root"):
        fxsparse.sparsify(model, 0.5, "uniform", dense=[])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    sparse = fxsparse.sparsify(model, 0.5, "uniform", dense=[], example_inputs=X)  # auto: export captures it
    assert sparse.capture == "export" and {"inner.weight", "matrix", "head.weight"} <= set(sparse.masks)


def test_a_wrapped_function_that_mutates_a_list_argument_is_watched_running():
    # torchvision's Swin3D pads its window_size list in place: watched under a plain
    # torch.fx.Interpreter, which hands over the graph's immutable list, the call raised and its
    # 48 attention weights were listed; the module's own code passes a fresh list
    model = _net(("windowed_linear",))
    sparse = fxsparse.sparsify(copy.deepcopy(model), 0.5, "uniform", dense=[], example_inputs=X)
    assert "windowed" in sparse.masks, dict(sparse.skipped).get("windowed")
    assert sparse._fxsparse.sites["windowed"].opaque
    assert check_model(model, X).ok
