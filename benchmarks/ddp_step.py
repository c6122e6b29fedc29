"""Step time under DistributedDataParallel: fxsparse against dense, 2 processes on this machine.

Each of the 2 processes (gloo, one torch thread each) trains the same model twice, dense and
sparsified (density 0.1 ERK, ``RigLScheduler`` between updates), both wrapped in DDP, on its
half of a global batch; a round is one step of each variant in a random order that both ranks
share, with a barrier before each step so that the ranks time the same step. The headline is
rank 0's per-round ratio fxsparse / dense (median and a distribution-free 95% interval), beside
the same ratio of a 1-process run in the same invocation (the whole batch, one process with
the same total threads): the question is whether DDP changes what masking costs. Masking does
the same work on each rank as in one process (the forward zeroing and the gradient pass when the
backward ends, after DDP's bucket copy-back), so the ratios should agree.

    .venv/bin/python benchmarks/ddp_step.py --models resnet18,wrn22_2 --rounds 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import RoundOrder, ci_text, free_port, init_gloo  # noqa: E402
from step_time import build_dense  # noqa: E402

import fxsparse  # noqa: E402


def _make(name: str, sparse: bool, world: int, broadcast_buffers: bool = True) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    model = build_dense(name, seed=0)
    scheduler = None
    if sparse:
        model = fxsparse.sparsify(model, density=0.1, init="erk", seed=0)
    module = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers) if world > 1 else model
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if sparse:
        scheduler = fxsparse.RigLScheduler(model, optimizer, total_steps=10**9, delta_t=10**8)
    return module, optimizer, scheduler


def _rounds(name: str, rounds: int, batch: int, rank: int, world: int, broadcast_buffers: bool = True) -> dict[str, list[float]]:
    torch.manual_seed(rank)
    images, labels = torch.randn(batch // world, 3, 32, 32), torch.randint(0, 10, (batch // world,))
    variants = {"dense": _make(name, False, world, broadcast_buffers), "fxsparse": _make(name, True, world, broadcast_buffers)}

    def step(variant: str) -> float:
        module, optimizer, scheduler = variants[variant]
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        F.cross_entropy(module(images), labels).backward()
        if scheduler is None or scheduler.step():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for variant in variants:  # warm-up
        for _ in range(3):
            step(variant)
    orders = RoundOrder(list(variants), 0)  # seeded: the same order on every rank
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in orders.next():
            times[variant].append(step(variant))
    return times


def _worker(rank: int, world: int, port: int, name: str, rounds: int, batch: int, broadcast_buffers: bool, queue) -> None:
    init_gloo(rank, world, port)
    try:
        times = _rounds(name, rounds, batch, rank, world, broadcast_buffers)
        if rank == 0:
            queue.put(times)
    finally:
        dist.destroy_process_group()


def _ratio(times: dict[str, list[float]]) -> str:
    return ci_text([s / d for s, d in zip(times["fxsparse"], times["dense"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,wrn22_2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch (split over the processes)")
    parser.add_argument("--no-broadcast-buffers", action="store_true",
                        help="DDP(broadcast_buffers=False): no copy of rank 0's buffers (the masks among them) at each forward")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, global batch {args.batch}, {args.rounds} rounds, "
          f"density 0.1 ERK, DDP broadcast_buffers={not args.no_broadcast_buffers}; per-round ratio fxsparse / dense, "
          "median [95% CI]")
    print("| model | 1 process (2 threads) | DDP, 2 processes (1 thread each), rank 0 | dense ms (1 proc / DDP) |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        torch.set_num_threads(2)
        single = _rounds(name, args.rounds, args.batch, 0, 1)
        context = mp.get_context("spawn")
        queue = context.SimpleQueue()
        mp.start_processes(_worker, args=(2, free_port(), name, args.rounds, args.batch, not args.no_broadcast_buffers, queue), nprocs=2,
                           join=True, start_method="spawn")
        ddp = queue.get()
        dense_ms = f"{statistics.median(single['dense']) * 1e3:.1f} / {statistics.median(ddp['dense']) * 1e3:.1f}"
        print(f"| {name} | {_ratio(single)} | {_ratio(ddp)} | {dense_ms} |", flush=True)


if __name__ == "__main__":
    main()
