"""RigLScheduler: update cadence, arming, methods and exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fxsparse

pytestmark = pytest.mark.usefixtures("front_end")  # every test under both front-ends (tests/frontends.py)


def _setup(method="rigl", seed=0, total=40, delta_t=5):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    sparse = fxsparse.sparsify(net, 0.2, "erk", seed=seed)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    sched = fxsparse.RigLScheduler(sparse, opt, total_steps=total, delta_t=delta_t, alpha=0.3, end_fraction=0.75, method=method)
    return sparse, opt, sched


def _batches(n, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(n)]


def _train(sparse, opt, sched, batches, on_step=None):
    flags = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(sparse(x), y)
        loss.backward()
        if on_step:
            on_step(sparse)
        ok = sched.step()
        flags.append(ok)
        if ok:
            opt.step()
        opt.zero_grad()
    return flags


def test_updates_every_delta_t_until_t_end_and_skips_the_optimizer_there():
    sparse, opt, sched = _setup()
    captured = []
    flags = _train(sparse, opt, sched, _batches(40), on_step=lambda s: captured.append(bool(s.masker.grads or s.masker.candidates)))
    updates = [i + 1 for i, ok in enumerate(flags) if not ok]
    assert updates == [5, 10, 15, 20, 25, 30]  # t_end = 30
    # growth gradients (here as candidates: one backward a step) are kept only on update steps
    assert [i + 1 for i, c in enumerate(captured) if c] == updates
    assert sparse.masker.grads == {}
    assert int(sparse.get_buffer("fxsparse_updates")) == 6
    sparse.verify()


def test_each_update_replaces_the_cosine_fraction():
    sparse, opt, sched = _setup()
    seen = {}
    batches = _batches(30)
    for step, (x, y) in enumerate(batches, 1):
        torch.nn.functional.cross_entropy(sparse(x), y).backward()
        if not sched.step():
            seen[step] = sched.last_changes
        else:
            opt.step()
        opt.zero_grad()
    for step, changes in seen.items():
        fraction = 0.3 / 2 * (1 + math.cos(math.pi * step / 30))
        for change in changes.values():
            if change.active < 1000:
                assert change.dropped + change.regrown == math.floor(fraction * change.active)


def test_methods():
    masks0 = {f: m.clone() for f, m in _setup()[0].masks.items()}
    for method in ("static", "set", "rigl"):
        sparse, opt, sched = _setup(method)
        _train(sparse, opt, sched, _batches(40))
        changed = any(not torch.equal(masks0[f], m) for f, m in sparse.masks.items())
        assert changed == (method != "static"), method
        sparse.verify()
    with pytest.raises(ValueError, match=r"one of \[.*'rigl'.*\]"):
        _setup("rigl2")
    with pytest.raises(TypeError, match="sparsify"):
        fxsparse.RigLScheduler(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), 10)


def test_resume_gives_the_same_weights_and_masks_as_an_uninterrupted_run():
    batches = _batches(40)
    a, opt_a, sched_a = _setup()
    _train(a, opt_a, sched_a, batches)

    b, opt_b, sched_b = _setup()
    _train(b, opt_b, sched_b, batches[:17])
    checkpoint = copy.deepcopy({"model": b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()})
    # a fresh process: different initial seed, then the checkpoint is loaded
    c, opt_c, sched_c = _setup(seed=99)
    c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["opt"])
    sched_c.load_state_dict(checkpoint["sched"])
    _train(c, opt_c, sched_c, batches[17:])
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, c.state_dict()[name]), name


def test_history_and_stats_record_each_update_and_survive_resume():
    sparse, opt, sched = _setup(total=20, delta_t=5)
    assert sched.stats() == {"step": 0.0, "density": pytest.approx(sparse.density), "updates": 0.0}
    _train(sparse, opt, sched, _batches(12))
    assert [r["step"] for r in sched.history] == [5, 10]
    last = sched.history[-1]
    assert last["drop_fraction"] == pytest.approx(sched.drop_fraction(10))
    assert {fqn: layer["grown"] for fqn, layer in last["layers"].items()} == {
        fqn: change.grown for fqn, change in sched.last_changes.items()}
    stats = sched.stats()
    active = sum(layer["active"] for layer in last["layers"].values())
    grown = sum(layer["grown"] for layer in last["layers"].values())
    assert stats["updates"] == 2.0 and stats["update_step"] == 10.0 and stats["step"] == 12.0
    assert grown > 0 and stats["churn"] == pytest.approx(grown / active)
    twin = fxsparse.RigLScheduler(sparse, opt, total_steps=20, delta_t=5)
    twin.load_state_dict(copy.deepcopy(sched.state_dict()))
    assert twin.history == sched.history and twin.stats() == stats


def test_a_pruning_history_records_the_fraction_each_update_removed():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    sparse = fxsparse.sparsify(net, 1.0, "uniform")
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05)
    sched = fxsparse.RigLScheduler(sparse, opt, total_steps=20, delta_t=4, method="pruning", density=0.2, init="erk")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sparse(torch.randn(8, 16, generator=gen)).sum().backward()
        if sched.step():
            opt.step()
        opt.zero_grad()
    assert sched.history
    for record in sched.history:
        removed = sum(layer["dropped"] for layer in record["layers"].values())
        before = sum(layer["active"] for layer in record["layers"].values()) + removed
        assert record["drop_fraction"] == pytest.approx(removed / before)
    assert sum(int(m.sum()) for m in sparse.masks.values()) < sum(m.numel() for m in sparse.masks.values())
