"""The masked op's bookkeeping: when the forward may skip re-zeroing, and when it must not."""

from __future__ import annotations

import pytest
import torch

import fxsparse
from fxsparse import masking
from invariants import assert_inactive_no_influence


@pytest.fixture
def zeroing_calls(monkeypatch):
    calls = []
    real = masking.zero_inactive_

    def spy(weight, mask):
        calls.append(weight.shape)
        real(weight, mask)

    monkeypatch.setattr(masking, "zero_inactive_", spy)
    return calls


def _setup(optimizer_cls=torch.optim.SGD, **opt_kwargs):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    sparse = fxsparse.sparsify(net, 0.3)
    opt = optimizer_cls(sparse.parameters(), lr=0.05, **opt_kwargs)
    sched = fxsparse.RigLScheduler(sparse, opt, total_steps=100, delta_t=10)
    return sparse, opt, sched


def _step(sparse, opt, sched, x, edit_grads=None):
    torch.nn.functional.cross_entropy(sparse(x), torch.zeros(len(x), dtype=torch.long)).backward()
    if edit_grads:
        edit_grads(sparse)
    if sched.step():
        opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("opt", [(torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-3}),
                                 (torch.optim.AdamW, {"weight_decay": 0.1}),
                                 (torch.optim.Adam, {})])
def test_elementwise_optimizer_steps_need_no_forward_pass(zeroing_calls, opt):
    sparse, optimizer, sched = _setup(opt[0], **opt[1])
    x = torch.randn(8, 16)
    for _ in range(25):  # two topology updates included
        _step(sparse, optimizer, sched, x)
    assert len(zeroing_calls) == 2  # the first forward only, once per layer
    sparse.verify()  # and the inactive weights are indeed exactly zero
    assert int(sparse.fxsparse_updates) == 2


def test_an_edited_weight_is_zeroed_again_before_use(zeroing_calls):
    sparse, opt, sched = _setup()
    x = torch.randn(8, 16)
    _step(sparse, opt, sched, x)
    zeroing_calls.clear()
    with torch.no_grad():
        sparse.get_parameter("0.weight").add_(1.0)  # a user's edit of every entry
    assert_inactive_no_influence(sparse, x)
    assert len(zeroing_calls) >= 1
    sparse.verify()


def test_edited_gradients_are_not_trusted(zeroing_calls):
    sparse, opt, sched = _setup()
    x = torch.randn(8, 16)

    def add_noise(module):  # DP-SGD style noise reaches inactive entries
        for p in module.sparse_weights.values():
            p.grad.add_(torch.randn_like(p.grad))

    _step(sparse, opt, sched, x)
    zeroing_calls.clear()
    _step(sparse, opt, sched, x, edit_grads=add_noise)
    sparse.eval()
    with torch.no_grad():
        sparse(x)
    assert len(zeroing_calls) == 2  # the next forward zeroed both layers again
    sparse.verify()


def test_other_optimizers_are_not_trusted(zeroing_calls):
    class Mixing(torch.optim.SGD):  # an update that mixes entries, e.g. a preconditioner
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.mean() * torch.ones_like(p), alpha=-group["lr"])

    sparse, opt, sched = _setup(Mixing)
    x = torch.randn(8, 16)
    for _ in range(3):
        _step(sparse, opt, sched, x)
    assert len(zeroing_calls) == 6  # every forward zeroes both layers: nothing is assumed
    assert_inactive_no_influence(sparse, x)


def test_without_a_scheduler_every_changed_weight_is_zeroed_again(zeroing_calls):
    torch.manual_seed(0)
    sparse = fxsparse.sparsify(torch.nn.Sequential(torch.nn.Linear(16, 8)), 0.3)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    x = torch.randn(4, 16)
    for _ in range(3):
        sparse(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert len(zeroing_calls) == 3
    sparse.verify()
