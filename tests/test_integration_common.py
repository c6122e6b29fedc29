"""What the framework integrations share (fxsparse.integrations.common), and that the core
imports none of the optional integrations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.integrations.common import SkippedStep, find_sparse, plain_optimizer, scheduler_options


def _sparse() -> fxsparse.SparseGraphModule:
    torch.manual_seed(0)
    return fxsparse.sparsify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5)


def test_the_core_imports_no_optional_integration():
    code = ("import sys, fxsparse, fxsparse.integrations, fxsparse.integrations.common; "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate', 'matplotlib', 'tensorboard', 'numba') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_sparse_module_is_found_inside_wrappers_and_holders():
    sparse = _sparse()
    assert find_sparse(sparse) is sparse
    assert find_sparse(torch.compile(sparse)) is sparse  # torch.compile's OptimizedModule

    class Holder(nn.Module):  # a LightningModule holds it as an attribute
        def __init__(self):
            super().__init__()
            self.net = sparse
            self.head = nn.Linear(3, 3)

    assert find_sparse(Holder()) is sparse
    with pytest.raises(TypeError, match="found 0"):
        find_sparse(nn.Linear(2, 2))
    two = nn.ModuleList([_sparse(), _sparse()])
    with pytest.raises(TypeError, match="found 2"):
        find_sparse(two)


def test_plain_optimizer_unwraps_framework_wrappers():
    opt = torch.optim.SGD(_sparse().parameters(), lr=0.1)

    class Wrapper(torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer subclasses Optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    class Lightning:
        def __init__(self, optimizer):
            self._optimizer = optimizer

    assert plain_optimizer(Wrapper(opt)) is opt and plain_optimizer(Lightning(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        plain_optimizer(object())
    with pytest.raises(TypeError, match="unexpected scheduler option"):
        scheduler_options(deltat=3)


def _stepped(optimizer_class, now: bool, **kwargs):
    sparse = _sparse()
    opt = optimizer_class(sparse.parameters(), lr=0.1, **kwargs)
    for _ in range(2):  # state to keep: momentum, Adam moments and step count
        sparse(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    sparse(torch.randn(4, 6)).sum().backward()
    before = ([p.clone() for p in sparse.parameters()], {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()})
    skip = SkippedStep(opt, now=now)
    opt.step()
    return sparse, opt, skip, before


@pytest.mark.parametrize("now", [False, True])
@pytest.mark.parametrize("optimizer_class, kwargs", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {}),
                                                     (torch.optim.AdamW, {"fused": True})])
def test_a_skipped_step_changes_no_weight_and_no_state_once(optimizer_class, kwargs, now):
    sparse, opt, skip, (weights, state) = _stepped(optimizer_class, now, **kwargs)
    for p, w in zip(sparse.parameters(), weights):
        assert torch.equal(p, w)
    for p, s in opt.state.items():
        for name, value in s.items():
            assert torch.equal(value, state[p][name]), name
    assert skip.handles == [] and all(g["params"] for g in opt.param_groups)
    opt.step()  # only that one step was skipped
    assert any(not torch.equal(p, w) for p, w in zip(sparse.parameters(), weights))


def test_a_skipped_step_under_a_grad_scaler_that_skips_it_is_undone_by_close():
    sparse = _sparse()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(sparse(torch.randn(4, 6)).sum()).backward()
    next(sparse.parameters()).grad[0, 0] = float("inf")  # the scaler will skip this step
    skip = SkippedStep(opt)
    scaler.step(opt)
    scaler.update()
    assert skip.handles and all(g["params"] for g in opt.param_groups)  # the step never ran
    skip.close()
    assert skip.handles == []
    opt.zero_grad()
    weights = [p.clone() for p in sparse.parameters()]
    scaler.scale(sparse(torch.randn(4, 6)).sum()).backward()
    scaler.step(opt)  # the next step is an ordinary one
    assert any(not torch.equal(p, w) for p, w in zip(sparse.parameters(), weights))
