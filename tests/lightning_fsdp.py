"""Run by tests/test_fsdp.py: ``python tests/lightning_fsdp.py OUT DEVICES`` trains the blocks model
of that test with Lightning's ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` per block and on
the root in ``configure_model``) on DEVICES CPU processes (Lightning relaunches this script for
the other ranks), or with the default strategy on one, and saves the masks, weights and history."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fsdp import Net  # noqa: E402

import lightning  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse.integrations.lightning import SparseTrainingCallback  # noqa: E402
from fxsparse.sharding import is_sharded  # noqa: E402


class Lit(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = fxsparse.sparsify(Net().double(), 0.4, "erk", seed=3)
        self.net.keep_blocks()

    def configure_model(self) -> None:
        if self.trainer.world_size == 1 or is_sharded(self.net.get_parameter("head.weight")):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.net.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(devices: int) -> torch.utils.data.DataLoader:
    """The global batch is 8 either way: with 2 processes, rank r takes samples r, r + 2, ... (in
    order: Lightning's own sampler would shuffle), 4 a step."""
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=gen, dtype=torch.float64), torch.randint(0, 5, (64,), generator=gen))
    sampler = torch.utils.data.distributed.DistributedSampler(
        data, num_replicas=devices, rank=int(os.environ.get("LOCAL_RANK", 0)), shuffle=False) if devices > 1 else None
    return torch.utils.data.DataLoader(data, batch_size=8 // devices, sampler=sampler, shuffle=False)


if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    lit = Lit()
    callback = SparseTrainingCallback(delta_t=2, end_fraction=1.0)
    strategy = lightning.pytorch.strategies.ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) \
        if devices > 1 else "auto"
    trainer = lightning.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(lit, loader(devices))
    full = {f: (m.full_tensor() if is_sharded(m) else m).clone() for f, m in lit.net.masks.items()}
    weights = {f: (p.full_tensor() if is_sharded(p) else p).detach().clone() for f, p in lit.net.sparse_weights.items()}
    if trainer.global_rank == 0:
        torch.save({"masks": full, "weights": weights, "history": callback.scheduler.history,
                    "sharded": is_sharded(lit.net.get_parameter("head.weight"))}, out / f"devices{devices}.pt")
