"""Data-parallel training (torch.distributed, DDP): every rank makes the same topology update.

The choice made here: the growth tensors are all-reduced (averaged) before every update — the
captured dense gradients (RigL, RigL-SG/SM), SNFS's dense momentum (linear in the gradients, so
the average of the ranks' momenta is the momentum of the averaged gradients) — and every step
after that is deterministic: drops read the weights, which DDP keeps identical; growth reads the
averaged tensors; SET's random scores are seeded by (seed, update, layer); redistribution reads
averaged statistics or the optimizer state, which is identical because the gradients are. So a
2-process run makes the same updates as a 1-process run with the same global batch, up to
floating-point rounding, and no mask is broadcast. :func:`assert_in_sync` checks it cheaply.

Use it as usual::

    sparse = fxsparse.sparsify(model, 0.1, "erk")
    ddp = torch.nn.parallel.DistributedDataParallel(sparse)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, opt, total_steps)   # the inner module, not ddp
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fxsparse import sharding
from fxsparse.graph_module import SparseGraphModule

__all__ = ["fingerprint", "assert_in_sync"]

_PRIME = 2_654_435_761


def fingerprint(sparse: SparseGraphModule, weights: bool = True) -> torch.Tensor:
    """An int64 digest per sparse layer of its mask (and, with ``weights``, its weight bits):
    equal digests on every rank mean identical topologies (and weights), up to hash collisions."""
    rows = []
    for fqn, mask in sparse.masks.items():
        if sharding.is_sharded(mask):  # each rank holds its own rows: nothing to compare
            rows.append([0, 0, 0] if weights else [0, 0])
            continue
        index = mask.reshape(-1).nonzero().squeeze(1).to(torch.int64).cpu()
        row = [index.numel(), int((index * _PRIME + (index * index) % 1_000_003).sum())]
        if weights:
            weight = sparse._leaf_weight(fqn).detach().reshape(-1).cpu()
            bits = weight.view(torch.int64 if weight.element_size() == 8 else torch.int32 if weight.element_size() == 4 else torch.int16)
            position = torch.arange(bits.numel(), dtype=torch.int64) % 65_521 + 1
            row.append(int((bits.to(torch.int64) * position).sum()))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def assert_in_sync(sparse: SparseGraphModule, weights: bool = True) -> None:
    """Raises RuntimeError unless every rank holds the same masks (and weights, bit for bit).

    A collective: every rank must call it. Without an initialized process group it returns.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = fingerprint(sparse, weights)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    names = list(sparse.masks)
    for rank, theirs in enumerate(gathered):
        if not torch.equal(theirs, gathered[0]):
            differ = [names[i] for i in range(len(names)) if not torch.equal(theirs[i], gathered[0][i])]
            raise RuntimeError(
                f"fxsparse: rank {rank} differs from rank 0 in {len(differ)} layer(s) (first: "
                f"{differ[0]!r}); every rank must call scheduler.step() after each backward, with the "
                f"same seed and the module wrapped in DistributedDataParallel"
            )
