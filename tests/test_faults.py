"""Faults get clear errors and lose nothing: NaN/inf at an update, fp16 loss scaling, bad
state_dicts, truncated checkpoints, and a data-parallel rank whose masks diverged."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxsparse
from fxsparse.graph_module import StateDictError
from gloo import free_port, init

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("front_end")  # every test under both front-ends (tests/frontends.py)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 5)
    )


def _setup(method="rigl", density=0.3, delta_t=2, **kwargs):
    sparse = fxsparse.sparsify(_net(), density, "erk", seed=1)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, 20, delta_t=delta_t, end_fraction=1.0, method=method, **kwargs)
    return sparse, optimizer, scheduler


def _x(seed=0):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _masks(sparse):
    return {f: m.clone() for f, m in sparse.masks.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step(sparse, optimizer, scheduler, x, scale=1.0):
    (sparse(x).square().mean() * scale).backward()
    if scheduler.step():
        optimizer.step()
    optimizer.zero_grad()


# --- NaN and inf at a topology update ------------------------------------------------------------


@pytest.mark.parametrize("method", ["rigl", "rigl-sg", "rigl-sm", "snfs"])
def test_a_nan_loss_at_an_update_is_a_clear_error_and_changes_no_mask(method):
    sparse, optimizer, scheduler = _setup(method)
    _step(sparse, optimizer, scheduler, _x())
    before = _masks(sparse)
    with pytest.raises(FloatingPointError, match="NaN or inf") as error:
        _step(sparse, optimizer, scheduler, _x(1), scale=float("nan"))  # step 2: an update
    assert "0.weight" in str(error.value) or "3.weight" in str(error.value)
    assert _same(before, sparse.masks)
    assert scheduler.step_count == 1 and int(sparse.fxsparse_updates) == 0  # the update did not happen


def test_inf_in_one_layers_growth_gradient_names_that_layer():
    sparse, optimizer, scheduler = _setup()
    _step(sparse, optimizer, scheduler, _x())
    sparse(_x(1)).square().mean().backward()
    if "3.weight" in sparse.masker.grads:  # the dense gradient
        sparse.masker.grads["3.weight"].view(-1)[5] = float("inf")
    else:  # growth candidates (one backward a step): what an inf gradient leaves there
        kept = sparse.masker.candidates["3.weight"]
        sparse.masker.candidates["3.weight"] = dataclasses.replace(kept, finite=False)
    before = _masks(sparse)
    with pytest.raises(FloatingPointError, match=r"3\.weight \(growth gradient\)") as error:
        scheduler.step()
    assert "0.weight" not in str(error.value)
    assert _same(before, sparse.masks)


def test_nan_in_active_weights_is_refused_but_nan_in_inactive_ones_is_not_a_fault():
    sparse, optimizer, scheduler = _setup()
    _step(sparse, optimizer, scheduler, _x())
    sparse(_x(1)).square().mean().backward()
    weight, mask = sparse.sparse_weights["0.weight"], sparse.masks["0.weight"]
    weight.data[~mask] = float("nan")  # inert: zeroed like every forward does
    changes = copy.deepcopy(sparse).rigl_step(0.3)
    assert sum(c.grown for c in changes.values()) > 0
    weight.data[tuple(mask.nonzero()[0].tolist())] = float("nan")
    before = _masks(sparse)
    with pytest.raises(FloatingPointError, match=r"0\.weight \(weights\)"):
        sparse.rigl_step(0.3)
    assert _same(before, sparse.masks)


def test_snfs_refuses_to_fold_a_nan_gradient_into_its_momentum():
    sparse, optimizer, scheduler = _setup("snfs", delta_t=5)
    _step(sparse, optimizer, scheduler, _x())
    momentum = {f: m.clone() for f, m in scheduler.momentum.items()}
    with pytest.raises(FloatingPointError, match="momentum"):
        _step(sparse, optimizer, scheduler, _x(1), scale=float("inf"))
    assert all(torch.equal(momentum[f], scheduler.momentum[f]) for f in momentum)


# --- fp16 loss scaling ----------------------------------------------------------------------------


def _scaled_run(method, steps, scaler, inf_at=()):
    sparse, optimizer, scheduler = _setup(method, scaler=scaler)
    for i in range(steps):
        loss = sparse(_x(i)).square().mean()
        if i in inf_at:
            loss = loss * float("inf")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scheduler.step():
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad()
    return sparse, scheduler


@pytest.mark.parametrize("method", ["snfs", "rigl", "rigl-sg"])
def test_under_a_grad_scaler_the_growth_gradient_is_unscaled_before_use(method):
    plain, plain_scheduler = _scaled_run(method, 5, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=10**6)
    scaled, scheduler = _scaled_run(method, 5, scaler)
    assert scheduler.step_count == plain_scheduler.step_count == 5 and scheduler.skipped_steps == 0
    assert _same(plain.masks, scaled.masks)
    for fqn, momentum in plain_scheduler.momentum.items():  # SNFS: folded unscaled
        torch.testing.assert_close(scheduler.momentum[fqn], momentum, rtol=1e-4, atol=1e-7)
    for fqn, weight in plain.sparse_weights.items():
        torch.testing.assert_close(scaled.sparse_weights[fqn], weight, rtol=1e-4, atol=1e-6)


def test_a_step_the_scaler_skips_on_inf_is_not_counted_and_does_not_update():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=10**6)
    sparse, scheduler = _scaled_run("rigl", 1, scaler)
    masks = _masks(sparse)
    sparse2, scheduler2 = _scaled_run("rigl", 2, torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=10**6), inf_at={1})
    assert scheduler2.step_count == 1 and scheduler2.skipped_steps == 1
    assert _same(masks, sparse2.masks)  # step 2 (an update) was skipped, not half-done
    sparse3, scheduler3 = _scaled_run("rigl", 3, torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=10**6), inf_at={1})
    assert scheduler3.step_count == 2 and int(sparse3.fxsparse_updates) == 1  # the retried step updated
    sparse3.verify()


def test_fp16_autocast_with_a_grad_scaler_trains_and_keeps_the_invariants():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    sparse, optimizer, scheduler = _setup("rigl", scaler=scaler)
    for i in range(8):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = sparse(_x(i)).float().square().mean()
        scaler.scale(loss).backward()
        for fqn, mask in sparse.masks.items():
            assert bool(sparse.sparse_weights[fqn].grad[~mask].eq(0).all()), fqn
        if scheduler.step():
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
    assert scheduler.step_count + scheduler.skipped_steps == 8 and int(sparse.fxsparse_updates) >= 2
    sparse.verify()


# --- state_dicts ----------------------------------------------------------------------------------


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _bad_states(sparse):
    state = sparse.state_dict()
    shape = dict(state)
    shape["0.weight_mask"] = torch.ones(6, 3, 2, 2, dtype=torch.bool)
    over = dict(state)
    over["3.weight_mask"] = state["3.weight_mask"].clone()
    over["3.weight_mask"].view(-1)[(~over["3.weight_mask"]).view(-1).nonzero()[:7, 0]] = True
    values = dict(state)
    values["0.weight_mask"] = state["0.weight_mask"].float() * 0.5
    weight = dict(state)
    weight["3.weight"] = torch.zeros(5, 7)
    return {"0.weight_mask": shape, "3.weight_mask": over, "0.weight_mask ": values, "3.weight": weight}


@pytest.mark.parametrize("case", ["0.weight_mask", "3.weight_mask", "0.weight_mask ", "3.weight"])
def test_a_bad_state_dict_is_a_clear_error_naming_the_key_and_changes_nothing(case):
    sparse, optimizer, scheduler = _setup()
    for i in range(3):
        _step(sparse, optimizer, scheduler, _x(i))
    state = _bad_states(sparse)[case]
    state = {k: (v + 1 if k == "0.bias" else v) for k, v in state.items()}  # a good key too
    before, active = _snapshot(sparse), [s.active for s in sparse._fxsparse.sites.values()]
    with pytest.raises(StateDictError, match=case.strip().replace(".", r"\.")):
        sparse.load_state_dict(state)
    assert _same(before, _snapshot(sparse))
    assert active == [s.active for s in sparse._fxsparse.sites.values()]
    with pytest.raises(RuntimeError):  # also what torch's own load_state_dict errors are
        sparse.load_state_dict(state)
    parent = torch.nn.Sequential(sparse)  # loaded as a submodule
    with pytest.raises(StateDictError, match=case.strip().replace(".", r"\.")):
        parent.load_state_dict({f"0.{k}": v for k, v in state.items()})
    assert _same(before, _snapshot(sparse))


def test_another_density_is_refused_unless_adopted():
    sparse = fxsparse.sparsify(_net(), 0.3, "erk")
    other = fxsparse.sparsify(_net(), 0.1, "erk", seed=4)
    with pytest.raises(StateDictError, match="budget='adopt'"):
        sparse.load_state_dict(other.state_dict())
    sparse.load_state_dict(other.state_dict(), budget="adopt")
    assert _same(sparse.masks, other.masks) and sparse.density == pytest.approx(other.density)
    sparse.verify()
    sparse.load_state_dict(fxsparse.sparsify(_net(), 0.1, "erk", seed=9).state_dict())  # same budget: fine
    sparse.verify()


def test_masks_moved_between_layers_with_the_total_kept_load_as_is():
    sparse = fxsparse.sparsify(_net(), 0.3, "erk")
    state = sparse.state_dict()
    a, b = state["0.weight_mask"].view(-1), state["3.weight_mask"].view(-1)
    a[a.nonzero()[:3, 0]] = False  # SNFS-style: three weights moved from layer 0 to layer 3
    b[(~b).nonzero()[:3, 0]] = True
    sparse.load_state_dict(state)
    sparse.verify()


# --- checkpoints of recipes/train.py -------------------------------------------------------------


def _train_args(fashion, run_dir, *extra):
    return [
        "--recipe", "smallcnn-fashion_mnist", "--data-root", str(fashion), "--method", "rigl", "--density", "0.2",
        "--epochs", "3", "--batch-size", "32", "--delta-t", "2", "--run-dir", str(run_dir), "--threads", "1", *extra,
    ]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_is_a_clear_error_and_the_previous_one_is_kept(fashion, tmp_path, damage):
    run = tmp_path / "run"
    complete = train.main(_train_args(fashion, run))
    newest, previous = run / "checkpoint.pt", run / "checkpoint.prev.pt"
    assert newest.is_file() and previous.is_file()  # the last two epochs' checkpoints
    assert torch.load(previous, weights_only=False)["epoch"] == 2
    kept = previous.read_bytes()
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(SystemExit, match=r"(?s)checkpoint\.pt is not a readable checkpoint.*--resume-from .*checkpoint\.prev\.pt"):
        train.main(_train_args(fashion, run, "--resume"))
    assert previous.read_bytes() == kept
    resumed = train.main(_train_args(fashion, run, "--resume-from", str(previous)))
    assert resumed["results"][0]["test_accuracy"] == complete["results"][0]["test_accuracy"]


def test_a_checkpoint_of_another_run_is_refused(fashion, tmp_path):
    run = tmp_path / "run"
    train.main(_train_args(fashion, run, "--epochs", "1"))
    with pytest.raises(SystemExit, match="density=0.2"):
        train.main(_train_args(fashion, run, "--resume", "--density", "0.1"))


# --- data parallel: a rank whose masks diverged ----------------------------------------------------



def _diverging_worker(rank, world, port, out):
    init(rank, world, port)
    try:
        sparse, optimizer, scheduler = _setup("rigl", delta_t=3)
        # without broadcast_buffers, DDP does not overwrite the other ranks' masks with rank 0's
        model = torch.nn.parallel.DistributedDataParallel(sparse, broadcast_buffers=False)
        outcome = "no error"
        for i in range(6):
            model(_x(i)).square().mean().backward()
            if i == 1 and rank == 1:  # one rank's topology changes behind the others' back
                mask = sparse.masks["3.weight"].view(-1)
                on, off = mask.nonzero()[0, 0], (~mask).nonzero()[0, 0]
                mask[on], mask[off] = False, True  # same count: only the digest can tell
            try:
                if scheduler.step():
                    optimizer.step()
            except RuntimeError as e:
                outcome = f"step {i + 1}: {e}"
                break
            optimizer.zero_grad()
        torch.save({"outcome": outcome, "updates": int(sparse.fxsparse_updates)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_a_rank_with_different_masks_is_caught_before_the_next_update(tmp_path):
    mp.spawn(_diverging_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["outcome"].startswith("step 3:") and "rank 1 differs" in result["outcome"], result
        assert result["updates"] == 0
