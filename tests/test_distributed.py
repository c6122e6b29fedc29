"""DDP on CPU (gloo): two processes make the same topology updates, and the same as one process
with the same global batch (float64, so rounding cannot flip a choice)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxsparse
from fxsparse.distributed import assert_in_sync, fingerprint
from gloo import free_port, init

METHODS = {"rigl": {}, "snfs": {}, "rigl-sm": {}, "set": {}, "pruning": {"density": 0.2}, "rigl compact": {}}
LAYOUTS = {"rigl compact": {"5.weight": "compact"}}  # the linear head stored as its active weights
STEPS, DELTA_T, BATCH = 12, 2, 8


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5),
    ).double()


def _data():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _train(method, rank=0, world=1, check=lambda sparse: None):
    kwargs = METHODS[method]
    sparse = fxsparse.sparsify(_net(), 1.0 if method == "pruning" else 0.3, "erk", seed=3,
                               layout=LAYOUTS.get(method, "masked"))
    model = torch.nn.parallel.DistributedDataParallel(sparse) if world > 1 else sparse
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(
        sparse, optimizer, STEPS, delta_t=DELTA_T, end_fraction=1.0, method=method.split()[0], **kwargs
    )
    updates = 0
    for x, y in _data():
        share = BATCH // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for fqn, mask in sparse.masks.items():  # DDP's averaged gradient is still masked
            if sparse.compact_layer(fqn) is not None:
                continue  # no inactive weights, no gradient to mask
            assert bool((sparse.get_parameter(fqn).grad * ~mask).eq(0).all()), fqn
        updated = scheduler.is_update_step(scheduler.step_count + 1)
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()
        if updated:
            updates += 1
            check(sparse)
    return sparse, updates


def _worker(rank, world, port, out):
    init(rank, world, port)
    try:
        result = {}
        for method in METHODS:
            sparse, updates = _train(method, rank, world, check=assert_in_sync)  # after every update
            result[method] = (updates, {f: m.clone() for f, m in sparse.masks.items()},
                              {f: p.detach().clone() for f, p in sparse.sparse_weights.items()}, fingerprint(sparse))
        # the check can fail: one rank's topology edited behind the others' back
        if rank == 1:
            mask = sparse.masks[next(iter(sparse.masks))]
            mask.view(-1)[0] = ~mask.view(-1)[0]
        try:
            assert_in_sync(sparse)
            result["edit_detected"] = False
        except RuntimeError:
            result["edit_detected"] = True
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_hold_identical_masks_and_weights_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["edit_detected"] and ranks[1]["edit_detected"]
    for method in METHODS:
        (updates0, masks0, weights0, print0), (updates1, masks1, weights1, print1) = ranks[0][method], ranks[1][method]
        assert updates0 == updates1 >= 5, method
        assert torch.equal(print0, print1), method
        single, _ = _train(method)
        moved = False
        for fqn in masks0:
            assert torch.equal(masks0[fqn], masks1[fqn]), (method, fqn)
            assert torch.equal(weights0[fqn], weights1[fqn]), (method, fqn)
            assert torch.equal(masks0[fqn], single.masks[fqn]), (method, fqn, "2 processes vs 1")
            torch.testing.assert_close(weights0[fqn], single.sparse_weights[fqn].detach(), rtol=1e-9, atol=1e-12)
            moved |= not torch.equal(single.masks[fqn], fxsparse.sparsify(_net(), 1.0 if method == "pruning" else 0.3, "erk", seed=3).masks[fqn])
        if method in LAYOUTS:  # the compact run makes the masked run's decisions
            assert single.compact_layer("5.weight") is not None
            masked, _ = _train(method.split()[0])
            assert all(torch.equal(masks0[f], masked.masks[f]) for f in masks0), method
        assert moved, f"{method}: the topology never changed, the test would prove nothing"
