"""fxsparse.integrations.accelerate: the documented ``Accelerator`` loop.

With gradient accumulation 2 (and bf16) it makes exactly the updates of the plain
``TopologyScheduler`` loop of the README over the same micro-batches; update iterations do not
step the optimizer; ``accelerator.save_state``/``load_state`` resume to the uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse

accelerate = pytest.importorskip("accelerate")
from fxsparse.integrations.accelerate import SparseTraining, optimizer_steps  # noqa: E402

EPOCHS = 3


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision among it): each run starts anew,
    and leaves none behind for other tests in this process (transformers' Trainer makes its own)."""
    accelerate.state.AcceleratorState._reset_state(True)
    yield
    accelerate.state.AcceleratorState._reset_state(True)


def _sparse() -> fxsparse.SparseGraphModule:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    return fxsparse.sparsify(net, 0.25, "erk")


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 12, generator=gen), torch.randint(0, 4, (40,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def _accelerated(epochs=range(EPOCHS), state=None, save=None, precision="no"):
    """The documented loop; ``state`` is loaded before training, ``save`` written after it."""
    accelerate.state.AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision=precision)
    sparse = _sparse()
    model, optimizer, loader = accelerator.prepare(sparse, torch.optim.Adam(sparse.parameters(), lr=1e-2), _loader())
    training = SparseTraining(accelerator, model, optimizer, optimizer_steps(accelerator, loader, EPOCHS), delta_t=2)
    accelerator.register_for_checkpointing(training)
    if state:
        accelerator.load_state(state)
    for _ in epochs:
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                training.step()
                optimizer.step()
                optimizer.zero_grad()
    if save:
        accelerator.save_state(save)
    return sparse, training, optimizer


def _plain():
    """The README's loop over the same micro-batches, accumulating by hand."""
    sparse = _sparse()
    optimizer = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    scheduler = fxsparse.TopologyScheduler(sparse, optimizer, total_steps=EPOCHS * 5, delta_t=2)
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(_loader()):
            (nn.functional.cross_entropy(sparse(x), y) / 2).backward()
            if i % 2 == 1:
                if scheduler.step():
                    optimizer.step()
                optimizer.zero_grad()
    return sparse, scheduler


def test_the_accelerate_loop_makes_the_plain_loops_updates():
    sparse, training, optimizer = _accelerated()
    reference, scheduler = _plain()
    # 10 batches an epoch, accumulation 2: 5 optimizer steps an epoch, updates every 2 until 0.75 * 15
    assert training.scheduler.total_steps == 15 and training.scheduler.step_count == 15
    assert training.scheduler.history == scheduler.history and len(scheduler.history) == 5
    for fqn, mask in reference.masks.items():
        assert torch.equal(sparse.masks[fqn], mask), fqn
    for (name, a), (_, b) in zip(reference.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert int(optimizer.optimizer.state[sparse.get_parameter("0.weight")]["step"]) == 15 - 5
    assert training.stats()["fxsparse/updates"] == 5.0


def test_save_state_and_load_state_resume_the_uninterrupted_run(tmp_path):
    whole, whole_training, _ = _accelerated()
    _accelerated(epochs=range(1), save=tmp_path / "state")
    resumed, training, _ = _accelerated(epochs=range(1, EPOCHS), state=tmp_path / "state")
    assert training.scheduler.history == whole_training.scheduler.history
    for fqn, mask in whole.masks.items():
        assert torch.equal(resumed.masks[fqn], mask), fqn
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_bf16_keeps_budgets_and_zeros():
    sparse, training, _ = _accelerated(precision="bf16")
    assert len(training.scheduler.history) == 5
    for fqn, weight in sparse.sparse_weights.items():
        assert int(sparse.masks[fqn].sum()) == sparse._fxsparse.sites[fqn].active
        assert not weight[~sparse.masks[fqn]].any(), fqn
