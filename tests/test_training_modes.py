"""Real training set-ups: mixed precision (torch.autocast) and torch.compile (inductor on CPU).

Masks stay bool and weights keep their dtype under autocast; a compiled module computes what the
eager one computes, and its update steps still see the dense growth gradient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from invariants import assert_inactive_no_influence, assert_inactive_zero_grad

import fxsparse

pytestmark = pytest.mark.usefixtures("front_end")  # every test under both front-ends (tests/frontends.py)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10),
    )


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def _train(model, sparse, optimizer, scheduler, batches, autocast=None):
    for x, y in batches:
        if autocast is None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        else:
            with torch.autocast("cpu", dtype=autocast):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", ["rigl", "snfs", "set"])
def test_autocast_bf16_keeps_bool_masks_weight_dtypes_and_the_invariants(method):
    sparse = fxsparse.sparsify(_net(), 0.2, "erk")
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=12, delta_t=3, end_fraction=1.0, method=method)
    batches = _batches(12)
    before = {f: m.clone() for f, m in sparse.masks.items()}
    x, y = batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse(x)
    assert out.dtype == torch.bfloat16  # autocast is really on
    _train(sparse, sparse, optimizer, scheduler, batches, autocast=torch.bfloat16)
    assert int(sparse.get_buffer("fxsparse_updates")) == 4
    assert any(not torch.equal(before[f], m) for f, m in sparse.masks.items())  # the topology moved
    for fqn, mask in sparse.masks.items():
        assert mask.dtype == torch.bool
        assert sparse.get_parameter(fqn).dtype == torch.float32
    sparse.verify()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sparse(x).float().square().mean().backward()
    assert_inactive_zero_grad(sparse)
    for grad in sparse.masker.grads.values():
        assert grad.dtype == torch.float32  # the growth gradient of the fp32 weight
    assert_inactive_no_influence(sparse, x)


@pytest.mark.parametrize("candidates", [False, True], ids=["dense-gradient", "growth-candidates"])
def test_compiled_module_trains_like_the_eager_one_and_grows_from_the_dense_gradient(candidates):
    eager = fxsparse.sparsify(_net(), 0.2, "erk")
    compiled_sparse = copy.deepcopy(eager)
    compiled = torch.compile(compiled_sparse)
    runs = {}
    seen = {}
    for name, model, sparse in (("eager", eager, eager), ("compiled", compiled, compiled_sparse)):
        optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
        scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=6, delta_t=3, end_fraction=1.0,
                                           growth_candidates=candidates)
        captured = []
        step = sparse.rigl_step

        def spy(*args, _step=step, _sparse=sparse, _captured=captured, **kwargs):
            _captured.append({f: g.clone() for f, g in _sparse.masker.grads.items()} if not candidates else
                             dict(_sparse.masker.candidates))
            return _step(*args, **kwargs)

        sparse.rigl_step = spy
        _train(model, sparse, optimizer, scheduler, _batches(6))
        del sparse.rigl_step
        runs[name] = sparse
        seen[name] = captured
    assert len(seen["compiled"]) == 2
    for a, b in zip(seen["eager"], seen["compiled"]):
        assert set(a) == set(b) == {f for f, m in eager.masks.items() if not bool(m.all())} if candidates else set(eager.masks)
        for fqn in a:
            if candidates:  # the compiled backward's hooks kept the same candidates
                assert np.array_equal(a[fqn].index, b[fqn].index)
                np.testing.assert_allclose(a[fqn].active, b[fqn].active, rtol=1e-4, atol=1e-6)
                continue
            assert bool((b[fqn] * ~runs["compiled"].masks[fqn]).ne(0).any())  # dense: inactive entries too
            torch.testing.assert_close(a[fqn], b[fqn], rtol=1e-4, atol=1e-6)
    for fqn in eager.masks:
        assert torch.equal(runs["eager"].masks[fqn], runs["compiled"].masks[fqn])
        torch.testing.assert_close(runs["eager"].get_parameter(fqn), runs["compiled"].get_parameter(fqn), rtol=1e-4, atol=1e-6)
    runs["compiled"].verify()
    x, _ = _batches(1, seed=9)[0]
    eager.eval(), compiled_sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
