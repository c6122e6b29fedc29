"""FSDP2 with fxsparse at 2 processes: memory per rank, step time and the bytes of a topology update.

A pre-norm transformer (``--layers`` blocks of width ``--width``, MLP 4x) is trained on 2 CPU
processes (gloo, one torch thread each) in four variants: DDP dense, DDP fxsparse, FSDP dense and
FSDP fxsparse (``keep_blocks()``, ``fully_shard`` on each block and on the root; density 0.1 ERK,
RigL). For each it prints, per rank:

- **state bytes**: parameters + gradients + optimizer state (AdamW) + masks, summed over the
  tensors a rank holds after a step (each rank's shards under FSDP), the exact bytes, not a
  process's resident size;
- **step time**: the median of ``--rounds`` training steps (forward, backward, scheduler, AdamW),
  every round running each variant once in a random order both ranks share, with a barrier
  before each step; the ratios sparse / dense are per-round paired, with a 95% interval;
- **the topology update**: the bytes rank 0 received in the all_gathers of one RigL update
  (:data:`fxsparse.sharding.traffic`), its wall time beyond a plain step, and that cost
  amortized over ``delta_t = 100`` steps as a share of a step.

Then what the update would cost at 8 and 64 ranks: the measured layers (whole masks, weights and
growth gradients at an update step, gathered) are split by rows as FSDP splits them and the
sharded update itself runs with the ranks as threads, counting the bytes rank 0 receives; against
the ``3 * (ranks - 1) / ranks`` times the parameter bytes FSDP itself moves per step and rank
(all-gather in the forward and the backward, reduce-scatter).

    .venv/bin/python benchmarks/fsdp.py --layers 8 --width 512 --rounds 10
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import RoundOrder, ci_text, free_port, init_gloo  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse import sharding  # noqa: E402

VARIANTS = ["DDP dense", "DDP fxsparse", "FSDP dense", "FSDP fxsparse"]


class Block(nn.Module):
    def __init__(self, width: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, layers: int, width: int, vocab: int = 1024) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([Block(width) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _make(variant: str, layers: int, width: int, world: int):
    torch.manual_seed(0)
    model = Transformer(layers, width)
    sparse = "fxsparse" in variant
    if sparse:
        model = fxsparse.sparsify(model, density=0.1, init="erk", seed=0)
        model.keep_blocks()
    if variant.startswith("FSDP"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        module = model
    else:
        module = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    scheduler = fxsparse.RigLScheduler(model, optimizer, total_steps=10**9, delta_t=10**8) if sparse else None
    return model, module, optimizer, scheduler


def _local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    tensor = sharding.local(tensor)
    return tensor.numel() * tensor.element_size()


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    masks = [b for name, b in model.named_buffers() if name.endswith("_mask")]
    state = [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return {"parameters": sum(_local_bytes(p) for p in params), "gradients": sum(_local_bytes(p.grad) for p in params),
            "optimizer": sum(_local_bytes(v) for v in state), "masks": sum(_local_bytes(m) for m in masks)}


def _rounds(layers_count: int, width: int, rounds: int, batch: int, length: int, rank: int, world: int) -> dict:
    torch.manual_seed(rank)
    ids = torch.randint(0, 1024, (batch // world, length))
    made = {v: _make(v, layers_count, width, world) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def step(variant: str, update: bool = False) -> float:
        model, module, optimizer, scheduler = made[variant]
        dist.barrier()
        start = time.perf_counter()
        if update:
            model.arm_growth(True, accumulate=True)
        logits = module(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        if update:
            model.rigl_step(0.3, optimizer)
        elif scheduler is None or scheduler.step():
            optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: counted in the state bytes
        return time.perf_counter() - start

    for variant in VARIANTS:  # warm-up: optimizer state allocated
        step(variant)
    order = RoundOrder(VARIANTS, seed=0)
    for _ in range(rounds):
        for variant in order.next():
            times[variant].append(step(variant))
    memory = {v: _state_bytes(made[v][0], made[v][2]) for v in VARIANTS}
    layers = _layer_data(made["FSDP fxsparse"], ids, rank)
    # one RigL update under FSDP: its traffic and its time beyond a plain step
    sharding.traffic.collectives = sharding.traffic.received = 0
    update_time = step("FSDP fxsparse", update=True)
    traffic = (sharding.traffic.collectives, sharding.traffic.received)
    return {"times": times, "memory": memory, "update": update_time, "traffic": traffic, "layers": layers,
            "parameter_bytes": sum(p.numel() * 4 for p in Transformer(layers_count, width).parameters())}


def _layer_data(made: tuple, ids: torch.Tensor, rank: int) -> list[tuple[Any, Any, Any]] | None:
    """Every layer's whole mask, |weight| and |growth gradient| at an update step (gathered; a
    collective), on rank 0: what the projection to more ranks replays."""
    model, module, optimizer, _ = made
    model.arm_growth(True, accumulate=True)
    logits = module(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    data = []
    for fqn, mask in model.masks.items():
        whole = tuple(t.numpy() for t in (mask.full_tensor(), model.get_parameter(fqn).detach().full_tensor().abs(),
                                          model.masker.grads[fqn].full_tensor().abs()))  # numpy: pickled by value
        data.append(whole if rank == 0 else None)
    model.arm_growth(False)
    optimizer.zero_grad(set_to_none=False)
    return data if rank == 0 else None


def _worker(rank: int, world: int, port: int, args: tuple, queue) -> None:
    init_gloo(rank, world, port)
    try:
        result = _rounds(*args, rank, world)
        if rank == 0:
            queue.put(result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def project(layers: list[tuple[Any, Any, Any]], ranks: int, drop_fraction: float = 0.3) -> tuple[int, int]:
    """(collectives, bytes rank 0 receives) in one RigL update of these layers (whole mask,
    |weight|, |growth gradient|) split over ``ranks`` ranks: the sharded update itself, run with
    the ranks as threads (:func:`fxsparse.sharding.simulate`)."""
    collectives = received = 0
    for mask, weight, grad in layers:
        k = math.floor(drop_fraction * int(mask.sum()))
        _, gather = sharding.simulate(torch.from_numpy(mask), torch.from_numpy(weight), torch.from_numpy(grad), k, k, True, ranks)
        collectives += gather.collectives
        received += gather.received
    return collectives, received


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = mp.start_processes(_worker, args=(2, free_port(), (args.layers, args.width, args.rounds, args.batch, args.length),
                                                  queue), nprocs=2, join=False, start_method="spawn")
    result = queue.get()  # before joining: a large result fills the pipe until it is read
    while not processes.join():
        pass
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 processes (gloo, 1 thread each), transformer "
          f"{args.layers} x {args.width} ({result['parameter_bytes'] / 4 / 1e6:.1f} M parameters), global batch "
          f"{args.batch} x {args.length}, AdamW, density 0.1 ERK, {args.rounds} rounds")
    print("\n| variant | parameters MB | gradients MB | optimizer MB | masks MB | total MB per rank | step ms (median) |")
    print("|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        m = result["memory"][variant]
        print(f"| {variant} | {_mb(m['parameters'])} | {_mb(m['gradients'])} | {_mb(m['optimizer'])} | {_mb(m['masks'])} "
              f"| {_mb(sum(m.values()))} | {statistics.median(result['times'][variant]) * 1e3:.1f} |")
    times = result["times"]
    print(f"\nstep time, per-round ratio, median [95% CI]: FSDP fxsparse / FSDP dense "
          f"{ci_text([s / d for s, d in zip(times['FSDP fxsparse'], times['FSDP dense'])])}; "
          f"FSDP fxsparse / DDP fxsparse {ci_text([s / d for s, d in zip(times['FSDP fxsparse'], times['DDP fxsparse'])])}")
    step = statistics.median(times["FSDP fxsparse"])
    collectives, received = result["traffic"]
    extra = max(0.0, result["update"] - step)
    print(f"\none RigL update (drop fraction 0.3) under FSDP at 2 ranks: {collectives} all_gathers, {received:,} bytes "
          f"received by rank 0; {result['update'] * 1e3:.1f} ms against a {step * 1e3:.1f} ms step: "
          f"{extra * 1e3:.1f} ms extra, amortized over delta_t=100 steps {100 * extra / 100 / step:.3f}% of a step")
    print("\nthe same update at more ranks (the measured layers' masks, weights and gradients, split by rows; the ranks as "
          "threads):")
    print("| ranks | all_gathers | bytes rank 0 receives per update | FSDP's own traffic per step, per rank | "
          "update amortized over delta_t=100, share of that |")
    print("|---|---|---|---|---|")
    for ranks in (2, 8, 64):
        collectives, received = project(result["layers"], ranks)
        per_step = 3 * (ranks - 1) / ranks * result["parameter_bytes"]  # all-gather forward and backward, reduce-scatter
        print(f"| {ranks} | {collectives} | {received:,} | {per_step:,.0f} | {100 * received / 100 / per_step:.3f}% |")
    return result


if __name__ == "__main__":
    main()
