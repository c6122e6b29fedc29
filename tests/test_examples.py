"""The extension example outside the package (examples/mest.py): a method from the literature that
fxsparse does not ship, added as a subclass, trains under the scheduler with every invariant."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from invariants import assert_inactive_zero_grad
from scripts import load_script

import fxsparse
from fxsparse.registry import METHODS


@pytest.fixture(scope="module")
def mest():
    if "mest" in METHODS:  # registered once per process
        return METHODS.get("mest")
    return load_script("examples/mest.py").MEST


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_the_example_method_drops_by_its_own_score_and_grows_at_random(mest):
    assert "mest" in fxsparse.available_methods() and issubclass(mest, fxsparse.methods.SET)
    sparse = fxsparse.sparsify(_net(), 0.3, "uniform", dense=[])
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.TopologyScheduler(sparse, optimizer, total_steps=20, delta_t=4, method="mest")
    gen = torch.Generator().manual_seed(1)
    updates = 0
    for step in range(1, 21):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        torch.nn.functional.cross_entropy(sparse(x), y).backward()
        if scheduler.is_update_step(step):
            assert sparse.masker.grads  # armed: the drop score reads the gradient
            before = {f: m.clone() for f, m in sparse.masks.items()}
            scores = {f: mest.reference(sparse.get_parameter(f).detach(), g) for f, g in sparse.masker.grads.items()}
        if scheduler.step():
            optimizer.step()
        else:
            updates += 1
            for fqn, mask in sparse.masks.items():
                old = before[fqn]
                assert int(mask.sum()) == int(old.sum())  # counts kept
                k = math.floor(scheduler.drop_fraction(step) * int(old.sum()))
                dropped = old & ~mask
                kept = old & mask
                # what left was no better by MEST's score than what stayed, except connections
                # dropped and grown back at random in the same update (they count as staying)
                if bool(dropped.any()) and bool(kept.any()):
                    best_dropped = float(scores[fqn][dropped].max())
                    below = int((scores[fqn][kept] < best_dropped).sum())
                    assert below <= scheduler.last_changes[fqn].regrown, (fqn, below)
                assert int(dropped.sum()) <= k
        optimizer.zero_grad()
    assert updates == len([s for s in range(1, 21) if scheduler.is_update_step(s)]) > 0
    sparse.verify()
    sparse(torch.randn(4, 12)).sum().backward()
    assert_inactive_zero_grad(sparse)


# ---------------------------------------------------------------- the integrations' examples
def test_the_trainer_example_trains_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    try:
        from fxsparse.data import load_shakespeare

        load_shakespeare()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"the Shakespeare corpus (scripts/setup.sh installs it): {e}")
    example = load_script("examples/trainer_gpt2.py")
    trainer = example.main(["--steps", "20", "--out", str(tmp_path)])
    assert trainer.state.global_step == 20 and (tmp_path / "checkpoint-10" / "fxsparse_scheduler.pt").is_file()
    logged = [r for r in trainer.state.log_history if "fxsparse/updates" in r]
    assert logged and logged[-1]["fxsparse/updates"] == 15.0  # every step up to 0.75 * 20 (delta_t = 1)
    shutil.rmtree(tmp_path / "checkpoint-20")  # resume from step 10
    resumed = example.main(["--steps", "20", "--out", str(tmp_path), "--resume"])
    assert resumed.state.global_step == 20
    for fqn, mask in trainer.model.masks.items():
        assert torch.equal(resumed.model.masks[fqn], mask), fqn


def test_the_lightning_example_trains(tmp_path):
    pytest.importorskip("lightning")
    model = load_script("examples/lightning_cnn.py").main(
        ["--epochs", "1", "--limit", "512", "--synthetic", "--out", str(tmp_path)])
    assert (tmp_path / "last.ckpt").is_file()
    assert model.net.summary().active == pytest.approx(0.1 * model.net.summary().total, abs=1)


def test_the_accelerate_example_trains(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accelerate.state.AcceleratorState._reset_state(True)
    sparse = load_script("examples/accelerate_loop.py").main(
        ["--epochs", "1", "--limit", "1024", "--synthetic", "--out", str(tmp_path)])
    accelerate.state.AcceleratorState._reset_state(True)
    assert sparse.scheduler.step_count == 8 and sparse.scheduler.history == []  # delta_t 50 > 8 steps
    assert (tmp_path / "custom_checkpoint_0.pkl").is_file()  # the scheduler, saved by save_state
