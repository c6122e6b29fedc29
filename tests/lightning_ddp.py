"""Run by tests/test_integration_lightning.py: ``python tests/lightning_ddp.py OUT`` trains the
small sparse CNN of that test under Lightning's ``ddp`` strategy on 2 CPU processes (Lightning
relaunches this script for rank 1) and saves each rank's masks, weights and update history."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_integration_lightning import Lit, loader  # noqa: E402

import lightning  # noqa: E402

from fxsparse.integrations.lightning import SparseTrainingCallback  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    lit = Lit()
    callback = SparseTrainingCallback(delta_t=2, end_fraction=0.8)
    trainer = lightning.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, accumulate_grad_batches=2, callbacks=[callback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(lit, loader())
    torch.save({"masks": lit.net.masks, "weights": dict(lit.net.named_parameters()), "total": callback.scheduler.total_steps,
                "history": callback.scheduler.history}, out / f"rank{trainer.global_rank}.pt")
