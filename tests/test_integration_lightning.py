"""fxsparse.integrations.lightning: sparse training inside ``lightning.Trainer``.

A small sparse CNN trains under a Lightning ``Trainer`` with gradient accumulation; a run stopped
after 2 of 4 epochs and resumed from its checkpoint ends with the uninterrupted run's masks,
weights and update history; update iterations do not step the optimizer; AMP (bf16 and fp16
with a GradScaler) trains with exact budgets; 2 CPU processes under the ``ddp`` strategy hold
identical masks and weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsparse

lightning = pytest.importorskip("lightning")
from fxsparse.integrations.lightning import SparseTrainingCallback  # noqa: E402


class Lit(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        self.net = fxsparse.sparsify(net, 0.3, "erk")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(n: int = 64, batch: int = 4) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


def _trainer(tmp_path, callbacks, **settings) -> lightning.Trainer:
    base = dict(accelerator="cpu", devices=1, max_epochs=4, accumulate_grad_batches=2, logger=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    return lightning.Trainer(callbacks=callbacks, **{**base, **settings})


class StopAfterEpoch(lightning.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resumed_run_ends_with_the_uninterrupted_runs_masks(tmp_path):
    lit = Lit()
    initial = {fqn: m.clone() for fqn, m in lit.net.masks.items()}
    callback = SparseTrainingCallback(delta_t=3)
    trainer = _trainer(tmp_path / "whole", [callback], enable_checkpointing=False)
    trainer.fit(lit, loader())
    scheduler = callback.scheduler
    # 16 batches an epoch, accumulation 2: 8 optimizer steps an epoch, 32 in all, updates until 0.75 * 32
    assert scheduler.total_steps == 32 and scheduler.step_count == 32 and trainer.global_step == 32
    assert [r["step"] for r in scheduler.history] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert any(not torch.equal(lit.net.masks[f], initial[f]) for f in initial)
    assert {f: int(m.sum()) for f, m in lit.net.masks.items()} == {f: int(m.sum()) for f, m in initial.items()}
    adam = trainer.optimizers[0].state[lit.net.get_parameter("0.weight")]
    assert int(adam["step"]) == 32 - 8  # update iterations did not step the optimizer

    part = Lit()
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "part", [SparseTrainingCallback(delta_t=3), StopAfterEpoch(1), checkpoint]).fit(part, loader())
    resumed, resumed_cb = Lit(), SparseTrainingCallback(delta_t=3)
    _trainer(tmp_path / "part", [resumed_cb], enable_checkpointing=False).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_cb.scheduler.history == scheduler.history
    for fqn in lit.net.masks:
        assert torch.equal(resumed.net.masks[fqn], lit.net.masks[fqn]), fqn
    for (name, a), (_, b) in zip(lit.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_amp_trains_with_exact_budgets(tmp_path, precision):
    lit = Lit()
    counts = {f: int(m.sum()) for f, m in lit.net.masks.items()}
    callback = SparseTrainingCallback(delta_t=2)
    # Lightning runs "16-mixed" on GPUs only: on the CPU its plugin is given a CPU GradScaler
    amp = {"precision": precision} if precision == "bf16-mixed" else {"plugins": [
        lightning.pytorch.plugins.precision.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    trainer = _trainer(tmp_path, [callback], max_epochs=1, enable_checkpointing=False, **amp)
    trainer.fit(lit, loader())
    assert (callback.scheduler.scaler is not None) == (precision == "16-mixed")
    assert len(callback.scheduler.history) >= 2
    assert {f: int(m.sum()) for f, m in lit.net.masks.items()} == counts
    for fqn, weight in lit.net.sparse_weights.items():
        assert weight.dtype == torch.float32 and not weight[~lit.net.masks[fqn]].any(), fqn


def test_two_ddp_processes_hold_identical_masks_and_weights(tmp_path):
    script = Path(__file__).resolve().parent / "lightning_ddp.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # 64 samples over 2 processes, batch 4, accumulation 2: 4 optimizer steps an epoch, 2 epochs
    assert ranks[0]["total"] == 8 and [r["step"] for r in ranks[0]["history"]] == [2, 4, 6]
    assert ranks[0]["history"] == ranks[1]["history"]
    for fqn, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][fqn]), fqn
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    assert any(r["layers"][f]["grown"] for r in ranks[0]["history"] for f in r["layers"])


def test_a_tensorboard_logger_gets_the_stats_and_the_masks(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lit = Lit()
    logger = lightning.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(tmp_path, [SparseTrainingCallback(delta_t=2)], max_epochs=1, logger=logger, log_every_n_steps=1,
             enable_checkpointing=False).fit(lit, loader())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    assert {f"fxsparse/mask/{fqn}" for fqn in lit.net.masks} <= set(accumulator.Tags()["images"])
    assert {"fxsparse/churn", "fxsparse/updates"} <= set(accumulator.Tags()["scalars"])


class ModeLit(lightning.LightningModule):
    """A sparse net whose modes compute differently (drop path, a training-only head), validated
    every epoch: Lightning restores the training mode after validation by assignment."""

    def __init__(self) -> None:
        super().__init__()
        from mode_models import ModeNet

        torch.manual_seed(0)
        x = torch.randn(2, 4, 6)
        self.net = fxsparse.sparsify(ModeNet(("drop_path", "train_branch")), 0.5, "uniform", dense=[], example_inputs=x)
        self.graphs_seen: list[tuple[str, bool]] = []

    def _step(self, batch, stage):
        x, y = batch
        out = self.net(x)
        self.graphs_seen.append((stage, self.net.graph is self.net._fxsparse.mode_graphs[True]))
        return nn.functional.cross_entropy(out, y)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_training_after_validation_runs_the_training_graph(tmp_path):
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, 6, generator=gen), torch.randint(0, 5, (16,), generator=gen))
    lit = ModeLit()
    assert lit.net._fxsparse.mode_graphs is not None
    _trainer(tmp_path, [SparseTrainingCallback(delta_t=2)], max_epochs=2, enable_checkpointing=False).fit(
        lit, torch.utils.data.DataLoader(data, batch_size=4), torch.utils.data.DataLoader(data, batch_size=8),
    )
    stages = [stage for stage, _ in lit.graphs_seen]
    assert stages[0] == "val" and "val" in stages[stages.index("train"):]  # sanity check, then after each epoch
    assert all(train_graph == (stage == "train") for stage, train_graph in lit.graphs_seen), lit.graphs_seen
