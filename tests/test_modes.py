"""Eval means eval: a sparse module computes in each mode what its model computes in that mode.

A graph fixes what depends on ``self.training`` when it is captured (functional drop path and
dropout, attention's dropout, heads computed only in training, constants of the mode). Whatever
mode the model is in when it is sparsified, the sparse module's train and eval modes must follow
the model's, under both front-ends; FLOP accounting counts the eval graph unless told otherwise,
and ``export_inference`` exports the eval graph.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from mode_models import MODE_FEATURES, ModeNet

import fxsparse
from fxsparse.checks import check_model

FRONT_ENDS = ("symbolic", "export")
X = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))


def _model(features, seed=0):
    torch.manual_seed(seed)
    return ModeNet(features)


def _assert_follows(sparse, model, x=X, exact=False):
    """Outputs equal the model's in eval mode and, under one seed, in train mode (both ways);
    ``exact``: bit for bit."""
    for mode in (False, True, False, True):
        sparse.train(mode)
        model.train(mode)
        with torch.no_grad():
            torch.manual_seed(7)
            want = model(x)
            torch.manual_seed(7)
            got = sparse(x)
        if exact:
            assert torch.equal(got, want), f"differs in {'train' if mode else 'eval'} mode"
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"differs in {'train' if mode else 'eval'} mode")


CASES = [(f,) for f in MODE_FEATURES] + [MODE_FEATURES]


@pytest.mark.parametrize("capture", FRONT_ENDS)
@pytest.mark.parametrize("traced_in", ["train", "eval"])
@pytest.mark.parametrize("features", CASES, ids=["+".join(c) for c in CASES])
def test_density_one_equals_the_model_in_both_modes_whatever_mode_it_was_sparsified_in(features, traced_in, capture):
    model = _model(features)
    model.train(traced_in == "train")
    sparse = fxsparse.sparsify(copy.deepcopy(model), 1.0, example_inputs=X, capture=capture)
    assert sparse.training == model.training  # sparsify keeps the model's mode
    _assert_follows(sparse, model)
    # the modes really differ here: otherwise the test would prove nothing
    model.eval()
    with torch.no_grad():
        evaluated = model(X)
    model.train()
    torch.manual_seed(7)
    with torch.no_grad():
        trained = model(X)
    assert not torch.allclose(evaluated, trained)


@pytest.mark.parametrize("capture", FRONT_ENDS)
def test_a_module_sparsified_in_eval_mode_trains_its_training_only_branch(capture):
    model = _model(("train_branch", "drop_path")).eval()
    sparse = fxsparse.sparsify(copy.deepcopy(model), 0.5, "uniform", dense=[], example_inputs=X, capture=capture)
    assert "aux.weight" in sparse.masks  # the head only training computes is sparsified too
    sparse.train()
    sparse(X).square().mean().backward()
    grad = sparse.get_parameter("aux.weight").grad
    assert grad is not None and bool(grad.ne(0).any())
    assert bool((grad * ~sparse.masks["aux.weight"]).eq(0).all())
    assert "aux.weight" in sparse.masker.grads
    sparse.rigl_step(0.3)
    sparse.verify()
    # eval mode does not read the head: its output ignores it, and it needs no gradient there
    sparse.eval()
    with torch.no_grad():
        before = sparse(X)
        sparse.get_parameter("aux.weight").mul_(3)
        assert torch.equal(sparse(X), before)


def test_one_graph_serves_both_modes_when_they_trace_alike():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    sparse = fxsparse.sparsify(net, 0.5)
    assert sparse._fxsparse.mode_graphs is None  # modules read their mode when they run
    graph = sparse.graph
    sparse.eval()
    assert sparse.graph is graph


@pytest.mark.parametrize("capture", FRONT_ENDS)
def test_copies_pickles_and_checkpoints_keep_both_modes(capture):
    model = _model(MODE_FEATURES)
    sparse = fxsparse.sparsify(copy.deepcopy(model), 0.5, example_inputs=X, capture=capture)
    sparse.eval()  # copied and saved in eval mode: the train graph must come along
    twin = copy.deepcopy(sparse)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    fresh = fxsparse.sparsify(copy.deepcopy(model), 0.5, example_inputs=X, capture=capture, seed=1)
    fresh.load_state_dict(sparse.state_dict())
    for other in (twin, loaded, fresh):
        _assert_follows(other, sparse, exact=True)


def test_flops_count_the_eval_graph_unless_told_otherwise():
    model = _model(("train_branch",))
    head = 2 * 16 * 5  # the auxiliary head's multiply-adds per sample, in FLOPs
    model.train()
    dense_eval = fxsparse.flops(model, X)
    assert fxsparse.flops(model, X, mode="train") == dense_eval + head * 1  # one pooled row a sample
    sparse = fxsparse.sparsify(copy.deepcopy(model), 1.0, example_inputs=X)
    sparse.train()
    assert fxsparse.flops(sparse, X) == dense_eval  # a module in train mode still counts inference
    assert fxsparse.flops(sparse, X, mode="train") == dense_eval + head
    assert sparse.training and sparse.graph is sparse._fxsparse.mode_graphs[True]  # left as it was
    with pytest.raises(ValueError, match="mode='eval'"):
        fxsparse.flops(sparse, X, mode="inference")


def test_export_inference_exports_the_eval_graph_of_a_module_sparsified_in_train_mode():
    model = _model(("drop_path", "dropout", "mode_constant")).train()
    sparse = fxsparse.sparsify(copy.deepcopy(model), 0.5, example_inputs=X)
    sparse.train()
    exported = fxsparse.export_inference(sparse, X, autotune=False)
    sparse.eval()
    with torch.no_grad():
        want = sparse(X)
        torch.testing.assert_close(exported(X), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported(X), exported(X))  # nothing random left
    assert sparse.training is False


@pytest.mark.parametrize("only", [True, False], ids=["train-graph-only", "eval-graph-only"])
def test_check_model_reports_a_module_that_keeps_the_mode_it_was_traced_in(monkeypatch, only):
    import fxsparse.capture as capture

    model = _model(("drop_path",))
    assert check_model(model, X, capture="symbolic").ok
    real = capture._symbolic
    monkeypatch.setattr(capture, "_symbolic", lambda m, n, modes, keywords=(): real(m, n, (only,), keywords))  # one mode's graph
    report = check_model(model, X, capture="symbolic")
    # checked in eval mode first, then in train mode again
    assert not report.ok and report.failure.startswith("density_one:" if only else "modes:"), report.failure
    assert report.passed.get("density_one") is (not only)


@pytest.mark.parametrize("features", list(itertools.combinations(MODE_FEATURES, 2))[:4])
def test_check_model_passes_mode_dependent_models(features):
    report = check_model(_model(features), X)
    assert report.ok, report.failure


@pytest.mark.parametrize("capture", FRONT_ENDS)
def test_the_graph_follows_a_mode_set_by_assignment(capture):
    """``module.training = mode`` (how Lightning restores modes after validation) never calls
    train(): the module still runs the graph of the mode it is in, and submodules keep theirs."""
    model = _model(MODE_FEATURES)
    sparse = fxsparse.sparsify(copy.deepcopy(model), 1.0, example_inputs=X, capture=capture)
    assert sparse._fxsparse.mode_graphs is not None
    for mode in (False, True, False):
        for module in (*sparse.modules(), *model.modules()):
            module.training = mode
        with torch.no_grad():
            torch.manual_seed(7)
            want = model(X)
            torch.manual_seed(7)
            got = sparse(X)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"differs in {'train' if mode else 'eval'} mode")
        assert sparse.graph is sparse._fxsparse.mode_graphs[mode]
    sparse.train()
    sparse.get_submodule("norm").training = False  # a submodule set apart (frozen normalization)
    sparse(X)
    assert sparse.graph is sparse._fxsparse.mode_graphs[True] and not sparse.get_submodule("norm").training
